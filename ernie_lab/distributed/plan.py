"""The automatic tensor + expert parallel plan of ERNIE 4.5 MoE: module path -> parallel style.

Attention: q/k/v split by heads (column-parallel), o_proj row-parallel. Dense MLP and shared experts:
gate/up column-parallel, down row-parallel. Routed experts: whole experts per rank. Router, norms,
embedding and LM head: replicated (no entry). The hook points of split activations are listed with
their split axis (``batch pos head d_head`` -> 2, ``batch head pos kv_pos`` -> 1, ``batch pos d_ff``
-> 2).
"""

from __future__ import annotations

import fnmatch

import torch
from torch.distributed.tensor.parallel import ParallelStyle

from ernie_lab.distributed.styles import ColwiseShard, ExpertParallel, GatherHooks, RowwiseShard
from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.ernie import ErnieMoE
from ernie_lab.model.placement import is_fp32_key

HEAD_POINTS = {
    "hook_q": 2,
    "hook_k": 2,
    "hook_v": 2,
    "hook_rot_q": 2,
    "hook_rot_k": 2,
    "hook_attn_scores": 1,
    "hook_pattern": 1,
    "hook_z": 2,
}
FF_POINTS = {"hook_pre": 2, "hook_post": 2}


def split_sizes(config: ErnieConfig) -> dict[str, int]:
    """The sizes ``tp_plan="auto"`` divides by the number of processes."""
    sizes = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    moe = set(config.moe_layers)
    if len(moe) < config.num_hidden_layers:
        sizes["intermediate_size"] = config.intermediate_size
    if moe:
        sizes["moe_num_experts"] = config.moe_num_experts
        if config.moe_num_shared_experts:
            sizes["moe_intermediate_size * moe_num_shared_experts"] = config.d_shared
    return sizes


def valid_sizes(config: ErnieConfig) -> list[int]:
    """Every process count ``tp_plan="auto"`` accepts for ``config``."""
    sizes = split_sizes(config).values()
    return [n for n in range(1, min(sizes) + 1) if all(s % n == 0 for s in sizes)]


def check_size(config: ErnieConfig, n: int) -> None:
    """Raise ValueError naming the sizes that do not divide by ``n`` and the counts that work."""
    bad = {k: v for k, v in split_sizes(config).items() if v % n}
    if bad:
        listed = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise ValueError(
            f"tp_plan='auto' cannot split this model over {n} processes: {listed} not divisible by {n}; "
            f"it splits over {valid_sizes(config)} processes (torchrun --nproc_per_node)"
        )


def auto_plan(config: ErnieConfig, n: int) -> dict[str, ParallelStyle]:
    """Module path -> style for ``n`` processes (checked first with :func:`check_size`)."""
    check_size(config, n)
    plan: dict[str, ParallelStyle] = {
        "model.layers.*.self_attn": GatherHooks(HEAD_POINTS),
        "model.layers.*.self_attn.q_proj": ColwiseShard(),
        "model.layers.*.self_attn.k_proj": ColwiseShard(),
        "model.layers.*.self_attn.v_proj": ColwiseShard(),
        "model.layers.*.self_attn.o_proj": RowwiseShard(),
    }
    for i in range(config.num_hidden_layers):
        mlp = f"model.layers.{i}.mlp"
        if not config.is_moe_layer(i):
            plan[mlp] = GatherHooks(FF_POINTS)
        else:
            plan[mlp] = ExpertParallel()
            if not config.moe_num_shared_experts:
                continue
            mlp += ".shared_experts"
        plan[f"{mlp}.gate_proj"] = ColwiseShard()
        plan[f"{mlp}.up_proj"] = ColwiseShard()
        plan[f"{mlp}.down_proj"] = RowwiseShard()
    return plan


def rank_bytes(config: ErnieConfig, n: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Parameter and buffer bytes each of ``n`` processes holds under :func:`auto_plan` (router and
    correction bias in fp32, the rest in ``dtype``; a tied LM head counted once)."""
    split, replicated = memory_split(config, n, dtype)
    return split + replicated


def memory_split(config: ErnieConfig, n: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(bytes of this process's share of the split tensors, bytes of the replicated ones) under
    :func:`auto_plan` over ``n`` processes. Counted on a meta model: nothing is allocated."""
    plan = auto_plan(config, n)
    with torch.device("meta"):
        model = ErnieMoE(config, init=False)
    sharded = {
        f"{path}.{name}"
        for path, _ in model.named_modules()
        for pattern, style in plan.items()
        if fnmatch.fnmatch(path, pattern)
        for name in style.sharded
    }
    split = replicated = 0
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        nbytes = t.numel() * (4 if is_fp32_key(name) else dtype.itemsize)
        if name in sharded:
            split += nbytes // n
        else:
            replicated += nbytes
    return split, replicated
