"""Noise floors shared by every causal analysis (README, "Noise floors").

Three small pieces, used by ``ablation``, ``experts`` and ``patching`` alike:

- :func:`bootstrap_ci`: percentile intervals over **sequences** (tokens of one text are not
  independent) computed from stored per-sequence values, never by re-running the model. The statistic
  is the ratio of sums ``sum_s value_s / sum_s count_s`` over the resampled sequences (the token-weighted
  mean the point estimate uses) or, without counts, the mean over sequences.
- :func:`split_sequences`: the discover / evaluate split of a dataset (default: two interleaved halves,
  within each group when groups are given), so what ranks or picks experts is not what measures them.
- :func:`control_draws`: random experts of the same layer and count as a method's pick, drawn from those it
  did not pick; analyses average several draws into rows marked ``control=True``.

Every random choice takes an explicit ``seed`` (numpy ``default_rng``), so results repeat exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_N_BOOT",
    "DEFAULT_DRAWS",
    "Split",
    "check_interval",
    "resample_weights",
    "resampled_means",
    "percentile_interval",
    "bootstrap_ci",
    "split_sequences",
    "control_draws",
    "fit_through_origin",
]

DEFAULT_LEVEL = 0.95
DEFAULT_N_BOOT = 1000
DEFAULT_DRAWS = 3


def check_interval(level: float, n_boot: int) -> None:
    """Raise ValueError unless ``0 < level < 1`` and ``n_boot`` is an integer >= 1 (checked before any model run)."""
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be a number strictly between 0 and 1 (e.g. 0.95), got {level!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ValueError(f"n_boot (bootstrap resamples) must be an integer >= 1 (e.g. 1000), got {n_boot!r}")


def resample_weights(n_seq: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot n_seq]`` float64: how often each sequence is drawn in each resample (rows sum to n_seq).

    Share one matrix between the quantities of one analysis so their intervals come from the same resamples.
    """
    if n_seq < 1:
        raise ValueError("a bootstrap needs at least one sequence")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_seq, np.full(n_seq, 1.0 / n_seq), size=n_boot).astype(np.float64)


def resampled_means(values: Any, counts: Any = None, *, weights: np.ndarray) -> np.ndarray:
    """The statistic on each resample: ``[n_boot ...]``.

    ``values [n_seq ...]``: per-sequence sums (with ``counts [n_seq]``, e.g. NLL summed over a text's
    predicted tokens and their number) or per-sequence values (``counts`` None: the mean over sequences).
    ``weights``: from :func:`resample_weights`. A resample whose counts sum to 0 gives NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(values.shape[0], -1)
    numer = weights @ flat
    denom = weights.sum(1) if counts is None else weights @ np.asarray(counts, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = numer / denom[:, None]
    return out.reshape((weights.shape[0], *values.shape[1:]))


def percentile_interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)``: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``samples [n_boot ...]``
    over the resamples (NaN resamples ignored)."""
    alpha = (1.0 - float(level)) / 2.0
    with np.errstate(invalid="ignore"):
        low, high = np.nanquantile(samples, [alpha, 1.0 - alpha], axis=0)
    return low, high


