"""Expert ablation effects on a dataset (README, Definitions: "Expert ablation"), each with its noise floor.

The ablations themselves are hooks from ``ernie_lab.interventions`` (zero / reroute / mean); this
module measures what they do to the loss: ``Δloss = mean NLL(ablated) - mean NLL(base)`` over predicted
tokens and ``KL(p_base || p_ablated)`` per position, overall and per token group; the importance of each
expert alone; pruning curves. Every effect comes with (README, "Noise floors"):

- ``ci_low`` / ``ci_high`` / ``n_seq``: a percentile bootstrap interval over sequences (``level``,
  ``n_boot`` resamples, ``seed``) computed from stored per-sequence sums (:mod:`ernie_lab.noise`);
- rows with ``control=True``: the same intervention on random experts of the same layers and count,
  drawn from those not picked, ``controls`` draws averaged (0: none);
- where experts are ranked from data (importance, pruning order), a ``split`` (default ``"halves"``):
  rank on one half of the sequences, measure on the other.

Datasets are anything ``ernie_lab.io.datasets.as_sequences`` accepts (token-id lists or tensors, a 2-D
tensor, tokenizer batches; texts with ``tokenizer=``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ernie_lab.ablation.core import MODES, PerSequence, ablation_hooks, mean_outputs, run_per_sequence, token_nll
from ernie_lab.io.datasets import as_sequences, check_batch_size
from ernie_lab.model.checks import expert_map, moe_layers
from ernie_lab.noise import (
    DEFAULT_DRAWS,
    DEFAULT_LEVEL,
    DEFAULT_N_BOOT,
    check_interval,
    control_draws,
    percentile_interval,
    resample_weights,
    resampled_means,
    split_sequences,
)

__all__ = ["token_nll", "ablation_hooks", "ablation_effect", "expert_importance", "summarise"]


def summarise(
    per: PerSequence,
    rows: Sequence[int],
    ablated: np.ndarray,
    kl: np.ndarray,
    *,
    level: float,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Token-weighted means over the sequences ``rows`` for each ablation: ``ablated`` / ``kl``
    ``[ablation seq]`` per-sequence sums (rows of ``per.ablated``, or averages of several). Returns
    n_tokens, n_seq, nll_base, nll_ablated, delta_loss, ci_low, ci_high (bootstrap over the sequences,
    one set of resamples for every ablation) and kl."""
    rows = np.asarray(rows, dtype=np.int64)
    count, base = per.count.numpy()[rows], per.base.numpy()[rows]
    ablated, kl = np.asarray(ablated)[:, rows], np.asarray(kl)[:, rows]
    n = count.sum()
    delta = (ablated - base).T  # [seq ablation]: per-sequence Δloss sums
    weights = resample_weights(len(rows), n_boot, seed)
    low, high = percentile_interval(resampled_means(delta, count, weights=weights), level)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "n_tokens": int(n),
            "n_seq": len(rows),
            "nll_base": base.sum() / n,
            "nll_ablated": ablated.sum(1) / n,
            "delta_loss": delta.sum(0) / n,
            "ci_low": low,
            "ci_high": high,
            "kl": kl.sum(1) / n,
        }


def _label(experts: Mapping[int, Iterable[int]]) -> str:
    return "; ".join(f"L{L}: {sorted(int(e) for e in es)}" for L, es in sorted(experts.items()))


def _check_layers(cfg, layers: Iterable[int]) -> list[int]:
    return moe_layers(cfg, list(layers))


def _group_rows(n_seq: int, groups) -> list[tuple[str, np.ndarray]]:
    """("all", every sequence) and one (label, sequences) per group label, sorted."""
    out = [("all", np.arange(n_seq))]
    if groups is None:
        return out
    groups = list(groups)
    if len(groups) != n_seq:
        raise ValueError(f"groups has {len(groups)} labels but the dataset has {n_seq} sequences")
    codes, names = pd.factorize(pd.Series(groups, dtype=object), sort=True)
    return out + [(name, np.flatnonzero(codes == i)) for i, name in enumerate(names)]


