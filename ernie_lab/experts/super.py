"""Super experts (arXiv 2507.23279): experts whose output carries rare, huge activations, and the
sink test that ablates them and watches the residual norm and the attention sink on the first token.

Axes: batch head pos kv_pos d_model, as the model's hook points.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ernie_lab.experts.collect import ExpertSums, expert_sums
from ernie_lab.interventions import zero_ablate_experts
from ernie_lab.io.datasets import as_sequences, check_batch_size, iter_batches
from ernie_lab.model.checks import ArgumentTypeError, as_number, expert_map
from ernie_lab.model.checks import check_finite as _check_finite


def super_experts(
    model,
    data: Any,
    tokenizer: Any = None,
    quantile: float = 0.995,
    rel: float = 0.1,
    batch_size: int = 8,
    progress: bool = True,
    check_finite: bool = True,
) -> pd.DataFrame:
    """Per (layer, expert): ``peak = max_t max_channel |f_e(t)|`` over the real tokens routed to it,
    and ``is_super``: ``peak > quantile_q(all peaks)`` and ``peak > rel * max(all peaks)``, over every
    (layer, expert) of the model. Columns: layer, expert, n_tokens, peak, peak_rank (1 = loudest of
    the model), is_super. Experts never selected have peak 0. NaN or inf at a router or expert point
    raises ``NonFiniteError`` naming the layer and hook point (``check_finite=False`` to skip).
    """
    _check_thresholds(quantile, rel)
    sums = expert_sums(model, data, tokenizer, batch_size, progress, check_finite=check_finite)
    return super_frame(sums, quantile, rel, check_finite)


def _check_thresholds(quantile: float, rel: float) -> None:
    as_number(quantile, "quantile", 0.0, 1.0, open_low=True, open_high=True)
    as_number(rel, "rel", 0.0, 1.0)


def super_frame(s: ExpertSums, quantile: float = 0.995, rel: float = 0.1, check_finite: bool = True) -> pd.DataFrame:
    """The :func:`super_experts` table from accumulated :class:`ExpertSums`."""
    _check_thresholds(quantile, rel)
    if check_finite:
        _check_finite(s.peak, "super_frame: the expert output peaks, blocks.{layer}.moe.hook_expert_out", s.layers)
    peak = s.peak.reshape(-1).numpy()
    threshold = max(float(np.quantile(peak, quantile)), rel * float(peak.max()))
    n_expert = s.peak.shape[1]
    frame = pd.DataFrame(
        {
            "layer": np.repeat(s.layers, n_expert),
            "expert": np.tile(np.arange(n_expert), len(s.layers)),
            "n_tokens": s.count.reshape(-1).numpy().astype(np.int64),
            "peak": peak,
        }
    )
    frame["peak_rank"] = frame["peak"].rank(ascending=False, method="first").astype("int64")
    frame["is_super"] = frame["peak"] > threshold
    return frame


def _as_expert_map(model, experts) -> dict[int, list[int]]:
    """``{layer: [expert]}`` from such a mapping or from a ``super_experts`` frame (its super rows)."""
    if isinstance(experts, pd.DataFrame):
        rows = experts[experts["is_super"]] if "is_super" in experts.columns else experts
        out: dict[int, list[int]] = {}
        for layer, expert in zip(rows["layer"], rows["expert"], strict=True):
            out.setdefault(int(layer), []).append(int(expert))
        return out
        return expert_map(model.config, out)
    if not isinstance(experts, Mapping):
        raise ArgumentTypeError("experts must be {layer: [expert, ...]} or a super_experts frame")
    return expert_map(model.config, experts)


def sink_test(
    model,
    data: Any,
    experts: Mapping[int, Iterable[int]] | pd.DataFrame,
    tokenizer: Any = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Zero-ablate ``experts`` and compare, per layer, before and after: ``max_t ||resid_post_t||``
    over real tokens and the mean attention mass on each sequence's first real token (over heads and
    real query positions).

    ``experts``: ``{layer: [expert, ...]}`` or a ``super_experts`` frame (its ``is_super`` rows).
    Columns: layer, max_norm_base, max_norm_ablated, first_attn_base, first_attn_ablated.
    """
    check_batch_size(batch_size)
    chosen = _as_expert_map(model, experts)
    ablate = zero_ablate_experts(model, chosen)  # validates layers and expert ids
    sequences = as_sequences(data, tokenizer)
    n_layer = model.config.num_hidden_layers
    result = {k: torch.zeros(n_layer, dtype=torch.float64) for k in ("norm0", "norm1", "attn0", "attn1")}
    n_queries = 0
    state: dict[str, Any] = {}

    def on_resid(x, hook):
        norms = x[state["real"].to(x.device)].float().norm(dim=-1)
        key = f"norm{state['run']}"
        result[key][hook.layer] = max(float(result[key][hook.layer]), float(norms.max()))

    def on_pattern(p, hook):  # [batch head pos kv_pos]
        first = state["first"].to(p.device)
        mass = p.float().gather(-1, first[:, None, None, None].expand(*p.shape[:3], 1))[..., 0].mean(1)
        key = f"attn{state['run']}"
        result[key][hook.layer] += float(mass[state["real"].to(p.device)].sum())

    reads = [("blocks.*.hook_resid_post", on_resid), ("blocks.*.attn.hook_pattern", on_pattern)]
    batches = iter_batches(sequences, batch_size, model.config.pad_token_id or 0)
    with torch.no_grad():
        n_batches = -(-len(sequences) // batch_size)
        for ids, mask, _ in tqdm(batches, total=n_batches, disable=not progress, desc="sink test"):
            state["real"], state["first"] = mask.bool(), (mask == 0).sum(-1)
            n_queries += int(mask.sum())
            for run, hooks in enumerate(([], ablate)):
                state["run"] = run
                with model.hooks(list(hooks) + reads):
                    model(ids, attention_mask=mask)
    return pd.DataFrame(
        {
            "layer": np.arange(n_layer),
            "max_norm_base": result["norm0"].numpy(),
            "max_norm_ablated": result["norm1"].numpy(),
            "first_attn_base": (result["attn0"] / n_queries).numpy(),
            "first_attn_ablated": (result["attn1"] / n_queries).numpy(),
        }
    )
