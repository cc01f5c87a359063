"""Plots of activation-patching DataFrames (``patching.py``, ``attribution.py``).

Each function takes the tidy frame a grid returns and gives back a matplotlib ``Figure`` (built
without pyplot, so nothing is left open; Jupyter shows a returned Figure inline). Effects use the
package's diverging map centred on 0 (``ernie_lab.plots.SIGNED_CMAP``: red = restores the source run's
metric, blue = pushes the other way).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ernie_lab.noise import fit_through_origin
from ernie_lab.patching.attribution import merge_effects
from ernie_lab.plots import SIGNED_CMAP, new_figure, set_title


def _heatmap(table: pd.DataFrame, title: str, xlabel: str, xticklabels, value: str, noise=None) -> Figure:
    """``noise``: a bool table like ``table``, True where the effect's interval includes 0 (drawn as a dot)."""
    data = table.to_numpy(dtype=float)
    finite = np.abs(data[np.isfinite(data)])
    vmax = max(float(finite.max()) if finite.size else 1.0, 1e-9)
    long_labels = max((len(t) for t in xticklabels), default=0) > 3
    height = 0.4 * data.shape[0] + 1.5 + (0.08 * max(len(t) for t in xticklabels) if long_labels else 0)
    fig, ax = new_figure(figsize=(max(4.0, 0.45 * data.shape[1] + 2.5), max(3.0, height + 0.4)))
    im = ax.imshow(data, cmap=SIGNED_CMAP, vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(data.shape[1]), xticklabels, rotation=90 if long_labels else 0)
    ax.set_yticks(range(data.shape[0]), [str(L) for L in table.index])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    if noise is not None:
        rows, cols = np.nonzero(noise.to_numpy(dtype=bool))
        ax.scatter(cols, rows, s=6, c="0.35", marker="o", linewidths=0)
    set_title(ax, title, 9)
    fig.colorbar(im, ax=ax, label=_value_words(value))
    return fig


def _noise_cells(df: pd.DataFrame, table: pd.DataFrame, columns: str, value: str):
    """``(bool table, title words)``: cells whose bootstrap interval of the effect includes 0, when the
    frame carries intervals (``ci_low``/``ci_high`` from a grid over several prompt pairs); else ``(None, "")``."""
    if value != "effect" or not {"ci_low", "ci_high"} <= set(df.columns) or df["ci_low"].isna().all():
        return None, ""
    if df.duplicated(["layer", columns]).any():  # cells averaged over several rows: their intervals do not combine
        return None, ""
    lo, hi = (df.pivot(index="layer", columns=columns, values=v).reindex_like(table) for v in ("ci_low", "ci_high"))
    level, n = df.attrs.get("level"), df.attrs.get("n_prompts")
    interval = f"{level:.0%} interval" if level else "interval"
    over = f" over {n} pairs" if n else ""
    return (lo <= 0) & (hi >= 0), f"\ndot: the {interval}{over} includes 0 (not distinguishable from no effect)"


HOOK_WORDS = {
    "resid_pre": "residual stream into each block",
    "resid_mid": "residual stream after attention",
    "resid_post": "residual stream out of each block",
    "attn_out": "attention output",
    "mlp_out": "MLP / MoE output",
    "z": "attention heads",
}


def _value_words(value: str) -> str:
    return {"effect": "normalised effect (1 = fully restored)", "metric": "patched metric"}.get(
        value, value.replace("_", " ")
    )


def _direction(df: pd.DataFrame) -> str:
    """'denoising (clean into corrupt)' / 'noising (corrupt into clean)' from the frame's direction column."""
    if "direction" not in df or not len(df):
        return "direction not recorded"
    d = str(df["direction"].iloc[0])
    return {"denoising": "denoising: clean patched into corrupt", "noising": "noising: corrupt patched into clean"}.get(
        d, d
    )


