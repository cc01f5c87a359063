"""Observational expert saliency (frequency, EAN, REAP, EASY-EP), pruning sets, and how well a
saliency score predicts the causal effect of ablating the expert.

Formulas: README "Definitions". REAP: CerebrasResearch/reap (arXiv 2510.13999);
EASY-EP: arXiv 2504.06792.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from ernie_lab.experts.collect import ExpertSums, expert_sums
from ernie_lab.model.checks import as_count, as_number, check_frame_finite

SALIENCY_COLUMNS = ("frequency", "weighted_frequency", "ean_mean", "reap", "easy_ep")


def saliency(
    model, data: Any, tokenizer: Any = None, batch_size: int = 8, progress: bool = True, check_finite: bool = True
) -> pd.DataFrame:
    """Per (layer, expert) saliency over the real tokens of ``data``, computed inside hooks.

    Columns: layer, expert, n_tokens (``|X_e|``), frequency (``|X_e| / N``), weighted_frequency
    (``sum_{X_e} g_e / N``), ean_mean (``mean_{X_e} ||f_e||``), reap (``mean_{X_e} g_e ||f_e||``),
    easy_ep (``sum_{X_e} g_e ||f_e|| (1 - cos(h, y)) / N``). Experts never selected get 0.
    Costs one forward pass per batch with the explicit expert path (``ernie-lab bench`` times it).
    NaN or inf at a router or expert point raises ``NonFiniteError`` (``check_finite=False`` to skip).
    """
    return saliency_frame(expert_sums(model, data, tokenizer, batch_size, progress, check_finite=check_finite))


def saliency_frame(s: ExpertSums) -> pd.DataFrame:
    """The :func:`saliency` table from accumulated :class:`ExpertSums`."""
    n = max(s.n_tokens, 1)
    selected = s.count.clamp(min=1)
    columns = {
        "n_tokens": s.count,
        "frequency": s.count / n,
        "weighted_frequency": s.gate / n,
        "ean_mean": s.norm / selected,
        "reap": s.gate_norm / selected,
        "easy_ep": s.easy / n,
    }
    frame = _grid(s.layers, s.count.shape[1], columns)
    return frame.astype({"n_tokens": "int64"})


def _grid(layers: list[int], n_expert: int, columns: dict[str, torch.Tensor]) -> pd.DataFrame:
    frame: dict[str, Any] = {"layer": np.repeat(layers, n_expert), "expert": np.tile(np.arange(n_expert), len(layers))}
    frame.update({k: v.double().reshape(-1).numpy() for k, v in columns.items()})
    return pd.DataFrame(frame)


def pruning_sets(
    df: pd.DataFrame, column: str = "reap", n: int | None = None, frac: float | None = None, check_finite: bool = True
) -> dict:
    """The ``n`` (or ``frac`` of E) least salient experts of each layer by ``df[column]``:
    ``{layer: [expert, ...]}``, the form ``el.ablation.ablation_effect`` and the ablation hooks take.
    Ties go to the lower expert id. ``n``: an integer >= 0; ``frac``: a number in [0, 1]; a
    non-finite score raises NonFiniteError (a set is never ranked on inf/NaN)."""
    if not isinstance(column, str) or column not in df.columns:
        raise KeyError(f"no column {column!r}; saliency columns: {list(SALIENCY_COLUMNS)}")
    if (n is None) == (frac is None):
        raise ValueError("pass exactly one of n (experts per layer) or frac (fraction of the layer's experts)")
    n = None if n is None else as_count(n, "n")
    frac = None if frac is None else as_number(frac, "frac", 0.0, 1.0)
    if check_finite:
        check_frame_finite(df, [column], "pruning_sets")
    out = {}
    for layer, sub in df.groupby("layer", sort=True):
        count = n if n is not None else int(round(frac * len(sub)))
        if not 0 <= count <= len(sub):
            raise ValueError(f"cannot prune {count} of the {len(sub)} experts of layer {layer}")
        ranked = sub.sort_values([column, "expert"], kind="stable")
        out[int(layer)] = sorted(int(e) for e in ranked["expert"].iloc[:count])
    return out


def spearman(a, b) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (NaN when either is constant)."""
    ra, rb = pd.Series(np.asarray(a, float)).rank(), pd.Series(np.asarray(b, float)).rank()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def saliency_vs_importance(sal: pd.DataFrame, importance: pd.DataFrame, columns=SALIENCY_COLUMNS) -> pd.DataFrame:
    """Does the observational score predict the ablation effect? Spearman rho per layer between each
    saliency column and ``delta_loss`` of ``el.ablation.expert_importance`` (same data, same layers).

    Columns: layer, score, rho, n_experts.
    """
    merged = sal.merge(importance[["layer", "expert", "delta_loss"]], on=["layer", "expert"], how="inner")
    if merged.empty:
        raise ValueError("saliency and importance frames share no (layer, expert)")
    rows = [
        {"layer": int(layer), "score": c, "rho": spearman(sub[c], sub["delta_loss"]), "n_experts": len(sub)}
        for layer, sub in merged.groupby("layer", sort=True)
        for c in columns
    ]
    return pd.DataFrame(rows)
