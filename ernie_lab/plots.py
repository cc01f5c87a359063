"""Shared plotting helpers: figures without pyplot, labelled heatmaps.

Figures are built with ``matplotlib.figure.Figure`` directly, never through pyplot: no global figure
registry, nothing to close, safe under the Agg backend and in threads. In a notebook a returned
Figure displays itself; ``fig.savefig(path)`` writes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None) -> tuple[Figure, Axes]:
    """A constrained-layout Figure and its axes (an Axes, or an array of them)."""
    fig = Figure(figsize=figsize or (6.4, 4.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=True)
    return fig, axes


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
    ax.figure.colorbar(image, ax=ax, label=label)
    _ticks(ax.set_xticks, table.columns, max_ticks, rotation=90 if len(table.columns) > 12 else 0)
    _ticks(ax.set_yticks, table.index, max_ticks)
    ax.set_xlabel(str(table.columns.name or ""))
    ax.set_ylabel(str(table.index.name or ""))
    if annotate:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="w")


def _ticks(setter, labels: Sequence, max_ticks: int, rotation: float = 0) -> None:
    step = max(1, -(-len(labels) // max_ticks))
    positions = np.arange(0, len(labels), step)
    setter(positions, [str(labels[i]) for i in positions], rotation=rotation)
