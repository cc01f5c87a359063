"""Shared plotting helpers: figures without pyplot, labelled heatmaps.

Figures are built with ``matplotlib.figure.Figure`` directly, never through pyplot: no global figure
registry, nothing to close, safe under the Agg backend and in threads. Such a figure has no Jupyter
display of its own (the inline backend registers one only once pyplot is imported), so every plot
returns a :class:`NotebookFigure`, which renders itself as PNG (``_repr_png_``): a figure returned by
the last line of a cell, or passed to ``display``, shows inline in JupyterLab, classic Notebook and
nbconvert. ``fig.savefig(path)`` writes it.

Colours: one convention for signed effects everywhere (patching, ablation, lifts): :data:`SIGNED_CMAP`,
red = positive (restores / increases), blue = negative, white = the neutral value.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from io import BytesIO

import numpy as np
import pandas as pd
from matplotlib import rcParams
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

SIGNED_CMAP = "RdBu_r"  # diverging map for signed values: red > neutral > blue
POSITIVE, NEGATIVE = "#b2182b", "#2166ac"  # the map's ends, for bars and points of signed values


class NotebookFigure(Figure):
    """A pyplot-free ``Figure`` that Jupyter displays inline as PNG."""

    def _repr_png_(self) -> bytes:
        buffer = BytesIO()
        self.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()


def token_label(text: str) -> str:
    """A token as a label that shows what it is: leading/trailing spaces as ``␣`` (a plot label or an
    HTML cell would hide them), newlines as ``⏎``, tabs as ``⇥``; other text (Chinese included) as is."""
    text = text.replace("\n", "⏎").replace("\t", "⇥")
    core = text.strip(" ")
    if not core:
        return "␣" * len(text)
    start = len(text) - len(text.lstrip(" "))
    end = len(text) - len(text.rstrip(" "))
    return "␣" * start + core + "␣" * end


def sequence_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each token of a sequence ``ids`` ``[pos]``, with characters split over several
    tokens decoded properly: byte-level BPE splits a rare Chinese character into pieces that are no
    text alone, so a piece that completes no character is labelled ``(学)`` after the character the
    following tokens complete, and the token completing it shows it (``学``). Tokenizers without
    ``convert_ids_to_tokens`` are decoded token by token."""
    ids = [int(i) for i in ids]
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        return [tokenizer.decode([i]) for i in ids]
    pieces = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    if not any("\\x" in p for p in pieces):  # every token is whole text: nothing to reassemble
        return pieces
    labels: list[str] = []
    done, pending = "", []
    for pos, piece in enumerate(pieces):
        text = tokenizer.decode(ids[: pos + 1]).rstrip("\ufffd")  # decoded so far, whole characters only
        new = text[len(done) :] if text.startswith(done) else piece
        done = text
        if "\\x" not in piece:
            labels.append(piece)
        elif not new:  # a piece of a character the next tokens complete
            pending.append(pos)
            labels.append(piece)
        else:
            labels.append(new)
        if new:
            for waiting in pending:
                labels[waiting] = f"({new[0]})"
            pending = []
    return labels


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None) -> tuple[Figure, Axes]:
    """A constrained-layout :class:`NotebookFigure` and its axes (an Axes, or an array of them)."""
    fig = NotebookFigure(figsize=figsize or (6.4, 4.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=True)
    return fig, axes


def set_title(ax: Axes, text: str, fontsize: float = 10.0) -> None:
    """``ax.set_title`` with each line wrapped to the figure's width (titles that name the layer, sets,
    metric and direction get long; a narrow figure would clip them)."""
    chars = max(20, int(0.7 * ax.figure.get_figwidth() * 72 / (fontsize * 0.56)))  # axes: ~70% of the figure
    ax.set_title("\n".join(textwrap.fill(line, chars) for line in text.split("\n")), fontsize=fontsize)


def pivot(df: pd.DataFrame, index: str, columns: str, values: str) -> pd.DataFrame:
    """``df.pivot`` with a clear error when a column is missing or (index, columns) repeats."""
    missing = [c for c in (index, columns, values) if c not in df.columns]
    if missing:
        raise KeyError(f"the frame has no column(s) {missing}; it has {list(df.columns)}")
    if df.duplicated([index, columns]).any():
        raise ValueError(f"several rows per ({index}, {columns}): select one layer / slice first")
    return df.pivot(index=index, columns=columns, values=values).sort_index().sort_index(axis=1)


def heatmap(
    ax: Axes,
    table: pd.DataFrame,
    *,
    cmap: str = "viridis",
    center: float | None = None,
    label: str = "",
    max_ticks: int = 40,
    annotate: bool = False,
) -> None:
    """Draw ``table`` (rows = y, columns = x) as an image with ticks from its index and columns.

    ``center`` makes a diverging colour scale centred on that value (e.g. 1 for a lift). Tick labels
    are thinned to at most ``max_ticks`` per axis; ``annotate`` writes each value in its cell.
    """
    values = table.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    if center is not None and finite.size:
        span = max(float(np.abs(finite - center).max()), 1e-12)
        # non-negative data (loads, lifts) get no colours below 0
        low = center - span if finite.min() < 0 or center - span >= 0 else min(0.0, center - 1e-12)
        norm: Normalize = TwoSlopeNorm(vcenter=center, vmin=low, vmax=center + span)
    else:
        norm = Normalize(*(finite.min(), finite.max()) if finite.size else (0, 1))
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ax.figure.colorbar(image, ax=ax, label=_fit_to_height(label, ax))
    _ticks(ax.set_xticks, table.columns, max_ticks, rotation=90 if len(table.columns) > 12 else 0)
    _ticks(ax.set_yticks, table.index, max_ticks)
    ax.set_xlabel(str(table.columns.name or ""))
    ax.set_ylabel(str(table.index.name or ""))
    if annotate:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="w")


