"""Activation patching of the MoE layers: routing patching and expert-output patching (README, Definitions).

Routing patching takes ``hook_topk_idx`` and ``hook_topk_weights`` from the source run: the base
run's experts still compute on the base run's inputs, but the source run decides which experts run
and how they mix. Expert-output patching does the converse for one expert: where expert e is selected
in both runs, its ``hook_expert_out`` slot in the base run takes e's output from the source run (e may
sit in another top-k slot there); routing weights stay the base run's. Together they separate
"which experts ran" from "what they computed".

Axes: batch pos topk d_model expert; ``rows`` = the repeated batch of a chunk of patches.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ernie_lab.model.checks import as_ints
from ernie_lab.noise import DEFAULT_LEVEL, DEFAULT_N_BOOT
from ernie_lab.patching.metrics import Metric
from ernie_lab.patching.setup import Hooks, PatchingRuns


def source_for_expert(src_idx: torch.Tensor, src_out: torch.Tensor, expert) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the source run selected ``expert`` and what it output there.

    ``src_idx [... pos topk]``, ``src_out [... pos topk d_model]``, ``expert`` an int or a tensor
    broadcastable to ``src_idx`` (e.g. ``[rows 1 1]``; -1 matches nothing). Returns
    ``selected [... pos 1]`` (bool) and ``value [... pos 1 d_model]`` (e's output; arbitrary where
    not selected), ready to broadcast over the base run's topk slots.
    """
    in_src = src_idx == expert
    slot = in_src.int().argmax(-1, keepdim=True)  # the one slot holding e (top-k picks distinct experts)
    value = src_out.gather(-2, slot[..., None].expand(*slot.shape, src_out.shape[-1]))
    return in_src.any(-1, keepdim=True), value


def routing_grid(setup: PatchingRuns, layers=None, positions=None, per_position: bool = False) -> pd.DataFrame:
    """Patch the routing of each MoE layer (all positions, or each position with ``per_position``).

    Rows: layer, [pos, token,] n_rerouted (prompt-positions whose selected expert set differs
    between the runs), metric, effect.
    """
    rows, patches = [], []
    for L in setup._layers(layers, moe_only=True):
        idx_name, w_name = f"blocks.{L}.moe.hook_topk_idx", f"blocks.{L}.moe.hook_topk_weights"
        base_idx, src_idx = setup.acts("base", [idx_name])[idx_name], setup.acts("source", [idx_name])[idx_name]
        differs = (base_idx.sort(-1).values != src_idx.sort(-1).values).any(-1).cpu()  # [batch pos]
        for pos in setup._positions(positions) if per_position else [None]:
            mask = torch.zeros(setup.n_prompts, setup.n_pos, dtype=torch.bool)
            mask[:, slice(None) if pos is None else pos] = True
            patches.append({idx_name: mask, w_name: mask})
            where = {} if pos is None else {"pos": pos}
            rows.append({"layer": L} | where | {"n_rerouted": int(differs[mask].sum())})
    return setup._frame(rows, setup.run_patch_rows(patches, setup.masked_hooks, "patch routing"))


def expert_grid(setup: PatchingRuns, layers=None, experts=None) -> pd.DataFrame:
    """Patch each expert's output, per (MoE layer, expert), at every prompt-position where the expert
    is selected in both runs.

    Rows: layer, expert, n_positions (prompt-positions patched; 0 = nothing to patch, effect 0 and
    no forward pass), metric, effect.
    """
    n_expert = setup.model.config.moe_num_experts
    experts = list(range(n_expert)) if experts is None else as_ints(experts, "experts", 0, n_expert, scalar=True)
    rows, todo = [], []
    for L in setup._layers(layers, moe_only=True):
        name = f"blocks.{L}.moe.hook_topk_idx"
        base_idx, src_idx = setup.acts("base", [name])[name], setup.acts("source", [name])[name]
        for e in experts:
            n = int(((base_idx == e).any(-1) & (src_idx == e).any(-1)).sum())
            rows.append({"layer": L, "expert": e, "n_positions": n})
            if n:
                todo.append((len(rows) - 1, (L, e)))
    metrics = np.tile(setup.base_rows, (len(rows), 1))  # [row batch]: unpatched rows keep the base run's values
    if todo:
        hooks = lambda chunk: _expert_hooks(setup, chunk)
        metrics[[i for i, _ in todo]] = setup.run_patch_rows([p for _, p in todo], hooks, "patch experts")
    return setup._frame(rows, metrics)


