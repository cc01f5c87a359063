"""Routing statistics (formulas: README, Definitions), computed from a :class:`~ernie_lab.routing.record.Routing`.

Every function returns a tidy DataFrame (one row per observation). Notation (README, Definitions): N real
tokens t, E routed experts, top-k sets S_t, unbiased router probabilities p_{t,e}, renormalised
weights w_{t,e}. Axes: layer N expert topk, as in ``Routing``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from ernie_lab.model.checks import as_count
from ernie_lab.routing.persistence import consecutive
from ernie_lab.routing.record import Routing


def _slot_counts(idx: torch.Tensor, n_expert: int, row: torch.Tensor | None = None, n_row: int = 1) -> torch.Tensor:
    """Count routing slots: ``[layer n_row expert]``, slots of token t counted in row ``row[t]``.

    ``idx [layer N topk]``; ``row [N]`` (default: all tokens in row 0). Each (t, e) pair counts at
    most once because the k experts of a token are distinct.
    """
    n_layer, n, k = idx.shape
    row = torch.zeros(n, dtype=torch.long) if row is None else row.long()
    flat = (row[None, :, None] * n_expert + idx).reshape(n_layer, n * k)
    counts = torch.zeros(n_layer, n_row * n_expert, dtype=torch.float64)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
    return counts.reshape(n_layer, n_row, n_expert)


def _load(r: Routing) -> torch.Tensor:
    """``load_e = (1/(N k)) sum_t 1[e in S_t]`` -> ``[layer expert]`` (float64)."""
    return _slot_counts(r.idx, r.n_experts)[:, 0] / (r.n_tokens * r.k)


def _grid(r: Routing, **columns: torch.Tensor) -> pd.DataFrame:
    """Tidy layer x expert frame from ``[layer expert]`` tensors."""
    n_layer, n_expert = len(r.layers), r.n_experts
    frame = {
        "layer": np.repeat(r.layers, n_expert),
        "expert": np.tile(np.arange(n_expert), n_layer),
    }
    frame.update({name: t.double().reshape(-1).numpy() for name, t in columns.items()})
    return pd.DataFrame(frame)


def _per_token(r: Routing, name: str, values: torch.Tensor) -> pd.DataFrame:
    """Tidy frame of a ``[layer N]`` per-token value with token metadata."""
    n_layer, n = len(r.layers), r.n_tokens
    frame: dict[str, Any] = {
        "layer": np.repeat(r.layers, n),
        "token": np.tile(np.arange(n), n_layer),
        "seq": np.tile(r.seq.numpy(), n_layer),
        "pos": np.tile(r.pos.numpy(), n_layer),
        "token_id": np.tile(r.token_ids.numpy(), n_layer),
    }
    if r.groups is not None:
        frame["group"] = np.tile(r.groups, n_layer)
    frame[name] = values.double().reshape(-1).numpy()
    return pd.DataFrame(frame)


def _require_tokens(r: Routing) -> None:
    if r.n_tokens == 0:
        raise ValueError("the Routing holds no tokens")


# --------------------------------------------------------------------------- load and balance
def expert_load(r: Routing) -> pd.DataFrame:
    """Per (layer, expert): ``count`` of tokens routed to it, ``load`` (fraction of routing slots,
    uniform = 1/E), ``wload = (1/N) sum_t w_{t,e}`` and ``mean_prob = P_e = (1/N) sum_t p_{t,e}``."""
    _require_tokens(r)
    counts = _slot_counts(r.idx, r.n_experts)[:, 0]
    wsum = torch.zeros(len(r.layers), r.n_experts, dtype=torch.float64)
    wsum.scatter_add_(1, r.idx.flatten(1), r.weights.double().flatten(1))
    return _grid(
        r,
        count=counts,
        load=counts / (r.n_tokens * r.k),
        wload=wsum / r.n_tokens,
        mean_prob=r.probs.double().mean(1),
    ).astype({"count": "int64"})


def balance(r: Routing) -> pd.DataFrame:
    """Per layer: ``cv = std_e(load_e) / mean_e(load_e)`` (population std over experts),
    ``max_vio = (max_e load_e - 1/E) / (1/E)`` and ``load_entropy = H(load) / log E`` (0 log 0 = 0)."""
    _require_tokens(r)
    load = _load(r)
    uniform = 1.0 / r.n_experts
    plogp = torch.where(load > 0, load * load.log(), torch.zeros_like(load))
    return pd.DataFrame(
        {
            "layer": r.layers,
            "cv": (load.std(-1, correction=0) / load.mean(-1)).numpy(),
            "max_vio": ((load.max(-1).values - uniform) / uniform).numpy(),
            "load_entropy": (-plogp.sum(-1) / math.log(r.n_experts)).numpy(),
        }
    )


# --------------------------------------------------------------------------- per-token router stats
def router_entropy(r: Routing) -> pd.DataFrame:
    """Per (layer, token): ``entropy = -sum_e p_{t,e} log p_{t,e} / log E`` (1 = uniform router).

    Columns: layer, token, seq, pos, token_id, [group], entropy. ``layer_summary(df, "entropy")``
    gives the per-layer mean and distribution.
    """
    p = r.probs.double()
    plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
    return _per_token(r, "entropy", -plogp.sum(-1) / math.log(r.n_experts))


def topk_confidence(r: Routing) -> pd.DataFrame:
    """Per (layer, token): ``confidence = sum_{e in S_t} p_{t,e}``, the probability mass the selected
    experts hold before renormalising (k/E for a uniform router, 1 when the rest get nothing)."""
    return _per_token(r, "confidence", r.probs.double().gather(-1, r.idx).sum(-1))


def layer_summary(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per-layer summary of a per-token column: mean, std, q10, median, q90, n."""
    g = df.groupby("layer", sort=True)[value]
    out = pd.DataFrame(
        {
            "mean": g.mean(),
            "std": g.std(ddof=0),
            "q10": g.quantile(0.1),
            "median": g.median(),
            "q90": g.quantile(0.9),
            "n": g.size(),
        }
    )
    return out.reset_index()


