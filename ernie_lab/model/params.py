"""Parameter counts of an ERNIE 4.5 MoE config: total, active per token, per component, bytes.

Counted on a model built on the meta device (no memory allocated), so the numbers are those of the
real module tree, not of a formula that could drift from it. "Active" is what one token touches:
attention, dense MLPs, shared experts, ``moe_k`` of the ``moe_num_experts`` routed experts, router,
norms, embedding and LM head (a tied embedding counted once). The correction bias (a buffer, stored in
checkpoints) is counted with the router, so ``total`` equals the number of stored elements.
"""

from __future__ import annotations

import re

import torch

from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.ernie import ErnieMoE
from ernie_lab.model.quant import quantize_modules

COMPONENTS = (
    "embed",
    "attention",
    "dense_mlp",
    "router",
    "routed_experts",
    "shared_experts",
    "norms",
    "lm_head",
)

_RULES = [  # first match wins; order matters (router before the dense-MLP catch-all)
    ("embed", re.compile(r"^model\.embed_tokens\.")),
    ("lm_head", re.compile(r"^lm_head\.")),
    ("norms", re.compile(r"(layernorm|^model\.norm)\.weight$")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("router", re.compile(r"\.mlp\.(gate\.weight|moe_statics\.)")),
    ("routed_experts", re.compile(r"\.mlp\.experts\.")),
    ("shared_experts", re.compile(r"\.mlp\.shared_experts\.")),
    ("dense_mlp", re.compile(r"\.mlp\.(gate|up|down)_proj\.")),
]
_FP32 = {"router"}  # kept in fp32 whatever the model dtype


def component_of(name: str) -> str:
    """Which component a state_dict key belongs to (raises for a key no rule knows)."""
    for component, rule in _RULES:
        if rule.search(name):
            return component
    raise KeyError(f"parameter {name!r} matches no component of {COMPONENTS}")


def count_params(config: ErnieConfig) -> dict:
    """Parameter counts and sizes of ``config``.

    Returns a dict::

        total, active                   int: all parameters / those one token uses
        active_non_embedding            int: active less the embedding and LM head
        components                      {component: {"total": int, "active": int}} (see COMPONENTS)
        bytes, active_bytes             {"bf16": int, "fp32": int}: memory of the weights
                                        (the router stays fp32 in a bf16 model)
    """
    with torch.device("meta"):
        model = ErnieMoE(config, init=False)
    share = config.moe_k / config.moe_num_experts  # every expert of a layer has the same size
    components = {c: {"total": 0, "active": 0} for c in COMPONENTS}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied LM head is the embedding: count it once
            continue
        seen.add(id(tensor))
        component = component_of(name)
        n = tensor.numel()
        components[component]["total"] += n
        components[component]["active"] += round(n * share) if component == "routed_experts" else n
    total = sum(c["total"] for c in components.values())
    active = sum(c["active"] for c in components.values())
    io = components["embed"]["active"] + components["lm_head"]["active"]
    return {
        "total": total,
        "active": active,
        "active_non_embedding": active - io,
        "components": components,
        "bytes": _bytes(components, "total"),
        "active_bytes": _bytes(components, "active"),
    }


def _bytes(components: dict[str, dict[str, int]], which: str) -> dict[str, int]:
    fp32 = sum(components[c][which] for c in _FP32)
    rest = sum(v[which] for c, v in components.items() if c not in _FP32)
    return {"bf16": 2 * rest + 4 * fp32, "fp32": 4 * (rest + fp32)}


def human(n: float, unit: str = "") -> str:
    """``21834584064`` -> ``"21.83B"``; with ``unit="B"`` bytes in binary units (``"40.67 GiB"``)."""
    if unit == "B":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or suffix == "TiB":
                return f"{n:.2f} {suffix}" if suffix != "B" else f"{int(n)} B"
            n /= 1024
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(int(n))


def weight_bytes(
    config: ErnieConfig,
    quantization: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    expert_slots: int | None = None,
) -> dict[str, int]:
    """Bytes of the weights as :func:`ernie_lab.load_model` stores them (no activations or KV cache).

    ``quantization``: None, ``"nf4"``, ``"fp4"`` or ``"int8"`` (see :mod:`ernie_lab.model.quant`;
    bitsandbytes is not needed to count). Returns ``total``, ``routed_experts`` (their part of
    total) and ``device``: what sits on the GPU, which with ``expert_slots=K`` (expert offload) is
    everything but the routed experts plus K experts per MoE layer.
    """
    with torch.device("meta"):
        model = ErnieMoE(config, init=False)
        if quantization is not None:
            quantize_modules(model, quantization, dtype)
    total = experts = 0
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        fp32 = component_of(name) in _FP32 or name.endswith(("_absmax", "_scale"))  # router, quantization scales
        itemsize = t.element_size() if not t.is_floating_point() else 4 if fp32 else dtype.itemsize
        nbytes = t.numel() * itemsize
        total += nbytes
        experts += nbytes if component_of(name) == "routed_experts" else 0
    device = total
    if expert_slots is not None:
        device = total - experts + experts * expert_slots // config.moe_num_experts
    return {"total": total, "routed_experts": experts, "device": device}


def stored_active_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one token reads, from ``model``'s own tensors as stored (quantized codes
    and scales, offloaded experts' host copies counted as the slots they are read from): every
    weight but the routed experts, plus ``moe_k / moe_num_experts`` of those (the selection rule of
    ``active_bytes`` in :func:`count_params`, on real bytes)."""
    cfg = model.config
    share = cfg.moe_k / cfg.moe_num_experts
    total, seen = 0.0, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # a tied LM head is the embedding: counted once
            continue
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        total += nbytes * share if component_of(name) == "routed_experts" else nbytes
    return round(total)
