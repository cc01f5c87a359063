"""Plots of ablation results; each takes the DataFrame an ``ernie_lab.ablation.effects`` function returns and
returns a matplotlib Figure (built without pyplot, Agg-safe)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ernie_lab.plots import NEGATIVE, POSITIVE, SIGNED_CMAP, heatmap, new_figure, pivot, set_title

LABELS = {
    "delta_loss": "Δloss when ablated (nats per token)",
    "kl": "KL(base ‖ ablated) (nats per token)",
    "loss": "mean NLL (nats per token)",
    "load": "load (share of routing slots)",
}


def _words(column: str) -> str:
    return LABELS.get(column, column.replace("_", " "))


def _errors(sub: pd.DataFrame, value: str):
    """Asymmetric error bars ``[2 n]`` from ci_low / ci_high around ``value``, or None without them."""
    if value != "delta_loss" or not {"ci_low", "ci_high"} <= set(sub.columns):
        return None
    return np.abs(np.vstack([sub[value] - sub["ci_low"], sub["ci_high"] - sub[value]]))


def _where(df: pd.DataFrame) -> str:
    if "split" in df.columns and len(df):
        return "held-out half" if "held out" in str(df["split"].iloc[0]) else "same texts (in sample)"
    return ""


def plot_importance(
    df: pd.DataFrame, layer: int | None = None, value: str = "delta_loss", top: int | None = None
) -> Figure:
    """Expert importance from ``expert_importance``.

    One layer (``layer=`` or a one-layer frame): bars of ``value`` per expert in rank order with their
    bootstrap intervals (error bars), the random-expert control as a grey band (its mean and interval),
    and each expert's load as dots on a second axis. Several layers: a layer x expert heatmap of ``value``.
    ``top`` keeps the ``top`` highest-ranked experts in the bar chart.
    """
    control = df[df["control"].astype(bool)] if "control" in df.columns else df.iloc[:0]
    experts = df.drop(control.index)
    layers = sorted(experts["layer"].unique())
    mode = f"{experts['mode'].iloc[0]}-ablation " if "mode" in experts.columns and len(experts) else ""
    where = _where(experts)
    if layer is None and len(layers) > 1:
        table = pivot(experts, "layer", "expert", value)
        fig, ax = new_figure(figsize=(max(6.0, 0.18 * table.shape[1] + 2), max(2.5, 0.3 * len(table) + 1.5)))
        heatmap(ax, table, cmap=SIGNED_CMAP, center=0.0, label=_words(value))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"{mode}importance of each expert alone: {_words(value)}" + (f", {where}" if where else ""))
        return fig
    layer = layers[0] if layer is None else layer
    sub = experts[experts["layer"] == layer]
    sub = sub.sort_values("rank") if "rank" in sub.columns else sub.sort_values(value, ascending=False)
    if sub.empty:
        raise ValueError(f"layer {layer} not in the frame (layers {layers})")
    if top is not None:
        sub = sub.iloc[:top]
    x = np.arange(len(sub))
    fig, ax = new_figure(figsize=(max(6.0, 0.25 * len(sub) + 2), 4.0))
    ax.bar(x, sub[value], color=np.where(sub[value] >= 0, POSITIVE, NEGATIVE), label=_words(value))
    errors = _errors(sub, value)
    if errors is not None:
        bars = {"fmt": "none", "ecolor": "k", "elinewidth": 0.8, "capsize": 2}
        ax.errorbar(x, sub[value], yerr=errors, label="bootstrap interval", **bars)
    floor = control[control["layer"] == layer]
    if len(floor) and value in floor.columns:
        row = floor.iloc[0]
        low, high = (row["ci_low"], row["ci_high"]) if errors is not None else (row[value], row[value])
        ax.axhspan(low, high, color="0.6", alpha=0.35, label="random-expert control (interval)")
        ax.axhline(row[value], color="0.4", ls="--", lw=0.8, label="random-expert control (mean)")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(x, [str(e) for e in sub["expert"]], rotation=90 if len(sub) > 16 else 0)
    ranked_on = " (ranked on the discover half)" if where.startswith("held") else ""
    ax.set_xlabel("expert, most important first" + ranked_on)
    ax.set_ylabel(_words(value))
    ax.legend(fontsize=7, loc="upper right")
    if "load" in sub.columns:
        twin = ax.twinx()
        twin.plot(x, sub["load"], "o", color="0.3", label="load")
        twin.set_ylabel(_words("load"), color="0.3")
    title = f"layer {layer}: {mode}importance of each expert"
    set_title(ax, title + (f", measured on the {where}" if where else ""))
    return fig


def plot_ablation_effect(df: pd.DataFrame) -> Figure:
    """Δloss per token group of ``ablation_effect``: the ablation (red/blue) beside the random-expert
    control (grey), each with its bootstrap interval as error bars."""
    main = df[~df["control"].astype(bool)] if "control" in df.columns else df
    control = df[df["control"].astype(bool)].set_index("group") if "control" in df.columns else None
    groups = main["group"].tolist()
    x = np.arange(len(groups))
    width = 0.4 if control is not None and len(control) else 0.8
    fig, ax = new_figure(figsize=(max(5.0, 0.7 * len(groups) + 2.5), 4.0))
    bars = {"fmt": "none", "ecolor": "k", "elinewidth": 0.8, "capsize": 2}
    values = main["delta_loss"].to_numpy()
    ax.bar(x - (width / 2 if width < 0.8 else 0), values, width, color=np.where(values >= 0, POSITIVE, NEGATIVE),
           label=f"ablated: {main['experts'].iloc[0]}")  # fmt: skip
    if {"ci_low", "ci_high"} <= set(main.columns):
        ax.errorbar(x - (width / 2 if width < 0.8 else 0), values, yerr=_errors(main, "delta_loss"), **bars)
    if control is not None and len(control):
        floor = control.loc[groups]
        ax.bar(x + width / 2, floor["delta_loss"], width, color="0.6", label="random experts (control)")
        ax.errorbar(x + width / 2, floor["delta_loss"], yerr=_errors(floor, "delta_loss"), **bars)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(x, groups, rotation=90 if len(groups) > 8 else 0)
    ax.set_xlabel("token group")
    ax.set_ylabel(_words("delta_loss"))
    mode = main["mode"].iloc[0] if "mode" in main.columns else ""
    ax.set_title(f"{mode} ablation of {main['experts'].iloc[0]}: loss change per group", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def plot_pruning_curve(df: pd.DataFrame, value: str = "delta_loss") -> Figure:
    """``value`` (delta_loss, loss or kl) against the fraction of experts ablated, one line per
    (layer, order_by, mode) of ``pruning_curve`` frames (concatenate several to compare), with a shaded
    bootstrap interval for delta_loss; random orders (the control) dashed grey. The title says whether
    the ranking saw the evaluated texts; the y axis starts at 0 Δloss so curves of different frames
    share one scale."""
    fig, ax = new_figure(figsize=(6.6, 4.4))
    keys = [k for k in ("layer", "order_by", "mode") if k in df.columns]
    for key, sub in df.sort_values("n_ablated").groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        info = dict(zip(keys, key, strict=True))
        random = info.get("order_by") == "random"
        label = f"layer {info.get('layer', '?')}, {info.get('mode', '')} ablation, " + (
            "random order (control)" if random else f"least {info.get('order_by', '')} first"
        )
        style = {"color": "0.45", "ls": "--"} if random else {}
        line = ax.plot(sub["frac_ablated"], sub[value], marker="o", ms=3, label=label, **style)[0]
        if value == "delta_loss" and {"ci_low", "ci_high"} <= set(sub.columns):
            ax.fill_between(sub["frac_ablated"], sub["ci_low"], sub["ci_high"], color=line.get_color(), alpha=0.2)
    if value == "delta_loss":
        ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("fraction of the layer's experts ablated")
    ax.set_ylabel(_words(value) if value != "delta_loss" else "Δloss vs the un-ablated model (nats per token)")
    held = bool(df["held_out"].all()) if "held_out" in df.columns else False
    where = "evaluated on held-out texts the ranking did not see" if held else "ranked and evaluated on the same texts"
    ax.set_title(f"pruning curve, least important experts first\n{where}", fontsize=10)
    ax.legend(fontsize=7)
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
