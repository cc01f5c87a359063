"""Expert transitions between layers: where a token's top-1 expert at one layer sends it at another,
the normalised mutual information of the two choices, and the most frequent expert paths.

Axes: layer N topk expert, as ``Routing``; top-1 is the first slot of ``hook_topk_idx`` (the highest
bias-corrected selection score). Formulas: README "Definitions".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ernie_lab.model.checks import as_count, as_ints
from ernie_lab.routing.record import Routing
from ernie_lab.routing.stats import _require_tokens, _token_strings


def transition_counts(r: Routing, layer_a: int, layer_b: int) -> torch.Tensor:
    """``[expert expert]`` float64 counts: ``[i, j] = #{t: top1_a(t) = i, top1_b(t) = j}``."""
    _require_tokens(r)
    a, b = r.idx[r.layer_index(layer_a), :, 0], r.idx[r.layer_index(layer_b), :, 0]
    flat = torch.bincount(a * r.n_experts + b, minlength=r.n_experts**2)
    return flat.double().reshape(r.n_experts, r.n_experts)


def transitions(r: Routing, layer_a: int, layer_b: int) -> pd.DataFrame:
    """Per (i, j): ``count``, ``prob = P(top1_b = j | top1_a = i)`` (NaN for an i never top-1) and
    ``lift = prob / P(top1_b = j)`` (1 = independence). Columns: layer_a, layer_b, i, j, count, prob, lift;
    ``df.attrs["nmi"]`` holds the pair's normalised mutual information (:func:`nmi`)."""
    counts = transition_counts(r, layer_a, layer_b)
    layer_a, layer_b = int(layer_a), int(layer_b)  # integers: checked by layer_index
    prob = counts / counts.sum(1, keepdim=True)
    marginal_b = counts.sum(0) / counts.sum()
    n = r.n_experts
    frame = pd.DataFrame(
        {
            "layer_a": layer_a,
            "layer_b": layer_b,
            "i": np.repeat(np.arange(n), n),
            "j": np.tile(np.arange(n), n),
            "count": counts.reshape(-1).numpy().astype(np.int64),
            "prob": prob.reshape(-1).numpy(),
            "lift": (prob / marginal_b[None, :]).reshape(-1).numpy(),
        }
    )
    frame.attrs["nmi"] = nmi(counts)
    return frame


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def nmi(counts: torch.Tensor) -> float:
    """``I(A; B) / sqrt(H(A) H(B))`` of a joint count table (NaN when either choice is constant)."""
    joint = counts / counts.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    h_a, h_b, h_ab = _entropy(pa), _entropy(pb), _entropy(joint.reshape(-1))
    if h_a == 0 or h_b == 0:
        return float("nan")
    return (h_a + h_b - h_ab) / (h_a * h_b) ** 0.5


def transition_nmi(r: Routing) -> pd.DataFrame:
    """NMI of the top-1 choices for every pair of recorded layers ``a < b``.

    Columns: layer_a, layer_b, distance (``b - a`` in layers), nmi.
    """
    rows = [
        {"layer_a": a, "layer_b": b, "distance": b - a, "nmi": nmi(transition_counts(r, a, b))}
        for i, a in enumerate(r.layers)
        for b in r.layers[i + 1 :]
    ]
    if not rows:
        raise ValueError(f"transitions need two MoE layers; recorded: {r.layers}")
    return pd.DataFrame(rows)


def paths(
    r: Routing, layers: Sequence[int] | None = None, top: int = 10, tokenizer: Any = None, examples: int = 5
) -> pd.DataFrame:
    """The ``top`` most frequent top-1 expert paths through ``layers`` (default: every recorded layer).

    Columns: rank, path (experts, one per layer, joined by ``>``), count, frac (of all tokens),
    examples (up to ``examples`` distinct token ids, or strings with a ``tokenizer``, that took it).
    ``top`` >= 1 and ``examples`` >= 0 are integers; ``layers`` recorded layer ids.
    """
    top, examples = as_count(top, "top", low=1), as_count(examples, "examples")
    _require_tokens(r)
    layers = list(r.layers) if layers is None else as_ints(layers, "layers")
    top1 = torch.stack([r.idx[r.layer_index(L), :, 0] for L in layers], dim=1)  # [N layer]
    unique, inverse, counts = torch.unique(top1, dim=0, return_inverse=True, return_counts=True)
    order = sorted(range(len(unique)), key=lambda u: (-int(counts[u]), unique[u].tolist()))[:top]
    rows = []
    for rank, u in enumerate(order, start=1):
        ids = list(dict.fromkeys(r.token_ids[inverse == u].tolist()))[:examples]
        rows.append(
            {
                "rank": rank,
                "path": ">".join(str(e) for e in unique[u].tolist()),
                "count": int(counts[u]),
                "frac": float(counts[u]) / r.n_tokens,
                "examples": _token_strings(tokenizer, ids) if tokenizer is not None else ids,
            }
        )
    return pd.DataFrame(rows).assign(layers=">".join(str(L) for L in layers))
