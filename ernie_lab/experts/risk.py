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
from ernie_lab.noise import (
    DEFAULT_DRAWS,
    DEFAULT_LEVEL,
    DEFAULT_N_BOOT,
    check_interval,
    control_draws,
    percentile_interval,
    resample_weights,
    resampled_means,
    split_sequences,
)
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


def _per_sequence(r: Routing, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence of ``r``: selections ``[seq layer*expert]`` and marked tokens ``[seq]`` (float64)."""
    n_seq = int(r.seq.max()) + 1 if r.n_tokens else 0
    member = torch.zeros(len(r.layers), r.n_tokens, r.n_experts, dtype=torch.float64)
    member.scatter_(2, r.idx, 1.0)  # 1[e in S_t]
    member = member[:, tokens].permute(1, 0, 2).reshape(int(tokens.sum()), -1)
    seq = r.seq[tokens]
    counts = torch.zeros(n_seq, member.shape[1], dtype=torch.float64).index_add_(0, seq, member)
    return counts.numpy(), torch.bincount(seq, minlength=n_seq).double().numpy()


def _halves(r: Routing, tokens: torch.Tensor, split: Any):
    """The discover / evaluate sequences of ``r`` that hold marked tokens (split by group when r has groups)."""
    n_seq = int(r.seq.max()) + 1 if r.n_tokens else 0
    groups = None
    if r.groups is not None:
        seqs, first = np.unique(r.seq.numpy(), return_index=True)  # each sequence's first token
        groups = [None] * n_seq
        for s, i in zip(seqs, first, strict=True):
            groups[int(s)] = r.groups[int(i)]
    halves = split_sequences(n_seq, split, groups)
    marked = torch.bincount(r.seq[tokens], minlength=n_seq).numpy() > 0
    discover, evaluate = (part[marked[part]] for part in (halves.discover, halves.evaluate))
    if not len(discover) or not len(evaluate):
        raise ValueError("no marked token in the discover or the evaluate sequences; pass split=None or more texts")
    return discover, evaluate, halves.how


def risk_frame(
    r_a: Routing,
    tokens_a: torch.Tensor,
    r_b: Routing,
    tokens_b: torch.Tensor,
    *,
    split: Any = "halves",
    controls: int = DEFAULT_DRAWS,
    level: float = DEFAULT_LEVEL,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> pd.DataFrame:
    """The :func:`risk_difference` table from two routing records and their ``[N]`` token masks."""
    if r_a.layers != r_b.layers or r_a.n_experts != r_b.n_experts:
        raise ValueError("the two routing records differ in layers or experts")
    check_interval(level, n_boot)
    control_draws(r_a.n_experts, [0], controls, seed, count=1)  # argument check
    n_expert, n_layer = r_a.n_experts, len(r_a.layers)
    sides = []
    for r, tokens in ((r_a, tokens_a), (r_b, tokens_b)):
        if int(tokens.sum()) == 0:
            raise ValueError("no token is marked: the selection rate is undefined")
        sums, count = _per_sequence(r, tokens)
        discover, evaluate, how = _halves(r, tokens, split)
        sides.append((sums, count, discover, evaluate, how))
    (sa, ca, da, ea, how), (sb, cb, db, eb, _) = sides
    rate = lambda sums, count, rows: sums[rows].sum(0) / count[rows].sum()  # noqa: E731
    rd = rate(sa, ca, da) - rate(sb, cb, db)  # [layer*expert]: what picks experts
    held = rate(sa, ca, ea) - rate(sb, cb, eb)  # what measures them
    boot = resampled_means(sa[ea], ca[ea], weights=resample_weights(len(ea), n_boot, seed)) - resampled_means(
        sb[eb], cb[eb], weights=resample_weights(len(eb), n_boot, seed + 1)
    )
    frame = pd.DataFrame(
        {
            "layer": np.repeat(r_a.layers, n_expert),
            "expert": np.tile(np.arange(n_expert), n_layer),
            "p_a": rate(sa, ca, da),
            "p_b": rate(sb, cb, db),
            "rd": rd,
            "n_a": int(ca[da].sum()),
            "n_b": int(cb[db].sum()),
        }
    )
    extra = []
    for li, L in enumerate(r_a.layers):  # control: random experts other than the layer's largest |rd|
        top = int(np.abs(rd[li * n_expert : (li + 1) * n_expert]).argmax())
        draws = [d[0] for d in control_draws(n_expert, [top], controls, seed + L, count=1)]
        if draws:
            at = [li * n_expert + e for e in draws]
            extra.append((L, at, f"random: {' | '.join(f'[{e}]' for e in draws)}"))
    held_all = np.concatenate([held, [held[at].mean() for _, at, _ in extra]])
    boot_all = np.concatenate([boot, np.stack([boot[:, at].mean(1) for _, at, _ in extra], 1)], 1) if extra else boot
    low, high = percentile_interval(boot_all, level)
    controls_frame = pd.DataFrame({"layer": [L for L, _, _ in extra], "expert": -1, "experts": [s for *_, s in extra]})
    frame = pd.concat([frame.assign(experts=[f"[{e}]" for e in frame["expert"]]), controls_frame], ignore_index=True)
    return frame.assign(
        rd_heldout=held_all,
        ci_low=low,
        ci_high=high,
        n_seq_a=len(ea),
        n_seq_b=len(eb),
        control=[False] * len(rd) + [True] * len(extra),
        split=how,
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
    *,
    split: Any = "halves",
    controls: int = DEFAULT_DRAWS,
    level: float = DEFAULT_LEVEL,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> pd.DataFrame:
    """Per (layer, expert): ``p_a`` and ``p_b``, the fraction of tokens of set A (B) whose selected
    set (bias-corrected top-k) holds the expert, and ``rd = p_a - p_b``, on the discover half of each set
    (``split``, see :func:`ernie_lab.noise.split_sequences`; ``None``: every text) — what
    :func:`steering_sets` picks from; ``rd_heldout`` on the evaluate halves with its ``level`` bootstrap
    interval ``ci_low``, ``ci_high`` (sequences of A and B resampled independently, ``n_boot`` times).
    Control rows (``control=True``, expert -1), one per layer: ``controls`` random experts other than the
    layer's largest |rd|, their rd_heldout averaged.

    ``marks_a`` / ``marks_b``: optionally one bool sequence per prompt, one entry per real token,
    restricting the rates to the marked tokens. Columns: layer, expert, p_a, p_b, rd, n_a, n_b (marked
    discover tokens), experts, rd_heldout, ci_low, ci_high, n_seq_a, n_seq_b, control, split.
    """
    check_interval(level, n_boot)
    r_a = collect_routing(model, data_a, tokenizer, batch_size, progress=progress)
    tokens_a = token_marks(r_a, marks_a, "marks_a")
    r_b = collect_routing(model, data_b, tokenizer, batch_size, progress=progress)
    tokens_b = token_marks(r_b, marks_b, "marks_b")
    noise = {"split": split, "controls": controls, "level": level, "n_boot": n_boot, "seed": seed}
    return risk_frame(r_a, tokens_a, r_b, tokens_b, **noise)


def steering_sets(df: pd.DataFrame, n: int = 1, min_rd: float = 0.0, check_finite: bool = True) -> tuple[dict, dict]:
    """``(on, off)`` for ``steer_experts`` that push generation towards set A: per layer the ``n``
    experts with the largest ``rd`` (above ``min_rd``) on and the ``n`` with the most negative
    (below ``-min_rd``) off. ``n``: an integer >= 0; ``min_rd``: a number in [0, 1]; the frame's ``rd``
    must be finite (NonFiniteError otherwise)."""
    n = as_count(n, "n")
    min_rd = as_number(min_rd, "min_rd", 0.0, 1.0)
    if "control" in df.columns:  # control rows carry no rd of their own
        df = df[~df["control"].astype(bool)]
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