def bootstrap_ci(
    values: Any,
    counts: Any = None,
    *,
    level: float = DEFAULT_LEVEL,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval over sequences of ``sum(values) / sum(counts)`` (or the mean of
    ``values`` without counts): ``(ci_low, ci_high)``, each shaped like ``values[0]``."""
    check_interval(level, n_boot)
    values = np.asarray(values, dtype=np.float64)
    weights = resample_weights(values.shape[0], n_boot, seed)
    return percentile_interval(resampled_means(values, counts, weights=weights), level)


@dataclass(frozen=True)
class Split:
    """Sequence indices (into the dataset as given) used to pick experts and to measure them."""

    discover: np.ndarray
    evaluate: np.ndarray
    how: str

    @property
    def held_out(self) -> bool:
        """True when no sequence is in both sets."""
        return not np.intersect1d(self.discover, self.evaluate).size


def split_sequences(n_seq: int, split: Any = "halves", groups: Sequence[Any] | None = None) -> Split:
    """The discover / evaluate split of ``n_seq`` sequences.

    ``split``: ``"halves"`` (default) — every other sequence (0, 2, 4, ... discover; 1, 3, 5, ...
    evaluate), counted within each group when ``groups`` (one label per sequence) is given, so each group
    is split in two halves and ordered data (e.g. sorted by domain) still splits evenly; ``None`` or
    ``"none"`` — both sets are all sequences (selection in sample, say so where it is shown);
    ``(discover, evaluate)`` — two explicit lists of sequence indices.
    """
    if split is None or (isinstance(split, str) and split == "none"):
        every = np.arange(n_seq)
        return Split(every, every, "in sample (no split)")
    wrong = f"split must be 'halves', 'none', None or (discover, evaluate) index lists; got {split!r}"
    if isinstance(split, str):
        if split != "halves":
            raise ValueError(wrong)
        if n_seq < 2:
            raise ValueError(f"split='halves' needs at least 2 sequences, got {n_seq}; pass split=None to use them all")
        labels = np.zeros(n_seq, dtype=np.int64) if groups is None else _codes(groups, n_seq)
        rank = np.zeros(n_seq, dtype=np.int64)
        for code in np.unique(labels):
            where = np.flatnonzero(labels == code)
            rank[where] = np.arange(len(where))
        discover, evaluate = np.flatnonzero(rank % 2 == 0), np.flatnonzero(rank % 2 == 1)
        return Split(discover, evaluate, "held out (discover on one half of the texts, evaluate on the other)")
    try:
        discover, evaluate = (np.asarray(sorted({int(i) for i in part}), dtype=np.int64) for part in split)
    except (TypeError, ValueError) as err:
        raise ValueError(wrong) from err
    for name, part in (("discover", discover), ("evaluate", evaluate)):
        if not part.size or part.min() < 0 or part.max() >= n_seq:
            raise ValueError(f"split: the {name} indices must be a non-empty subset of 0..{n_seq - 1}")
    overlap = np.intersect1d(discover, evaluate).size
    how = "held out (explicit split)" if not overlap else "partly in sample (explicit split with shared texts)"
    return Split(discover, evaluate, how)


def _codes(groups: Sequence[Any], n_seq: int) -> np.ndarray:
    labels = list(groups)
    if len(labels) != n_seq:
        raise ValueError(f"groups has {len(labels)} labels but the dataset has {n_seq} sequences")
    index = {g: i for i, g in enumerate(dict.fromkeys(labels))}
    return np.asarray([index[g] for g in labels], dtype=np.int64)


def control_draws(
    n_expert: int, picked: Sequence[int], draws: int = DEFAULT_DRAWS, seed: int = 0, count: int | None = None
) -> list[list[int]]:
    """``draws`` random expert sets of ``count`` (default ``len(picked)``) experts of one layer, each drawn
    without replacement from the experts not in ``picked`` (sorted lists). Too few candidates: ValueError."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
        raise ValueError(f"controls (random draws) must be an integer >= 0, got {draws!r}")
    picked = sorted({int(e) for e in picked})
    count = len(picked) if count is None else int(count)
    candidates = np.asarray([e for e in range(n_expert) if e not in picked], dtype=np.int64)
    if draws and count > len(candidates):
        raise ValueError(
            f"a control needs {count} experts outside the {len(picked)} picked, but only {len(candidates)} of "
            f"{n_expert} remain; ablate fewer experts or pass controls=0"
        )
    rng = np.random.default_rng(seed)
    return [sorted(int(e) for e in rng.choice(candidates, size=count, replace=False)) for _ in range(draws)]


def fit_through_origin(x: Any, y: Any) -> dict[str, float]:
    """Least squares ``y ≈ slope * x`` through the origin: ``slope = Σxy / Σx²`` and its
    ``r2 = 1 - Σ(y - slope x)² / Σy²`` (uncentred, as fits through the origin are judged); ``r2_identity =
    1 - Σ(y - x)² / Σ(y - ȳ)²``, the R² of the line y = x (1 = y equals x; <= 0 = no better than ȳ); and
    the Pearson ``r``. NaN pairs dropped; fewer than 2 pairs: ValueError."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2:
        raise ValueError(f"only {len(x)} finite pairs; a fit needs at least 2")
    sxx, syy, spread = float(x @ x), float(y @ y), float(((y - y.mean()) ** 2).sum())
    slope = float(x @ y) / sxx if sxx else float("nan")
    r2 = 1.0 - float(((y - slope * x) ** 2).sum()) / syy if syy else float("nan")
    r2_identity = 1.0 - float(((y - x) ** 2).sum()) / spread if spread else float("nan")
    r = float(np.corrcoef(x, y)[0, 1]) if x.std() and y.std() else float("nan")
    return {"r": r, "slope": slope, "r2": r2, "r2_identity": r2_identity, "n": int(len(x))}
