"""Plots of routing statistics; each takes the DataFrame a ``routing.stats`` function returns and
returns a matplotlib Figure (built without pyplot, Agg-safe)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ernie_lab.plots import SIGNED_CMAP, heatmap, new_figure, pivot


def _one_layer(df: pd.DataFrame, layer: int | None, what: str) -> tuple[pd.DataFrame, int]:
    layers = sorted(df["layer"].unique())
    if layer is None:
        if len(layers) != 1:
            raise ValueError(f"{what}: the frame holds layers {layers}; pass layer=")
        layer = layers[0]
    if layer not in layers:
        raise ValueError(f"{what}: layer {layer} not in the frame (layers {layers})")
    return df[df["layer"] == layer], int(layer)


LOAD_WORDS = {
    "load": "slot load (share of routing slots)",
    "wload": "weighted load (mean mixing weight)",
    "mean_prob": "mean router probability",
}


def plot_load_heatmap(df: pd.DataFrame, value: str = "load") -> Figure:
    """Layer x expert heatmap of ``expert_load(r)[value]`` (``load``, ``wload`` or ``mean_prob``), on a
    diverging scale centred on uniform routing 1/E.

    With ``value="load"`` and a ``wload`` column, the weighted load is drawn beside the slot load on the
    same scale: an expert that the correction bias puts in many slots with a tiny weight (busy in slots,
    idle in output) shows up as a red cell on the left and a blue one on the right.
    """
    values = [value] + (["wload"] if value == "load" and "wload" in df.columns else [])
    tables = [pivot(df, "layer", "expert", v) for v in values]
    n_expert = tables[0].shape[1]
    width = max(6.0, 0.18 * n_expert + 2)
    fig, axes = new_figure(1, len(values), figsize=(width * len(values), max(2.5, 0.3 * len(tables[0]) + 1.8)))
    center = 1.0 / n_expert if value in ("load", "wload", "mean_prob") else None
    for ax, v, table in zip(np.atleast_1d(axes), values, tables, strict=True):
        heatmap(ax, table, cmap=SIGNED_CMAP, center=center, label=LOAD_WORDS.get(v, v.replace("_", " ")))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"{LOAD_WORDS.get(v, v.replace('_', ' '))} per MoE layer (uniform = 1/{n_expert})", fontsize=10)
    return fig


def plot_coactivation(df: pd.DataFrame, layer: int | None = None, value: str = "frac") -> Figure:
    """Expert x expert heatmap of ``coactivation(r)`` for one layer: ``frac`` = C[i, j] (row i
    normalised by the tokens routed to i) or the raw ``count``."""
    sub, layer = _one_layer(df, layer, "plot_coactivation")
    table = pivot(sub, "i", "j", value)
    if value == "frac":
        table = table.mask(np.eye(len(table), dtype=bool))  # the diagonal is 1 by definition
    size = max(4.5, 0.15 * len(table) + 2.5)
    fig, ax = new_figure(figsize=(size + 1, size))
    words = "share of expert i's tokens that also select j" if value == "frac" else "tokens selecting both"
    heatmap(ax, table, cmap="magma", label=words)
    ax.set_xlabel("expert j")
    ax.set_ylabel("expert i")
    ax.set_title(f"layer {layer}: expert co-activation\n({words})", fontsize=10)
    return fig


def plot_specialisation(
    df: pd.DataFrame, layer: int | None = None, value: str = "lift", top: int | None = None
) -> Figure:
    """Group x expert heatmap of ``domain_specialisation(r)[value]`` for one layer.

    The lift is drawn on a diverging scale centred on 1 (uniform routing). ``top`` keeps only the
    ``top`` experts with the highest lift in any group, ordered by that maximum.
    """
    sub, layer = _one_layer(df, layer, "plot_specialisation")
    table = pivot(sub, "group", "expert", value)
    if top is not None:
        table = table[table.max(axis=0).sort_values(ascending=False).index[:top]]
    fig, ax = new_figure(figsize=(max(6.0, 0.22 * table.shape[1] + 2.5), max(2.5, 0.35 * len(table) + 1.5)))
    words = "selection rate / uniform share k/E" if value == "lift" else value.replace("_", " ")
    heatmap(ax, table, cmap=SIGNED_CMAP, center=1.0 if value == "lift" else None, label=words)
    ax.set_xlabel("expert" + (" (highest lift first)" if top else ""))
    ax.set_ylabel("token group")
    title = f"layer {layer}: which experts each group selects ({'lift' if value == 'lift' else words})"
    ax.set_title(title + (f", top {top} experts" if top else ""), fontsize=10)
    return fig


def plot_entropy_by_layer(df: pd.DataFrame, value: str = "entropy") -> Figure:
    """Distribution of a per-token value by layer.

    Takes ``router_entropy(r)`` (or ``topk_confidence(r)`` with ``value="confidence"``): a box per
    layer with the mean marked; or a ``layer_summary`` frame (columns mean, q10, q90): the mean with
    a 10-90 % band.
    """
    fig, ax = new_figure(figsize=(7.0, 4.0))
    if value in df.columns:
        layers = sorted(df["layer"].unique())
        data = [df.loc[df["layer"] == L, value].to_numpy() for L in layers]
        ax.boxplot(data, positions=np.arange(len(layers)), showfliers=False, widths=0.6)
        ax.plot(np.arange(len(layers)), [d.mean() for d in data], "o", label="mean")
        ax.set_xticks(np.arange(len(layers)), [str(L) for L in layers])
    elif {"mean", "q10", "q90"} <= set(df.columns):
        ax.plot(df["layer"], df["mean"], "o-", label="mean")
        ax.fill_between(df["layer"], df["q10"], df["q90"], alpha=0.3, label="10-90 %")
    else:
        raise KeyError(f"the frame has neither a {value!r} column nor mean/q10/q90; it has {list(df.columns)}")
    ax.set_xlabel("MoE layer")
    words = "router entropy / log E" if value == "entropy" else value.replace("_", " ")
    ax.set_ylabel(words if value != "confidence" else "probability mass of the selected experts")
    ax.set_title(f"router {'entropy' if value == 'entropy' else value.replace('_', ' ')} per token, by layer")
    ax.legend()
    return fig


def plot_transitions(df: pd.DataFrame, value: str = "prob", min_count: int = 5) -> Figure:
    """Expert (layer a) x expert (layer b) heatmap of ``transitions(r, a, b)[value]``: the conditional
    ``prob`` of the top-1 expert at b given the one at a, or its ``lift`` (diverging around 1).

    Cells with fewer than ``min_count`` tokens (``count`` column) are masked (blank): a lift from two
    tokens is noise, and a cell with no token has no lift at all. Each shown cell's token count is written
    in it when the grid is small enough to read (<= 24 experts).
    """
    table = pivot(df, "i", "j", value)
    counts = pivot(df, "i", "j", "count") if "count" in df.columns else None
    if counts is not None:
        table = table.mask(counts < min_count)
    size = max(4.5, 0.22 * len(table) + 2.5)
    fig, ax = new_figure(figsize=(size + 1, size))
    words = "lift: P(j | i) / P(j)" if value == "lift" else "P(top-1 at b = j | top-1 at a = i)"
    heatmap(
        ax, table, cmap="RdBu_r" if value == "lift" else "magma", center=1.0 if value == "lift" else None, label=words
    )
    if counts is not None and len(table) <= 24:
        for (row, col), n in np.ndenumerate(counts.to_numpy()):
            if n >= min_count:
                ax.text(col, row, str(int(n)), ha="center", va="center", fontsize=6, color="k")
    a, b = int(df["layer_a"].iloc[0]), int(df["layer_b"].iloc[0])
    ax.set_xlabel(f"top-1 expert at layer {b}")
    ax.set_ylabel(f"top-1 expert at layer {a}")
    masked = f"; blank: fewer than {min_count} tokens, numbers: tokens" if counts is not None else ""
    ax.set_title(f"expert transitions, layer {a} to layer {b}\n({words}{masked})", fontsize=9)
    return fig


def plot_nmi_by_distance(df: pd.DataFrame) -> Figure:
    """NMI of the top-1 choices of two layers against their distance (``transition_nmi``): one dot
    per layer pair, the mean per distance as a line."""
    fig, ax = new_figure(figsize=(6.0, 3.8))
    ax.scatter(df["distance"], df["nmi"], s=14, alpha=0.6, label="layer pair")
    mean = df.groupby("distance", sort=True)["nmi"].mean()
    ax.plot(mean.index, mean.to_numpy(), "o-", color="tab:red", label="mean")
    ax.set_xlabel("layer distance b - a")
    ax.set_ylabel("normalised mutual information\nof the top-1 experts")
    ax.set_title("routing mutual information by layer distance")
    ax.legend(fontsize=8)
    return fig


def plot_router_sources(df: pd.DataFrame, top: int | None = 20) -> Figure:
    """Bars of each component's share of the router-logit variance (``source_summary``), the ``top``
    largest |share| in the components' order."""
    sub = df if top is None else df.loc[df["share"].abs().sort_values(ascending=False).index[:top]].sort_index()
    fig, ax = new_figure(figsize=(max(5.0, 0.35 * len(sub) + 2), 3.8))
    ax.bar(range(len(sub)), sub["share"], color="tab:purple")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(len(sub)), sub["component"].tolist(), rotation=90)
    ax.set_xlabel("residual-stream component")
    ax.set_ylabel("share of the router-logit variance")
    ax.set_title("where the router logits come from")
    return fig