def bias_effect(r: Routing) -> pd.DataFrame:
    """Per layer: how often the correction bias changes the selection.

    ``frac_changed`` = fraction of tokens whose S_t (the recorded selection) differs, as a set, from
    the top-k of p without the bias; ``mean_swapped`` = mean number of experts of S_t not in that
    unbiased top-k. Columns: layer, n_tokens, n_changed, frac_changed, mean_swapped.
    """
    _require_tokens(r)
    unbiased = r.probs.topk(r.k, dim=-1).indices
    kept = (r.idx[..., :, None] == unbiased[..., None, :]).any(-1).sum(-1)  # |S_t ∩ topk(p)| [layer N]
    changed = (kept < r.k).sum(-1)
    return pd.DataFrame(
        {
            "layer": r.layers,
            "n_tokens": r.n_tokens,
            "n_changed": changed.numpy(),
            "frac_changed": (changed.double() / r.n_tokens).numpy(),
            "mean_swapped": (r.k - kept).double().mean(-1).numpy(),
        }
    )


# --------------------------------------------------------------------------- co-activation
def coactivation_matrix(r: Routing, layer: int, normalise: bool = True) -> torch.Tensor:
    """``[expert expert]`` co-activation of MoE layer ``layer``.

    Raw: ``count[i, j] = #{t: i in S_t and j in S_t}`` (diagonal = tokens routed to i). Normalised:
    ``C[i, j] = count[i, j] / count[i, i]`` (row-normalised, diagonal 1; NaN rows for experts never
    selected).
    """
    idx = r.idx[r.layer_index(layer)]
    member = torch.zeros(r.n_tokens, r.n_experts, dtype=torch.float64)
    member.scatter_(1, idx, 1.0)  # 1[e in S_t]  [N expert]
    counts = member.T @ member
    if not normalise:
        return counts
    return counts / counts.diagonal()[:, None]


