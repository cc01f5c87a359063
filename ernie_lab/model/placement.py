"""Where each part of a model goes: one device, or ``"auto"`` (layers spread over the visible GPUs).

The model is cut at module boundaries that ``ErnieMoE.forward_unchecked`` already crosses safely
(it moves activations to the next block's device): the embedding, each decoder layer, the final norm
and the LM head. A placement is a function from a state_dict key to a device.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

# transformers keeps exactly these in fp32 whatever the model dtype (_keep_in_fp32_modules_strict)
_FP32_KEY = re.compile(r"(\.mlp\.gate\.weight|\.e_score_correction_bias)$")


def is_fp32_key(key: str) -> bool:
    """Whether the checkpoint tensor ``key`` stays fp32 whatever the model dtype (router, correction bias)."""
    return bool(_FP32_KEY.search(key))


# fraction of each GPU's free memory left for activations, the KV cache and the CUDA context
GPU_HEADROOM = 0.10

_UNIT = re.compile(r"^(model\.layers\.\d+|model\.embed_tokens|model\.norm|lm_head)(\.|$)")

Placement = Callable[[str], torch.device]


def unit_of(key: str) -> str:
    """The placement unit of a state_dict key: ``model.embed_tokens``, ``model.layers.{i}``,
    ``model.norm`` or ``lm_head``."""
    m = _UNIT.match(key)
    if m is None:
        raise KeyError(f"{key!r} belongs to no placement unit (embed_tokens, layers.N, norm, lm_head)")
    return m.group(1)


def unit_bytes(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Bytes per placement unit in ``dtype`` (router tensors and quantization scales in fp32, integer
    tensors in their own dtype), in forward order.

    ``model`` may live on the meta device. A tied ``lm_head.weight`` is counted with the embedding.
    """
    sizes: dict[str, int] = {}
    tied = model.config.tie_word_embeddings
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key == "lm_head.weight" and tied:
            continue
        # quantized weights (model/quant.py): integer codes keep their size, their scales are fp32
        fp32 = is_fp32_key(key) or key.endswith(("_absmax", "_scale"))
        itemsize = tensor.element_size() if not tensor.is_floating_point() else 4 if fp32 else dtype.itemsize
        unit = unit_of(key)
        sizes[unit] = sizes.get(unit, 0) + tensor.numel() * itemsize
    order = ["model.embed_tokens"] + [u for u in sizes if u.startswith("model.layers.")] + ["model.norm", "lm_head"]
    return {u: sizes.get(u, 0) for u in order}


def gpu_budgets(headroom: float = GPU_HEADROOM) -> dict[torch.device, int]:
    """Free bytes per visible CUDA GPU, less ``headroom``; empty without CUDA."""
    budgets = {}
    for i in range(torch.cuda.device_count()):
        free, _total = torch.cuda.mem_get_info(i)
        budgets[torch.device("cuda", i)] = int(free * (1.0 - headroom))
    return budgets


def plan_auto(sizes: Mapping[str, int], budgets: Mapping[torch.device, int], tied: bool) -> dict[str, torch.device]:
    """Unit -> device, filling the GPUs of ``budgets`` in order, then the CPU.

    Units are placed in forward order and the device index never goes back, so the embedding sits on
    the first GPU, the final norm and LM head after the last layer, and activations move forward only.
    A tied LM head shares the embedding's weight, so it stays on the embedding's device.
    """
    devices = list(budgets) + [torch.device("cpu")]
    left = [budgets[d] for d in budgets] + [float("inf")]
    plan: dict[str, torch.device] = {}
    d = 0
    for unit, nbytes in sizes.items():
        if unit == "lm_head" and tied:  # only the bias (if any) is left to place, next to the weight
            plan[unit] = plan["model.embed_tokens"]
            left[devices.index(plan[unit])] -= nbytes
            continue
        while nbytes > left[d]:
            d += 1
        plan[unit] = devices[d]
        left[d] -= nbytes
    return plan


def check_device(device: torch.device) -> torch.device:
    """``device`` if this machine has it, else a ValueError saying so (torch raises an AssertionError
    for a CUDA device in a CPU-only build, and much later for a GPU index that does not exist)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"device {str(device)!r} is not available here: this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' is not available here (torch.backends.mps.is_available() is False)")
    return device


def make_placement(model: nn.Module, dtype: torch.dtype, device: str | torch.device | None) -> Placement:
    """``device`` None -> CPU; a device -> everything there; ``"auto"`` -> :func:`plan_auto` over the
    visible GPUs by free memory (CPU only when no GPU is visible)."""
    if device is None or str(device) != "auto":
        try:
            single = torch.device(device or "cpu")
        except (TypeError, RuntimeError) as err:
            raise ValueError(
                f"device must be None, 'auto' or a torch device ('cpu', 'cuda:0'...), got {device!r}"
            ) from err
        check_device(single)
        return lambda key: single
    budgets = gpu_budgets()
    sizes = unit_bytes(model, dtype)
    plan = plan_auto(sizes, budgets, model.config.tie_word_embeddings)
    used = sorted({str(d) for d in plan.values()})
    if budgets:
        logger.info("device='auto': %s", ", ".join(f"{d}: {_count(plan, d)} units" for d in used))
        if torch.device("cpu") in plan.values():
            logger.warning("device='auto': the model does not fit on the GPUs; some layers stay on the CPU")
    return lambda key: plan[unit_of(key)]


def _count(plan: dict[str, torch.device], device: str) -> int:
    return sum(str(d) == device for d in plan.values())