def _expert_hooks(setup: PatchingRuns, chunk: list[tuple[int, int]]) -> Hooks:
    """Per layer: read this run's own ``hook_topk_idx``, then give each row's expert the source output
    at the slot it occupies in this run (so routing round-off can never misalign slots)."""
    hooks, n = [], len(chunk)
    for L in dict.fromkeys(L for L, _ in chunk):
        idx_name, out_name = f"blocks.{L}.moe.hook_topk_idx", f"blocks.{L}.moe.hook_expert_out"
        src = setup.acts("source", [idx_name, out_name])
        expert = torch.tensor([e if layer == L else -1 for layer, e in chunk]).repeat_interleave(setup.n_prompts)
        selected, value = source_for_expert(
            src[idx_name].repeat(n, 1, 1),
            src[out_name].repeat(n, 1, 1, 1),
            expert.to(src[idx_name].device)[:, None, None],
        )
        hooks += _swap_hooks(idx_name, out_name, expert, selected, value)
    return hooks


def _swap_hooks(idx_name: str, out_name: str, expert, selected, value) -> Hooks:
    """``expert [rows]`` (-1: leave the row alone), ``selected [rows pos 1]``, ``value [rows pos 1 d_model]``."""
    seen: dict[str, torch.Tensor] = {}

    def grab(idx: torch.Tensor, hook) -> None:
        seen["idx"] = idx

    def swap(out: torch.Tensor, hook) -> torch.Tensor:
        mask = (seen["idx"] == expert.to(out.device)[:, None, None]) & selected.to(out.device)
        return torch.where(mask[..., None], value.to(out.device), out)

    return [(idx_name, grab), (out_name, swap)]


def patch_experts(
    model,
    clean_ids,
    corrupt_ids,
    metric: Metric,
    *,
    layers=None,
    experts=None,
    direction: str = "denoising",
    fwd_hooks: Hooks = (),
    batch_size: int = 32,
    progress: bool = True,
    level: float = DEFAULT_LEVEL,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> pd.DataFrame:
    """Expert-output patching per (MoE layer, expert); see :func:`expert_grid` and :class:`PatchingSetup`."""
    setup = PatchingRuns(
        model, clean_ids, corrupt_ids, metric, direction=direction, fwd_hooks=fwd_hooks, batch_size=batch_size,
        progress=progress, level=level, n_boot=n_boot, seed=seed,
    )  # fmt: skip
    return expert_grid(setup, layers=layers, experts=experts)


def patch_routing(
    model,
    clean_ids,
    corrupt_ids,
    metric: Metric,
    *,
    layers=None,
    positions=None,
    per_position: bool = False,
    direction: str = "denoising",
    tokenizer=None,
    fwd_hooks: Hooks = (),
    batch_size: int = 32,
    progress: bool = True,
    level: float = DEFAULT_LEVEL,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> pd.DataFrame:
    """Routing patching per MoE layer (and position); see :func:`routing_grid` and :class:`PatchingSetup`."""
    setup = PatchingRuns(
        model, clean_ids, corrupt_ids, metric, direction=direction, tokenizer=tokenizer, fwd_hooks=fwd_hooks,
        batch_size=batch_size, progress=progress, level=level, n_boot=n_boot, seed=seed,
    )  # fmt: skip
    return routing_grid(setup, layers=layers, positions=positions, per_position=per_position)
