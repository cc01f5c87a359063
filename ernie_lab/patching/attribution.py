"""Attribution patching: a first-order estimate of every activation patch from one forward and one
backward pass on the base run (Nanda, "Attribution Patching", 2023; Syed et al. 2023).

    m(patched) - m(base) ~= (a_source - a_base) . dm/da |_{a_base}

summed over the patched elements (``d_model`` of a residual position, ``d_head`` of a head, the
``d_model`` output of an expert slot), then normalised exactly as in ``patching.py``. The result has
the layout of the exact grid (same key columns, ``metric`` = the estimated patched metric,
``effect``), so the two can be merged with :func:`merge_effects`. The estimate is exact when the
metric is linear in the activation (e.g. a linear readout downstream of the patched point) and
degrades as the patch moves the model further from a_base.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ernie_lab.noise import DEFAULT_LEVEL, DEFAULT_N_BOOT, fit_through_origin
from ernie_lab.patching.metrics import Metric, reduce_metric
from ernie_lab.patching.moe import source_for_expert
from ernie_lab.patching.setup import RESIDUAL_HOOKS, Hooks, PatchingRuns

ATTRIBUTION_HOOKS = (*RESIDUAL_HOOKS, "z", "expert_out")
_KEYS = ("hook", "layer", "pos", "head", "expert")


def _hook_name(hook: str, L: int) -> str:
    if hook == "z":
        return f"blocks.{L}.attn.hook_z"
    if hook == "expert_out":
        return f"blocks.{L}.moe.hook_expert_out"
    return f"blocks.{L}.hook_{hook}"


def gradients(setup: PatchingRuns, names: list[str]) -> dict[str, torch.Tensor]:
    """``dm/da`` at the base run for each hook ``name`` (``m`` = the mean metric over prompts).

    One forward and one backward pass; ``torch.autograd.grad`` leaves parameters' ``.grad`` untouched.
    """
    kept: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook) -> None:
        kept[hook.name] = x

    def track(x: torch.Tensor, hook) -> torch.Tensor:
        # a model with frozen parameters still needs a graph from the embeddings on
        return x if x.requires_grad else x.detach().requires_grad_(True)

    hooks = [("hook_embed", track), *setup.fwd_hooks, *[(n, keep) for n in names]]
    with torch.enable_grad(), setup.model.hooks(fwd_hooks=hooks):
        m = reduce_metric(setup.metric(setup.model(setup.base_ids)))
        grads = torch.autograd.grad(m, [kept[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(kept[n]) if g is None else g.detach() for n, g in zip(names, grads, strict=True)}


def attribute(setup: PatchingRuns, hook: str = "resid_pre", layers=None, per_position: bool = True) -> pd.DataFrame:
    """Attribution-patching grid of ``setup`` for ``hook`` over ``layers`` (default: all; MoE layers for
    ``"expert_out"``).

    ``hook``: a residual point (``"resid_pre"``, ``"attn_out"``, ``"mlp_out"``, ...) -> rows hook,
    layer, [pos, token,] metric, effect; ``"z"`` -> hook, layer, [pos, token,] head, ...;
    ``"expert_out"`` -> layer, expert, n_positions, ... as :func:`ernie_lab.patching.moe.expert_grid`.
    ``per_position=False`` sums over positions (residual and z), like the exact grids' option.
    ``metric`` is the estimate ``m(base) + delta``.
    """
    if hook not in ATTRIBUTION_HOOKS:
        raise ValueError(f"hook must be one of {ATTRIBUTION_HOOKS}, got {hook!r}")
    layers = setup._layers(layers, moe_only=hook == "expert_out")
    names = [_hook_name(hook, L) for L in layers]
    grads = gradients(setup, names)
    if hook == "expert_out":
        return _expert_rows(setup, layers, grads)
    base, source = setup.acts("base", names), setup.acts("source", names)
    rows, deltas = [], []
    for L, name in zip(layers, names, strict=True):
        # [batch pos] or [batch pos head]: first-order change of the mean metric per prompt, summed over d_model/d_head
        contrib = ((source[name] - base[name]).float() * grads[name].float()).sum(-1)
        if not per_position:
            contrib = contrib.sum(1, keepdim=True)
        per_row = contrib.cpu().numpy().reshape(contrib.shape[0], contrib.shape[1], -1)  # [batch pos head-or-1]
        for i in range(per_row.shape[1]):
            for h in range(per_row.shape[2]):
                keys = {"hook": hook, "layer": L} | ({"pos": i} if per_position else {})
                rows.append(keys | ({"head": h} if hook == "z" else {}))
                deltas.append(per_row[:, i, h])
    return setup._frame(rows, _estimates(setup, deltas))


def _estimates(setup: PatchingRuns, deltas: list[np.ndarray]) -> np.ndarray:
    """Estimated patched metrics from per-prompt first-order changes of the *mean* metric ``[batch]`` each:
    ``[row batch]`` per prompt (prompt i's own change is ``batch *`` its share) when the metric is per prompt,
    else ``[row 1]``."""
    d = np.asarray(deltas, dtype=np.float64).reshape(len(deltas), -1)
    if setup.base_rows.shape[0] == d.shape[1] > 1:
        return setup.base_rows[None, :] + d.shape[1] * d
    return setup.m_base + d.sum(1, keepdims=True)


def attribution_patching(
    model,
    clean_ids,
    corrupt_ids,
    metric: Metric,
    hook: str = "resid_pre",
    *,
    layers=None,
    per_position: bool = True,
    direction: str = "denoising",
    tokenizer=None,
    fwd_hooks: Hooks = (),
    level: float = DEFAULT_LEVEL,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> pd.DataFrame:
    """Attribution patching of ``clean_ids``/``corrupt_ids`` (see :class:`PatchingSetup`) at ``hook``;
    rows as :func:`attribute`. With a setup at hand, ``setup.attribution(hook)`` reuses its runs."""
    setup = PatchingRuns(
        model, clean_ids, corrupt_ids, metric, direction=direction, tokenizer=tokenizer, fwd_hooks=fwd_hooks,
        progress=False, level=level, n_boot=n_boot, seed=seed,
    )  # fmt: skip
    return attribute(setup, hook, layers=layers, per_position=per_position)


def _expert_rows(setup: PatchingRuns, layers: list[int], grads: dict) -> pd.DataFrame:
    """Per (layer, expert): sum over slots where the expert runs in both, of the aligned source output
    minus the base output, dotted with the gradient at that slot."""
    rows, deltas = [], []
    for L in layers:
        idx_name, out_name = f"blocks.{L}.moe.hook_topk_idx", f"blocks.{L}.moe.hook_expert_out"
        base = setup.acts("base", [idx_name, out_name])
        src = setup.acts("source", [idx_name, out_name])
        for e in range(setup.model.config.moe_num_experts):
            selected, value = source_for_expert(src[idx_name], src[out_name], e)
            mask = (base[idx_name] == e) & selected  # [batch pos topk]
            contrib = ((value - base[out_name]).float() * grads[out_name].float()).sum(-1)
            rows.append({"layer": L, "expert": e, "n_positions": int(mask.any(-1).sum())})
            deltas.append((contrib * mask).flatten(1).sum(1).cpu().numpy())
    return setup._frame(rows, _estimates(setup, deltas))


def merge_effects(exact_df: pd.DataFrame, attr_df: pd.DataFrame, value: str = "effect") -> pd.DataFrame:
    """Inner join of an exact grid and an attribution grid on their shared key columns;
    ``value`` becomes ``{value}_exact`` and ``{value}_attr``."""
    keys = [k for k in _KEYS if k in exact_df.columns and k in attr_df.columns]
    if not keys:
        raise ValueError(f"the frames share none of the key columns {_KEYS}")
    left = exact_df[[*keys, value]].rename(columns={value: f"{value}_exact"})
    right = attr_df[[*keys, value]].rename(columns={value: f"{value}_attr"})
    return left.merge(right, on=keys, how="inner")


def compare_attribution(exact_df: pd.DataFrame, attr_df: pd.DataFrame, value: str = "effect") -> float:
    """Pearson correlation between exact and attribution-patching ``value`` over matching rows
    (NaN rows dropped). Raises ValueError with fewer than two rows to compare."""
    merged = merge_effects(exact_df, attr_df, value).dropna()
    if len(merged) < 2:
        raise ValueError(f"only {len(merged)} matching rows; a correlation needs at least 2")
    return float(np.corrcoef(merged[f"{value}_exact"], merged[f"{value}_attr"])[0, 1])


def attribution_agreement(exact_df: pd.DataFrame, attr_df: pd.DataFrame, value: str = "effect") -> dict[str, float]:
    """How well attribution patching estimates exact patching over matching rows (NaN rows dropped):
    Pearson ``r``; the least-squares ``slope`` of attribution on exact through the origin and that fit's
    ``r2``; ``r2_identity``, the R² of y = x (:func:`ernie_lab.noise.fit_through_origin`; slope 1 and
    r2_identity 1 = attribution equals exact; r alone hides a systematic under-estimate such as slope
    0.5); and ``n``. Fewer than two rows: ValueError."""
    merged = merge_effects(exact_df, attr_df, value)
    return fit_through_origin(merged[f"{value}_exact"], merged[f"{value}_attr"])