def plot_patching_heatmap(df: pd.DataFrame, value: str = "effect", tokens=None, title: str | None = None) -> Figure:
    """Layer x position heatmap of ``value`` from a per-position grid (columns layer, pos).

    ``tokens``: x labels, one per position; default the frame's ``token`` column, else positions.
    """
    missing = {"layer", "pos", value} - set(df.columns)
    if missing:
        raise ValueError(f"the frame lacks columns {sorted(missing)} (a per-position grid is needed)")
    if "hook" in df and df["hook"].nunique() > 1:
        raise ValueError(f"the frame mixes hooks {sorted(df['hook'].unique())}; plot one at a time")
    table = df.pivot_table(index="layer", columns="pos", values=value, aggfunc="mean", dropna=False)
    if tokens is None and "token" in df:
        tokens = df.drop_duplicates("pos").set_index("pos")["token"].reindex(table.columns).tolist()
    labels = (
        [str(p) for p in table.columns]
        if tokens is None
        else [f"{t} ({p})" for p, t in zip(table.columns, tokens, strict=True)]
    )
    hook = str(df["hook"].iloc[0]) if "hook" in df else ""
    where = HOOK_WORDS.get(hook, hook.replace("_", " ") or "activation")
    noise, words = _noise_cells(df, table, "pos", value)
    default = f"patching the {where} per layer and position\n{_value_words(value)}, {_direction(df)}{words}"
    return _heatmap(table, title or default, "position (token)", labels, value, noise)


def plot_head_grid(df: pd.DataFrame, value: str = "effect", title: str | None = None) -> Figure:
    """Layer x head heatmap of ``value`` (a per-position head grid is averaged over positions)."""
    missing = {"layer", "head", value} - set(df.columns)
    if missing:
        raise ValueError(f"the frame lacks columns {sorted(missing)} (a head grid is needed)")
    table = df.pivot_table(index="layer", columns="head", values=value, aggfunc="mean", dropna=False)
    noise, words = _noise_cells(df, table, "head", value)
    default = f"patching each attention head's output\n{_value_words(value)}, {_direction(df)}{words}"
    return _heatmap(table, title or default, "attention head", [str(h) for h in table.columns], value, noise)


def plot_attribution_vs_exact(exact_df: pd.DataFrame, attr_df: pd.DataFrame, value: str = "effect") -> Figure:
    """Scatter of attribution-patching estimates against exact patching, with y = x, the least-squares
    line through the origin, and r, its slope and the R² of y = x (``attribution_agreement``) in the title."""
    merged = merge_effects(exact_df, attr_df, value).dropna()
    x, y = merged[f"{value}_exact"].to_numpy(), merged[f"{value}_attr"].to_numpy()
    fig, ax = new_figure(figsize=(5.0, 4.8))
    color = merged.get("layer")
    points = ax.scatter(x, y, c=color, cmap="viridis", s=18)
    if color is not None:
        fig.colorbar(points, ax=ax, label="layer")
    both = np.concatenate([x, y]) if len(x) else np.zeros(1)
    lo, hi = float(both.min()), float(both.max())
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="y = x (attribution = exact)")
    fit = fit_through_origin(x, y) if len(x) > 1 else {"r": np.nan, "slope": np.nan, "r2_identity": np.nan}
    if np.isfinite(fit["slope"]):
        ax.plot([lo, hi], [fit["slope"] * lo, fit["slope"] * hi], color="k", lw=1, label="least squares through 0")
    ax.legend(fontsize=7)
    words = value.replace("_", " ")
    ax.set_xlabel(f"exact patching: normalised {words}" if value == "effect" else f"exact patching: {words}")
    ax.set_ylabel(f"attribution patching estimate: {words}")
    ax.set_title(
        f"attribution vs exact patching (n = {len(x)})\nr = {fit['r']:.3f}, slope = {fit['slope']:.3f}, "
        f"R² against y = x: {fit['r2_identity']:.3f}",
        fontsize=10,
    )
    return fig
