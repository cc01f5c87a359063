"""Risk difference of expert selection between two prompt sets (SteerMoE, arXiv 2509.09660), and the
steering sets it suggests for ``el.interventions.steer_experts``, and the weights forced-in experts get."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ernie_lab.interventions import steer_experts
from ernie_lab.model.checks import as_count, as_number, check_frame_finite, expert_map
from ernie_lab.routing import Routing, collect_routing


def token_marks(r: Routing, marks: Sequence[Any] | None, name: str = "marks") -> torch.Tensor:
    """``[N]`` bool over the tokens of ``r`` from one bool sequence per prompt (None: every token)."""
    if marks is None:
        return torch.ones(r.n_tokens, dtype=torch.bool)
    parts = [torch.as_tensor(m, dtype=torch.bool).flatten() for m in marks]
    lengths = torch.bincount(r.seq).tolist()
    if [len(p) for p in parts] != lengths:
        raise ValueError(f"{name} needs one bool per real token of each sequence: lengths {lengths}")
    return torch.cat(parts)


def selection_rate(r: Routing, tokens: torch.Tensor) -> torch.Tensor:
    """``[layer expert]`` float64: the fraction of the ``tokens`` (``[N]`` bool) whose selected set
    holds the expert."""
    n = int(tokens.sum())
    if n == 0:
        raise ValueError("no token is marked: the selection rate is undefined")
    member = torch.zeros(len(r.layers), n, r.n_experts, dtype=torch.float64)
    member.scatter_(2, r.idx[:, tokens], 1.0)  # 1[e in S_t]
    return member.mean(1)


def risk_frame(r_a: Routing, tokens_a: torch.Tensor, r_b: Routing, tokens_b: torch.Tensor) -> pd.DataFrame:
    """The :func:`risk_difference` table from two routing records and their ``[N]`` token masks."""
    if r_a.layers != r_b.layers or r_a.n_experts != r_b.n_experts:
        raise ValueError("the two routing records differ in layers or experts")
    pa, pb = selection_rate(r_a, tokens_a), selection_rate(r_b, tokens_b)
    n_expert = r_a.n_experts
    return pd.DataFrame(
        {
            "layer": np.repeat(r_a.layers, n_expert),
            "expert": np.tile(np.arange(n_expert), len(r_a.layers)),
            "p_a": pa.reshape(-1).numpy(),
            "p_b": pb.reshape(-1).numpy(),
            "rd": (pa - pb).reshape(-1).numpy(),
            "n_a": int(tokens_a.sum()),
            "n_b": int(tokens_b.sum()),
        }
    )


def risk_difference(
    model,
    data_a: Any,
    data_b: Any,
    tokenizer: Any = None,
    marks_a: Sequence[Any] | None = None,
    marks_b: Sequence[Any] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Per (layer, expert): ``p_a`` and ``p_b``, the fraction of tokens of set A (B) whose selected
    set (bias-corrected top-k) holds the expert, and ``rd = p_a - p_b``.

    ``marks_a`` / ``marks_b``: optionally one bool sequence per prompt, one entry per real token,
    restricting the rates to the marked tokens. Columns: layer, expert, p_a, p_b, rd, n_a, n_b.
    """
    r_a = collect_routing(model, data_a, tokenizer, batch_size, progress=progress)
    tokens_a = token_marks(r_a, marks_a, "marks_a")
    r_b = collect_routing(model, data_b, tokenizer, batch_size, progress=progress)
    return risk_frame(r_a, tokens_a, r_b, token_marks(r_b, marks_b, "marks_b"))


def steering_sets(df: pd.DataFrame, n: int = 1, min_rd: float = 0.0, check_finite: bool = True) -> tuple[dict, dict]:
    """``(on, off)`` for ``steer_experts`` that push generation towards set A: per layer the ``n``
    experts with the largest ``rd`` (above ``min_rd``) on and the ``n`` with the most negative
    (below ``-min_rd``) off. ``n``: an integer >= 0; ``min_rd``: a number in [0, 1]; the frame's ``rd``
    must be finite (NonFiniteError otherwise)."""
    n = as_count(n, "n")
    min_rd = as_number(min_rd, "min_rd", 0.0, 1.0)
    if check_finite:
        check_frame_finite(df, ["rd"], "steering_sets")
    on, off = {}, {}
    for layer, sub in df.groupby("layer", sort=True):
        ranked = sub.sort_values(["rd", "expert"], ascending=[False, True], kind="stable")
        up = ranked[ranked["rd"] > min_rd]["expert"].iloc[:n]
        down = ranked[ranked["rd"] < -min_rd]["expert"].iloc[::-1][:n]
        if len(up):
            on[int(layer)] = sorted(int(e) for e in up)
        if len(down):
            off[int(layer)] = sorted(int(e) for e in down)
    return on, off


@torch.no_grad()
def forced_weights(
    model, input_ids: torch.Tensor, on: dict, off: dict | None = None, attention_mask: torch.Tensor | None = None
) -> pd.DataFrame:
    """The mixing weight each forced-on expert gets under ``steer_experts(model, on, off)``: its
    unbiased router prob renormalised over the steered set, so an expert the router dislikes gets a
    small weight however it is forced in. Columns: layer, expert, mean_weight, min_weight, mean_prob
    (its unbiased router prob), over the real tokens of ``input_ids [batch pos]``."""
    on = expert_map(model.config, on, "on")
    off = expert_map(model.config, {} if off is None else off, "off")
    names = [f"blocks.{L}.moe.hook_{p}" for L in on for p in ("router_probs", "topk_idx", "topk_weights")]
    hooks = steer_experts(model, on=on, off=off)
    _, cache = model.run_with_cache(input_ids, names_filter=names, attention_mask=attention_mask, fwd_hooks=hooks)
    real = torch.ones(input_ids.shape[-2:], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = []
    for L, experts in on.items():
        moe = f"blocks.{L}.moe.hook_"
        idx, w, probs = (
            cache[moe + p][real.to(cache[moe + p].device)] for p in ("topk_idx", "topk_weights", "router_probs")
        )
        for e in experts:
            weight = (w * (idx == e)).sum(-1)  # [n]: the expert is in every token's set
            rows.append(
                {
                    "layer": int(L),
                    "expert": int(e),
                    "mean_weight": float(weight.mean()),
                    "min_weight": float(weight.min()),
                    "mean_prob": float(probs[:, e].mean()),
                }
            )
    return pd.DataFrame(rows)
