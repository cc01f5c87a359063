"""Routing persistence along a sequence (Mixtral paper, arXiv 2401.04088 §5): how often consecutive
tokens keep their experts, against the chance levels of uniform, independent routing.

Axes: layer N topk, as ``Routing``. Top-1 is the first slot of ``hook_topk_idx``: the highest
bias-corrected selection score.
"""

from __future__ import annotations

from math import comb

import pandas as pd
import torch

from ernie_lab.routing.record import Routing


def overlap_chance(n_expert: int, k: int) -> float:
    """``P(S ∩ S' != ∅)`` for two independent uniform k-subsets of E: ``1 - C(E-k, k) / C(E, k)``."""
    return 1.0 - comb(n_expert - k, k) / comb(n_expert, k)


def jaccard_chance(n_expert: int, k: int) -> float:
    """Expected Jaccard ``|S ∩ S'| / |S ∪ S'|`` of two independent uniform k-subsets of E:
    ``sum_j P(j) j / (2k - j)`` with the hypergeometric ``P(j) = C(k, j) C(E-k, k-j) / C(E, k)``."""
    total = comb(n_expert, k)
    return sum(comb(k, j) * comb(n_expert - k, k - j) / total * j / (2 * k - j) for j in range(k + 1))


def consecutive(r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices ``(t, t+1)`` of every consecutive pair inside one sequence: two ``[pairs]`` tensors."""
    t = torch.arange(r.n_tokens - 1)
    same = (r.seq[1:] == r.seq[:-1]) & (r.pos[1:] == r.pos[:-1] + 1)
    t = t[same]
    return t, t + 1


def persistence(r: Routing) -> pd.DataFrame:
    """Per layer, over consecutive real tokens of the same sequence:

    ``top1_repeat = P(top1_t = top1_{t+1})`` (chance ``1/E``), ``overlap = P(S_t ∩ S_{t+1} != ∅)``
    (chance :func:`overlap_chance`) and ``jaccard = mean |S_t ∩ S_{t+1}| / |S_t ∪ S_{t+1}|`` (chance
    :func:`jaccard_chance`). Columns: layer, n_pairs, top1_repeat, top1_repeat_chance, overlap,
    overlap_chance, jaccard, jaccard_chance.
    """
    a, b = consecutive(r)
    if len(a) == 0:
        raise ValueError("the Routing holds no consecutive tokens of one sequence")
    sa, sb = r.idx[:, a], r.idx[:, b]  # [layer pairs topk]
    shared = (sa[..., :, None] == sb[..., None, :]).any(-1).sum(-1).double()  # |S_t ∩ S_{t+1}|
    return pd.DataFrame(
        {
            "layer": r.layers,
            "n_pairs": len(a),
            "top1_repeat": (sa[..., 0] == sb[..., 0]).double().mean(-1).numpy(),
            "top1_repeat_chance": 1.0 / r.n_experts,
            "overlap": (shared > 0).double().mean(-1).numpy(),
            "overlap_chance": overlap_chance(r.n_experts, r.k),
            "jaccard": (shared / (2 * r.k - shared)).mean(-1).numpy(),
            "jaccard_chance": jaccard_chance(r.n_experts, r.k),
        }
    )