def ablation_effect(
    model,
    dataset_ids: Any,
    experts: Mapping[int, Iterable[int]],
    mode: str = "zero",
    groups: Sequence[Any] | None = None,
    reference_ids: Any = None,
    batch_size: int = 8,
    *,
    tokenizer: Any = None,
    controls: int = DEFAULT_DRAWS,
    level: float = DEFAULT_LEVEL,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Effect of ablating ``experts`` ({layer: [expert, ...]}) together on a dataset, with its noise floor.

    ``mode``: zero | reroute | mean (mean outputs over ``reference_ids``, default the dataset itself).
    ``groups``: one label per sequence; the result has a row ``group="all"`` and one per label.
    ``controls``: random draws of the same number of experts per layer from those not ablated (seeded by
    ``seed``); their effects, averaged per sequence over the draws, are the rows with ``control=True``.
    Columns: group, n_tokens, n_seq, nll_base, nll_ablated, delta_loss (= nll_ablated - nll_base, mean NLL
    per predicted token), ci_low, ci_high (``level`` bootstrap interval of delta_loss over sequences,
    ``n_boot`` resamples), kl (mean KL(p_base || p_ablated)), mode, experts, control.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_interval(level, n_boot)
    cfg = model.config
    experts = expert_map(cfg, experts)
    check_batch_size(batch_size)
    picked = {L: es for L, es in experts.items() if es}
    per_layer = {L: control_draws(cfg.moe_num_experts, es, controls, seed + L) for L, es in picked.items()}
    drawn = [{L: draws[d] for L, draws in per_layer.items()} for d in range(controls if picked else 0)]
    sequences = as_sequences(dataset_ids, tokenizer)
    group_rows = _group_rows(len(sequences), groups)
    means = None
    if mode == "mean":
        union = {L: sorted({*picked.get(L, ()), *(e for d in drawn for e in d.get(L, ()))}) for L in picked}
        reference = dataset_ids if reference_ids is None else reference_ids
        means = mean_outputs(model, reference, union, tokenizer, batch_size)
    hook_sets = [ablation_hooks(model, s, mode, means) for s in (experts, *drawn)]
    per = run_per_sequence(model, sequences, hook_sets, batch_size, progress)
    ablated, kl = per.ablated.numpy(), per.kl.numpy()
    if drawn:  # the control: each sequence's sums averaged over the draws
        ablated = np.stack([ablated[0], ablated[1:].mean(0)])
        kl = np.stack([kl[0], kl[1:].mean(0)])
    labels = [_label(experts)] + ([f"random: {' | '.join(_label(d) for d in drawn)}"] if drawn else [])
    frames = []
    for a, label in enumerate(labels):
        for i, (group, rows) in enumerate(group_rows):
            s = summarise(per, rows, ablated[[a]], kl[[a]], level=level, n_boot=n_boot, seed=seed + i)
            row = {k: (v[0] if isinstance(v, np.ndarray) else v) for k, v in s.items()}
            frames.append({"group": group, **row, "mode": mode, "experts": label, "control": a > 0})
    return pd.DataFrame(frames)


def expert_importance(
    model,
    dataset: Any,
    layers: Iterable[int] | None = None,
    mode: str = "zero",
    *,
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
    """Ablate each expert of each MoE layer alone; a ranked importance table per layer.

    ``split`` (see :func:`ernie_lab.noise.split_sequences`; default two interleaved halves of the
    sequences): ``rank`` comes from the Δloss on the discover half (``delta_loss_discover``); ``delta_loss``,
    its interval (``ci_low``, ``ci_high``, ``n_seq``) and ``kl`` are measured on the evaluate half, so a
    top-ranked expert is not flattered by the texts that ranked it. ``split=None`` uses every text for both.
    Control rows (``control=True``, expert -1, rank 0), one per layer: the per-sequence effects of
    ``controls`` random experts other than the layer's top-ranked one, averaged; ``experts`` names them.
    Other columns: layer, expert, load (share of routing slots on all the dataset's real tokens,
    un-ablated), nll_base, nll_ablated, n_tokens, mode, split (how the texts were split).
    Costs one base pass plus one pass per (layer, expert) for every batch.
    """
    cfg = model.config
    layers = _check_layers(cfg, cfg.moe_layers if layers is None else layers)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_interval(level, n_boot)
    control_draws(cfg.moe_num_experts, [0], controls, seed, count=1)  # argument check before the runs
    sequences = as_sequences(dataset, tokenizer)
    halves = split_sequences(len(sequences), split)
    pairs = [(L, e) for L in layers for e in range(cfg.moe_num_experts)]
    means = None
    if mode == "mean":
        every = {L: range(cfg.moe_num_experts) for L in layers}
        means = mean_outputs(model, dataset if reference_ids is None else reference_ids, every, tokenizer, batch_size)
    hook_sets = [ablation_hooks(model, {L: [e]}, mode, means) for L, e in pairs]
    rows = np.union1d(halves.discover, halves.evaluate)
    per = run_per_sequence(model, sequences, hook_sets, batch_size, progress, load_layers=layers, rows=rows)
    ablated, kl = per.ablated.numpy(), per.kl.numpy()
    found = summarise(per, halves.discover, ablated, kl, level=level, n_boot=1, seed=seed)
    frame = pd.DataFrame({"layer": [L for L, _ in pairs], "expert": [e for _, e in pairs]})
    frame["delta_loss_discover"] = found["delta_loss"]
    frame["rank"] = frame.groupby("layer")["delta_loss_discover"].rank(ascending=False, method="first").astype("int64")
    top = frame[frame["rank"] == 1].set_index("layer")["expert"]
    labels, extra_ablated, extra_kl = [], [], []
    for L in layers:
        draws = [d[0] for d in control_draws(cfg.moe_num_experts, [int(top[L])], controls, seed + L, count=1)]
        if draws:
            at = [pairs.index((L, e)) for e in draws]
            extra_ablated.append(ablated[at].mean(0))
            extra_kl.append(kl[at].mean(0))
            labels.append((L, f"random: {' | '.join(f'[{e}]' for e in draws)}"))
    if labels:
        ablated, kl = np.concatenate([ablated, np.stack(extra_ablated)]), np.concatenate([kl, np.stack(extra_kl)])
    measured = summarise(per, halves.evaluate, ablated, kl, level=level, n_boot=n_boot, seed=seed)
    controls_frame = pd.DataFrame(
        {"layer": [L for L, _ in labels], "expert": -1, "delta_loss_discover": np.nan, "rank": 0}
    )
    frame = pd.concat(
        [
            frame.assign(experts=[f"[{e}]" for e in frame["expert"]], control=False),
            controls_frame.assign(experts=[s for _, s in labels], control=True),
        ],
        ignore_index=True,
    )
    for key in ("delta_loss", "ci_low", "ci_high", "kl", "nll_ablated"):
        frame[key] = measured[key]
    selected = per.selected.numpy() / max(per.real_tokens * cfg.moe_k, 1)
    where = zip(frame["layer"], frame["expert"], strict=True)
    frame["load"] = [selected[layers.index(L), e] if e >= 0 else np.nan for L, e in where]
    frame = frame.assign(nll_base=measured["nll_base"], n_tokens=measured["n_tokens"], n_seq=measured["n_seq"])
    frame = frame.assign(mode=mode, split=halves.how)
    columns = [
        *("layer", "expert", "rank", "delta_loss", "ci_low", "ci_high", "n_seq", "kl", "load", "delta_loss_discover"),
        *("nll_base", "nll_ablated", "n_tokens", "mode", "split", "experts", "control"),
    ]
    frame["order"] = np.where(frame["control"], 10**6, frame["rank"])
    return frame.sort_values(["layer", "order"], ignore_index=True)[columns]
