"""Pruning curves (README, Definitions: "Expert ablation"): the loss as the n least important experts of a
layer are ablated together, ranked on one half of the texts and evaluated on the other, beside random
orders of the same layer (the control) and with bootstrap intervals over sequences."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from ernie_lab.ablation.core import MODES, ablation_hooks, mean_outputs, run_per_sequence
from ernie_lab.ablation.effects import expert_importance, summarise
from ernie_lab.io.datasets import as_sequences, check_batch_size
from ernie_lab.model.checks import as_ints, moe_layer
from ernie_lab.noise import DEFAULT_DRAWS, DEFAULT_LEVEL, DEFAULT_N_BOOT, check_interval, split_sequences
from ernie_lab.routing import collect_routing, expert_load

__all__ = ["pruning_curve"]


def _order(model, sequences, discover, layer, order_by, mode, importance, batch_size, progress) -> tuple[list, bool]:
    """Experts of ``layer`` least important first, and whether the ranking saw only the discover texts."""
    if order_by == "load":
        found = collect_routing(model, [sequences[i] for i in discover], batch_size=batch_size, progress=False)
        table = expert_load(found)
        return [int(e) for e in table[table["layer"] == layer].sort_values(["load", "expert"])["expert"]], True
    if order_by != "importance":
        raise ValueError(f"order_by must be 'importance' or 'load', got {order_by!r}")
    if importance is None:
        importance = expert_importance(
            model, [sequences[i] for i in discover], [layer], mode, split=None, controls=0, n_boot=1,
            batch_size=batch_size, progress=progress,
        )  # fmt: skip
        own = True
    else:  # a given table: trust its own split record (an in-sample table saw every text of its dataset)
        own = "split" in importance.columns and not importance["split"].astype(str).str.contains("in sample").any()
    rows = importance[importance["layer"] == layer]
    if "control" in rows.columns:
        rows = rows[~rows["control"].astype(bool)]
    key = "rank" if "rank" in rows.columns else "delta_loss"
    ranked = rows.sort_values([key, "expert"], ascending=[key == "delta_loss", True])
    return [int(e) for e in ranked["expert"]], own


def pruning_curve(
    model,
    dataset: Any,
    layer: int,
    order_by: str = "importance",
    steps: Iterable[int] | None = None,
    mode: str = "zero",
    *,
    importance: pd.DataFrame | None = None,
    split: Any = "halves",
    controls: int = DEFAULT_DRAWS,
    level: float = DEFAULT_LEVEL,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    reference_ids: Any = None,
    tokenizer: Any = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Loss as the n least important experts of ``layer`` are ablated together, n in ``steps``.

    ``split`` (default ``"halves"``, see :func:`ernie_lab.noise.split_sequences`): the order is found on
    the discover half and the curve measured on the evaluate half. ``order_by``: "importance" (least
    important first: highest ``rank`` of ``importance``, an ``expert_importance`` frame, computed on the
    discover half when not given — a given frame should come from the same split, its ``split`` column
    is trusted) or "load" (ascending load on the discover half). ``steps`` default to n = 0..E for zero
    and mean ablation, and n = 0..E-k for reroute (rerouting needs k experts left). n = 0 is the
    un-ablated model. ``controls``: random orders of the layer's experts, averaged per sequence, as rows
    with ``order_by="random"`` and ``control=True``.
    Columns: layer, order_by, mode, n_ablated, frac_ablated (n/E), loss, delta_loss, ci_low, ci_high (of
    delta_loss, over sequences), n_seq, kl, ablated, control, held_out (True when the ranking did not
    see the evaluated texts).
    """
    cfg = model.config
    n_expert = cfg.moe_num_experts
    layer = moe_layer(cfg, layer)
    check_batch_size(batch_size)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if order_by not in ("importance", "load"):
        raise ValueError(f"order_by must be 'importance' or 'load', got {order_by!r}")
    if isinstance(controls, bool) or not isinstance(controls, int) or controls < 0:
        raise ValueError(f"controls (random orders) must be an integer >= 0, got {controls!r}")
    check_interval(level, n_boot)
    max_n = n_expert - cfg.moe_k if mode == "reroute" else n_expert
    what = f"steps (0..{max_n} for mode={mode!r}, E={n_expert}, k={cfg.moe_k})"
    steps = list(range(max_n + 1)) if steps is None else as_ints(steps, what, 0, max_n + 1)
    sequences = as_sequences(dataset, tokenizer)
    halves = split_sequences(len(sequences), split)
    order, own = _order(model, sequences, halves.discover, layer, order_by, mode, importance, batch_size, progress)
    if sorted(order) != list(range(n_expert)):
        raise ValueError(f"the ordering table does not list each of the {n_expert} experts of layer {layer} once")
    rng = np.random.default_rng(seed + layer)
    orders = [order] + [[int(e) for e in rng.permutation(n_expert)] for _ in range(controls)]
    means = None
    if mode == "mean":
        reference = dataset if reference_ids is None else reference_ids
        means = mean_outputs(model, reference, {layer: range(n_expert)}, tokenizer, batch_size)
    hook_sets = [ablation_hooks(model, {layer: o[:n]}, mode, means) for o in orders for n in steps]
    per = run_per_sequence(model, sequences, hook_sets, batch_size, progress, rows=halves.evaluate)
    ablated = per.ablated.numpy().reshape(len(orders), len(steps), -1)
    kl = per.kl.numpy().reshape(len(orders), len(steps), -1)
    held_out = bool(halves.held_out and own)
    curves = [(order_by, ablated[0], kl[0], [str(order[:n]) for n in steps])]
    if controls:  # each sequence's sums averaged over the random orders
        names = [f"{n} random ({controls} draws)" for n in steps]
        curves.append(("random", ablated[1:].mean(0), kl[1:].mean(0), names))
    frames = []
    for label, a, k, names in curves:
        s = summarise(per, halves.evaluate, a, k, level=level, n_boot=n_boot, seed=seed)
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "order_by": label,
                    "mode": mode,
                    "n_ablated": steps,
                    "frac_ablated": [n / n_expert for n in steps],
                    "loss": s["nll_ablated"],
                    "delta_loss": s["delta_loss"],
                    "ci_low": s["ci_low"],
                    "ci_high": s["ci_high"],
                    "n_seq": s["n_seq"],
                    "kl": s["kl"],
                    "ablated": names,
                    "control": label == "random",
                    "held_out": held_out,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