def coactivation(r: Routing, layer: int | None = None) -> pd.DataFrame:
    """Tidy co-activation: one row per (layer, i, j) with ``count`` and ``frac`` = C[i, j]
    (see :func:`coactivation_matrix`). ``layer=None`` gives every recorded layer."""
    _require_tokens(r)
    layers = r.layers if layer is None else [r.layers[r.layer_index(layer)]]
    n_expert = r.n_experts
    frames = []
    for L in layers:
        counts = coactivation_matrix(r, L, normalise=False)
        frac = counts / counts.diagonal()[:, None]
        frames.append(
            pd.DataFrame(
                {
                    "layer": L,
                    "i": np.repeat(np.arange(n_expert), n_expert),
                    "j": np.tile(np.arange(n_expert), n_expert),
                    "count": counts.reshape(-1).numpy().astype(np.int64),
                    "frac": frac.reshape(-1).numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- specialisation
def domain_specialisation(r: Routing) -> pd.DataFrame:
    """Per (layer, group, expert): ``spec(e, D) = #{t in D: e in S_t} / #{t in D}`` and the lift
    ``spec / (k/E)`` (1 = uniform routing). Needs ``r.groups``.

    Columns: layer, group, expert, n_tokens (tokens in D), count, spec, lift.
    """
    if r.groups is None:
        raise ValueError("domain_specialisation needs group labels: collect_routing(..., groups=...)")
    _require_tokens(r)
    codes, names = pd.factorize(pd.Series(r.groups), sort=True)
    codes_t = torch.as_tensor(codes, dtype=torch.long)
    n_group = len(names)
    counts = _slot_counts(r.idx, r.n_experts, codes_t, n_group)  # [layer group expert]
    n_d = torch.bincount(codes_t, minlength=n_group).double()  # #{t in D}
    spec = counts / n_d[None, :, None]
    n_layer, n_expert = len(r.layers), r.n_experts
    return pd.DataFrame(
        {
            "layer": np.repeat(r.layers, n_group * n_expert),
            "group": np.tile(np.repeat(np.asarray(names, dtype=object), n_expert), n_layer),
            "expert": np.tile(np.arange(n_expert), n_layer * n_group),
            "n_tokens": np.tile(np.repeat(n_d.numpy().astype(np.int64), n_expert), n_layer),
            "count": counts.reshape(-1).numpy().astype(np.int64),
            "spec": spec.reshape(-1).numpy(),
            "lift": (spec / (r.k / r.n_experts)).reshape(-1).numpy(),
        }
    )


def vocab_specialisation(
    r: Routing, tokenizer: Any = None, min_count: int = 5, top: int = 10, key: str = "token"
) -> pd.DataFrame:
    """Per (layer, expert): the ``top`` token ids with the highest lift.

    ``key="token"`` keys each routing decision on the input token x_t; ``key="next_token"`` on the
    ground-truth next token x_{t+1} (output-side specialisation; tokens without a next real token in
    their sequence are left out, and loads are taken over the tokens kept).

    For token id v with ``n_v >= min_count`` occurrences: ``vspec(e, v) = #{t: x_t = v, e in S_t} / n_v``
    and ``lift = vspec(e, v) / load_e / k`` (1 = the expert takes v as often as any token).
    Experts with zero load are skipped (lift undefined). Ties in lift go to the more frequent token.

    Columns: layer, expert, rank (1 = highest lift), token_id, [token], n_v, hits, vspec, lift.
    ``token`` (readable string) is added when a tokenizer is given.
    """
    min_count, top = as_count(min_count, "min_count", low=1), as_count(top, "top", low=1)
    if key == "next_token":
        t, nxt = consecutive(r)
        r = Routing(
            r.layers,
            r.probs[:, t],
            r.idx[:, t],
            r.weights[:, t],
            r.bias,
            token_ids=r.token_ids[nxt],
            check_finite=r.check_finite,
        )
    elif key != "token":
        raise ValueError(f"key must be 'token' or 'next_token', got {key!r}")
    _require_tokens(r)
    vocab, inverse, n_v = torch.unique(r.token_ids, return_inverse=True, return_counts=True)
    keep = n_v >= min_count
    if not bool(keep.any()):
        raise ValueError(f"no token id occurs at least min_count={min_count} times")
    load = _load(r)
    # order candidate tokens by frequency (desc, then id) so a stable sort by lift breaks ties that way
    by_freq = torch.argsort(n_v.double() - torch.arange(len(vocab)) / (len(vocab) + 1.0), descending=True)
    by_freq = by_freq[keep[by_freq]]
    rows = []
    for li, L in enumerate(r.layers):
        hits = _slot_counts(r.idx[li : li + 1], r.n_experts, inverse, len(vocab))[0][by_freq]  # [v expert]
        vspec = hits / n_v[by_freq, None].double()
        lift = vspec / load[li][None, :] / r.k
        n_top = min(top, len(by_freq))
        order = torch.sort(lift.T, dim=-1, descending=True, stable=True).indices[:, :n_top]  # [expert top]
        experts = torch.nonzero(load[li] > 0).flatten()
        order = order[experts]
        cols = order.reshape(-1)
        ex = experts.repeat_interleave(n_top)
        rows.append(
            pd.DataFrame(
                {
                    "layer": L,
                    "expert": ex.numpy(),
                    "rank": np.tile(np.arange(1, n_top + 1), len(experts)),
                    "token_id": vocab[by_freq][cols].numpy(),
                    "n_v": n_v[by_freq][cols].numpy(),
                    "hits": hits[cols, ex].numpy().astype(np.int64),
                    "vspec": vspec[cols, ex].numpy(),
                    "lift": lift[cols, ex].numpy(),
                }
            )
        )
    out = pd.concat(rows, ignore_index=True)
    if tokenizer is not None:
        out.insert(4, "token", _token_strings(tokenizer, out["token_id"].tolist()))
    return out


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return [tokenizer.decode([i]) for i in ids]


# --------------------------------------------------------------------------- comparisons
def routing_agreement(r_a: Routing, r_b: Routing, pairs: list[tuple[int, int]] | None = None) -> pd.DataFrame:
    """Per layer: ``overlap = mean_t |S_t^a ∩ S_t^b| / k`` on aligned tokens (token t of a with token
    t of b: clean vs corrupted prompts of equal length, two checkpoints, ...).

    ``pairs`` compares layer ``la`` of a with layer ``lb`` of b (e.g. ``routing_agreement(r, r,
    [(1, 2), (2, 3)])`` for neighbouring layers); default: every layer recorded in both.
    Columns: layer (of a), layer_b, n_tokens, overlap, identical (fraction of tokens with S^a = S^b).
    """
    if r_a.n_tokens != r_b.n_tokens:
        raise ValueError(f"runs are not aligned: {r_a.n_tokens} tokens vs {r_b.n_tokens}")
    if r_a.k != r_b.k or r_a.n_experts != r_b.n_experts:
        raise ValueError(f"runs differ in k or E: ({r_a.k}, {r_a.n_experts}) vs ({r_b.k}, {r_b.n_experts})")
    _require_tokens(r_a)
    if pairs is None:
        pairs = [(L, L) for L in r_a.layers if L in r_b.layers]
    ia = torch.tensor([r_a.layer_index(la) for la, _ in pairs], dtype=torch.long)
    ib = torch.tensor([r_b.layer_index(lb) for _, lb in pairs], dtype=torch.long)
    a, b = r_a.idx[ia], r_b.idx[ib]
    shared = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)  # |S^a ∩ S^b|  [pair N]
    return pd.DataFrame(
        {
            "layer": [la for la, _ in pairs],
            "layer_b": [lb for _, lb in pairs],
            "n_tokens": r_a.n_tokens,
            "overlap": (shared.double() / r_a.k).mean(-1).numpy(),
            "identical": (shared == r_a.k).double().mean(-1).numpy(),
        }
    )


def shared_vs_routed(r: Routing) -> pd.DataFrame:
    """Per layer: mean L2 norm of the shared and of the routed output, their ratio (shared / routed),
    and the mean cosine between them. NaN where the model has no shared experts."""
    if r.shared_norm is None or r.routed_norm is None or r.cosine is None:
        raise ValueError("this Routing has no output norms; collect it with collect_routing")
    shared, routed = r.shared_norm.double().mean(-1), r.routed_norm.double().mean(-1)
    return pd.DataFrame(
        {
            "layer": r.layers,
            "shared_norm": shared.numpy(),
            "routed_norm": routed.numpy(),
            "norm_ratio": (shared / routed).numpy(),
            "cosine": r.cosine.double().mean(-1).numpy(),
        }
    )


def load_difference(base: Routing, other: Routing) -> pd.DataFrame:
    """Per (layer, expert): load without and with an intervention and the difference.

    Columns: layer, expert, load_base, load_other, diff (= load_other - load_base).
    """
    a, b = expert_load(base), expert_load(other)
    out = a[["layer", "expert", "load"]].rename(columns={"load": "load_base"})
    out["load_other"] = b["load"].to_numpy()
    out["diff"] = out["load_other"] - out["load_base"]
    return out