def _fit_to_height(label: str, ax: Axes) -> str:
    """Wrap a colour-bar label onto lines no longer than the bar is tall, so a heatmap with few rows
    (a 3-layer model's load) never clips it. The bar gets about 60% of the figure's height and a
    character is about 0.6 of the font size wide, so a line holds about one character per point of
    figure height over the font size."""
    points = FontProperties(size=rcParams["axes.labelsize"]).get_size_in_points()
    per_line = max(8, int(ax.figure.get_figheight() * 72 / points))
    return "\n".join(textwrap.wrap(label, per_line)) if label else label


def _ticks(setter, labels: Sequence, max_ticks: int, rotation: float = 0) -> None:
    step = max(1, -(-len(labels) // max_ticks))
    positions = np.arange(0, len(labels), step)
    setter(positions, [str(labels[i]) for i in positions], rotation=rotation)


def line_figure(
    df: pd.DataFrame,
    x: str,
    panels: list[list[str]],
    titles: list[str],
    *,
    labels: dict[str, str] | None = None,
    xlabel: str | None = None,
    title: str | None = None,
) -> Figure:
    """Marked lines against ``x`` (layers), one panel per group of columns so that values on different
    scales (e.g. a variation coefficient and a fraction) each get their own axis. Each panel's y axis is
    labelled with its entry of ``titles`` (words); each line with ``labels[column]`` (default: the column
    name with spaces for underscores); ``xlabel`` defaults to ``x`` in words; ``title`` is the figure's."""
    labels = labels or {}
    fig, axes = new_figure(1, len(panels), figsize=(4.2 * len(panels) + 0.6, 3.8))
    for ax, ys, panel in zip(np.atleast_1d(axes), panels, titles, strict=True):
        for y in ys:
            ax.plot(df[x], df[y], "o-", label=labels.get(y, y.replace("_", " ")))
        ax.set_xticks(df[x].tolist(), [str(v) for v in df[x]])
        ax.set_xlabel(xlabel or x.replace("_", " "))
        ax.set_ylabel(panel)
        ax.set_title(panel)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def diverging_heatmap(df: pd.DataFrame, index: str, columns: str, value: str, title: str) -> Figure:
    """``index`` x ``columns`` heatmap of ``value`` on a scale centred on 0 (differences, effects)."""
    table = pivot(df, index, columns, value)
    fig, ax = new_figure(figsize=(max(6.0, 0.3 * table.shape[1] + 2), max(2.5, 0.35 * len(table) + 1.5)))
    heatmap(ax, table, cmap=SIGNED_CMAP, center=0.0, label=value.replace("_", " "))
    ax.set_xlabel(columns.replace("_", " "))
    ax.set_ylabel(index.replace("_", " "))
    ax.set_title(title)
    return fig


def bar_figure(labels: list[str], values, title: str, ylabel: str, *, xlabel: str) -> Figure:
    """Bars of signed ``values`` (red > 0, blue < 0) with a zero line."""
    fig, ax = new_figure(figsize=(max(5.0, 0.5 * len(labels) + 2), 3.8))
    values = np.asarray(values, dtype=float)
    ax.bar(range(len(labels)), values, color=np.where(values >= 0, POSITIVE, NEGATIVE))
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 8 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig
