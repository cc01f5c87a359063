"""Plots of the expert-level analyses; each takes the DataFrame an ``ernie_lab.experts`` function
returns and returns a matplotlib Figure (built without pyplot, Agg-safe)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ernie_lab.plots import heatmap, line_figure, new_figure, pivot

SALIENCY_WORDS = {
    "reap": "REAP (mean weighted output norm)",
    "easy_ep": "EASY-EP",
    "frequency": "selection frequency",
    "weighted_frequency": "weighted frequency",
    "ean_mean": "mean output norm (EAN)",
}


def plot_saliency(df: pd.DataFrame, value: str = "reap", scale: str = "layer") -> Figure:
    """Layer x expert heatmap of a ``saliency`` column (``reap``, ``frequency``, ``easy_ep``, ...).

    ``scale``: ``"layer"`` (default) divides each layer's row by its largest value, so every layer uses
    the full colour range (one loud expert in a late layer no longer flattens the others); ``"log"``
    draws log10 of the raw values; ``"raw"`` the values as they are.
    """
    if scale not in ("layer", "log", "raw"):
        raise ValueError(f"scale must be 'layer', 'log' or 'raw', got {scale!r}")
    table = pivot(df, "layer", "expert", value)
    words = SALIENCY_WORDS.get(value, value.replace("_", " "))
    if scale == "layer":
        peak = table.abs().max(axis=1).replace(0.0, np.nan)
        table, label = table.div(peak, axis=0), "share of the layer's largest"
    elif scale == "log":
        table, label = np.log10(table.where(table > 0)), "log10 of the score"
    else:
        label = "score"
    fig, ax = new_figure(figsize=(max(6.0, 0.18 * table.shape[1] + 2), max(2.5, 0.3 * len(table) + 1.8)))
    heatmap(ax, table, cmap="viridis", label=label)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    how = {"layer": "each layer scaled to its largest", "log": "log scale", "raw": "raw values"}[scale]
    ax.set_title(f"expert saliency: {words}\n({how})", fontsize=10)
    return fig


def plot_saliency_vs_importance(df: pd.DataFrame) -> Figure:
    """Spearman rho per layer (x) of each saliency score with the ablation Δloss, from
    ``saliency_vs_importance``: does the observational score predict the causal effect?"""
    fig, ax = new_figure(figsize=(7.0, 3.8))
    for score, sub in df.groupby("score", sort=False):
        ax.plot(sub["layer"], sub["rho"], "o-", label=score)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xticks(sorted(df["layer"].unique()))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("Spearman rho with the ablation Δloss")
    ax.set_title("observational saliency vs causal importance")
    ax.legend(fontsize=8)
    return fig


def plot_super_experts(df: pd.DataFrame) -> Figure:
    """Each expert's ``peak`` output (log scale) by layer, super experts in red."""
    fig, ax = new_figure(figsize=(7.0, 3.8))
    normal, hot = df[~df["is_super"]], df[df["is_super"]]
    ax.scatter(normal["layer"], normal["peak"].clip(lower=1e-12), s=12, color="tab:blue", label="expert")
    ax.scatter(hot["layer"], hot["peak"].clip(lower=1e-12), s=30, color="tab:red", label="super expert")
    ax.set_yscale("log")
    ax.margins(x=0.08, y=0.15)  # room for the labels inside the axes
    for _, row in hot.iterrows():
        ax.annotate(
            f"e{int(row['expert'])}", (row["layer"], row["peak"]), xytext=(4, -10), textcoords="offset points",
            fontsize=7, annotation_clip=True,
        )  # fmt: skip
    ax.set_xticks(sorted(df["layer"].unique()))
    ax.set_xlabel("layer")
    ax.set_ylabel("peak absolute output of the expert")
    ax.set_title("expert output peaks (log scale); red: super experts")
    ax.legend(fontsize=8)
    return fig


def plot_risk_difference(df: pd.DataFrame, top: int = 20) -> Figure:
    """Bars of the ``top`` largest |rd| (layer, expert) pairs of ``risk_difference`` (picked on the discover
    half): red = chosen more on set A, blue = more on set B; with a held-out split, the bars show the
    held-out rd with its bootstrap interval, the discover rd as a black tick, and the random-expert
    control's interval (widest over layers) as a grey band."""
    control = df[df["control"].astype(bool)] if "control" in df.columns else df.iloc[:0]
    experts = df.drop(control.index)
    sub = experts.reindex(experts["rd"].abs().sort_values(ascending=False, kind="stable").index).iloc[:top]
    labels = [f"L{int(L)} e{int(e)}" for L, e in zip(sub["layer"], sub["expert"], strict=True)]
    fig, ax = new_figure(figsize=(max(5.0, 0.35 * len(sub) + 2), 4.0))
    held = "rd_heldout" in sub.columns and "held out" in str(sub["split"].iloc[0] if len(sub) else "")
    value = sub["rd_heldout"] if held else sub["rd"]
    x = np.arange(len(sub))
    ax.bar(x, value, color=np.where(sub["rd"] > 0, "tab:red", "tab:blue"), label="risk difference")
    if {"ci_low", "ci_high"} <= set(sub.columns) and "rd_heldout" in sub.columns:
        err = np.abs(np.vstack([sub["rd_heldout"] - sub["ci_low"], sub["ci_high"] - sub["rd_heldout"]]))
        ax.errorbar(x, sub["rd_heldout"], yerr=err, fmt="none", ecolor="k", elinewidth=0.8, capsize=2)
    if held:
        ax.plot(x, sub["rd"], "_", color="k", ms=12, label="rd on the discover half")
    if len(control) and {"ci_low", "ci_high"} <= set(control.columns):
        ax.axhspan(control["ci_low"].min(), control["ci_high"].max(), color="0.6", alpha=0.35, label="random experts")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(x, labels, rotation=90)
    ax.set_xlabel("MoE layer and expert (largest |rd| on the discover half)")
    ax.set_ylabel("selection rate on A minus on B")
    where = "held-out half with bootstrap interval" if held else "same texts that picked them"
    ax.set_title(f"experts selected more on set A (red) or set B (blue): {where}", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def plot_truncation_lens(df: pd.DataFrame) -> Figure:
    """Left: cosine of the truncated MoE output to the full one by k', per layer. Right: the change in
    NLL with every MoE layer truncated to k' (``delta_nll``), in nats per token from 0 — the same unit
    and baseline as the pruning curve's Δloss, so the two figures compare directly."""
    table = pivot(df, "k_prime", "layer", "cosine")
    fig, axes = new_figure(1, 2, figsize=(9.5, 4.0))
    for layer in table.columns:
        axes[0].plot(table.index, table[layer], "o-", label=f"layer {layer}")
    axes[0].set_xlabel("experts kept per token (k')")
    axes[0].set_ylabel("cosine of truncated to full MoE output")
    axes[0].set_title("one layer truncated at a time")
    axes[0].legend(fontsize=8)
    nll = df.drop_duplicates("k_prime").sort_values("k_prime")
    value = "delta_nll" if "delta_nll" in nll.columns else "nll"
    axes[1].plot(nll["k_prime"], nll[value], "o-")
    axes[1].axhline(0.0, color="k", lw=0.8)
    for ax in axes:
        ax.set_xticks(table.index.tolist())
    axes[1].set_xlabel("experts kept per token in every MoE layer (k')")
    axes[1].set_ylabel("Δ NLL vs the full model (nats per token)")
    axes[1].set_title("every MoE layer truncated")
    fig.suptitle("top-k truncation lens")
    return fig


def plot_knockout(df: pd.DataFrame) -> Figure:
    """NLL against r, the number of top-ranked experts dropped (``topk_knockout``)."""
    return line_figure(
        df, "r", [["nll"]], ["mean NLL (nats per token)"], xlabel="top-ranked experts dropped per token (r)",
        title="top-rank knockout: drop each token's r best experts in every MoE layer",
    )  # fmt: skip
