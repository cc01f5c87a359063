"""Plots of ablation results; each takes the DataFrame an ``ernie_lab.ablation.effects`` function returns and
returns a matplotlib Figure (built without pyplot, Agg-safe)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ernie_lab.plots import NEGATIVE, POSITIVE, SIGNED_CMAP, heatmap, new_figure, pivot


def plot_importance(
    df: pd.DataFrame, layer: int | None = None, value: str = "delta_loss", top: int | None = None
) -> Figure:
    """Expert importance from ``expert_importance``.

    One layer (``layer=`` or a one-layer frame): bars of ``value`` per expert in rank order, with each
    expert's load as dots on a second axis. Several layers: a layer x expert heatmap of ``value``.
    ``top`` keeps the ``top`` highest-ranked experts in the bar chart.
    """
    layers = sorted(df["layer"].unique())
    if layer is None and len(layers) > 1:
        table = pivot(df, "layer", "expert", value)
        fig, ax = new_figure(figsize=(max(6.0, 0.18 * table.shape[1] + 2), max(2.5, 0.3 * len(table) + 1.5)))
        heatmap(ax, table, cmap=SIGNED_CMAP, center=0.0, label=value)
        ax.set_title(f"expert importance ({value} when ablated alone)")
        return fig
    layer = layers[0] if layer is None else layer
    sub = df[df["layer"] == layer].sort_values(value, ascending=False)
    if sub.empty:
        raise ValueError(f"layer {layer} not in the frame (layers {layers})")
    if top is not None:
        sub = sub.iloc[:top]
    x = np.arange(len(sub))
    fig, ax = new_figure(figsize=(max(6.0, 0.25 * len(sub) + 2), 4.0))
    ax.bar(x, sub[value], color=np.where(sub[value] >= 0, POSITIVE, NEGATIVE), label=value)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(x, [str(e) for e in sub["expert"]], rotation=90 if len(sub) > 16 else 0)
    ax.set_xlabel("expert (by importance)")
    ax.set_ylabel(value)
    if "load" in sub.columns:
        twin = ax.twinx()
        twin.plot(x, sub["load"], "o", color="0.3", label="load")
        twin.set_ylabel("load", color="0.3")
    mode = f" ({sub['mode'].iloc[0]} ablation)" if "mode" in sub.columns else ""
    ax.set_title(f"layer {layer}: expert importance{mode}")
    return fig


def plot_pruning_curve(df: pd.DataFrame, value: str = "loss") -> Figure:
    """``value`` (loss, delta_loss or kl) against the fraction of experts ablated, one line per
    (layer, order_by, mode) of ``pruning_curve`` frames (concatenate several to compare)."""
    fig, ax = new_figure(figsize=(6.4, 4.2))
    keys = [k for k in ("layer", "order_by", "mode") if k in df.columns]
    for key, sub in df.sort_values("n_ablated").groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True))
        ax.plot(sub["frac_ablated"], sub[value], "o-", label=label)
        base = sub.loc[sub["n_ablated"] == 0, value]
        if value == "loss" and len(base):
            ax.axhline(float(base.iloc[0]), ls="--", color="grey", lw=0.8)
    ax.set_xlabel("fraction of experts ablated")
    ax.set_ylabel(value)
    ax.set_title("pruning curve (least important experts first)")
    ax.legend(fontsize=8)
    return fig


def plot_dla(df: pd.DataFrame, top: int = 15, batch: int = 0) -> Figure:
    """Direct logit attribution from ``direct_logit_attribution``, for one batch row.

    Left: per-layer sums split into attention, dense MLP, shared and routed experts (embedding and
    bias at layer "-"). Right: the ``top`` components with the largest absolute contribution (the
    heads instead of whole attention layers when the frame has ``head`` rows).
    """
    rows = df[df["batch"] == batch]
    if rows.empty:
        raise ValueError(f"batch row {batch} not in the frame")
    has_heads = bool((rows["component"] == "head").any())
    sub = rows[rows["component"] != "head"]  # the partition of the residual: head rows refine attn rows
    fig, (left, right) = new_figure(1, 2, figsize=(12.0, 4.5))
    kind = sub["component"].replace({"mlp": "dense mlp", "expert": "routed experts"})
    layer = sub["layer"].astype("string").fillna("-")
    table = sub.assign(kind=kind, where=layer).pivot_table(
        index="where", columns="kind", values="contribution", aggfunc="sum", fill_value=0.0, sort=False
    )
    bottom_pos = np.zeros(len(table))
    bottom_neg = np.zeros(len(table))
    x = np.arange(len(table))
    for column in table.columns:
        values = table[column].to_numpy()
        base = np.where(values >= 0, bottom_pos, bottom_neg)
        left.bar(x, values, bottom=base, label=column)
        bottom_pos += np.clip(values, 0, None)
        bottom_neg += np.clip(values, None, 0)
    left.axhline(0.0, color="k", lw=0.8)
    left.set_xticks(x, list(table.index))
    left.set_xlabel("layer")
    left.set_ylabel("direct contribution to logit difference")
    left.legend(fontsize=8)
    total = sub["contribution"].sum()
    left.set_title(f"per layer (sum = {total:.3f})")
    finest = rows[rows["component"] != "attn"] if has_heads else sub
    best = finest.reindex(finest["contribution"].abs().sort_values(ascending=False).index).iloc[:top]
    y = np.arange(len(best))[::-1]
    colours = np.where(best["contribution"] >= 0, POSITIVE, NEGATIVE)
    right.barh(y, best["contribution"], color=colours)
    right.set_yticks(y, list(best["label"]))
    right.axvline(0.0, color="k", lw=0.8)
    right.set_xlabel("direct contribution")
    right.set_ylabel("component")
    right.set_title(f"top {len(best)} components")
    return fig
