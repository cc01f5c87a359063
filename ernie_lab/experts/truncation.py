"""Top-k truncation lens and top-rank knockout: how much of a MoE layer's output (and of the loss)
its highest-weight experts carry (README "Definitions").

Axes: batch pos topk d_model expert. The truncated weights of a token are ``w * keep * (sum w /
sum w * keep)``: the kept experts' weights rescaled to the original total, which at k' = k is the
identity bit for bit, so the lens at k' = k is the model exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from einops import einsum
from tqdm.auto import tqdm

from ernie_lab.ablation.core import run_per_sequence
from ernie_lab.io.datasets import as_sequences, check_batch_size, iter_batches
from ernie_lab.model.checks import as_int, as_ints, moe_layers


def truncated_weights(w: torch.Tensor, k_prime: int) -> torch.Tensor:
    """Keep the ``k_prime`` largest of ``w [... topk]``, rescaled to the original sum."""
    keep = torch.zeros_like(w).scatter_(-1, w.topk(k_prime, dim=-1).indices, 1.0)
    kept = w * keep
    return kept * (w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny))


def _check_k(model, k_prime: int) -> int:
    return as_int(k_prime, f"k_prime (1..moe_k={model.config.moe_k})", 1, model.config.moe_k + 1)


def truncate_topk(model, k_prime: int, layers: Iterable[int] | None = None) -> list:
    """Hooks keeping only each token's ``k_prime`` highest-weight experts (``hook_topk_weights``
    ``[batch pos topk]`` edited by :func:`truncated_weights`) in ``layers`` (default: every MoE layer)."""
    k_prime = _check_k(model, k_prime)
    layers = list(model.config.moe_layers) if layers is None else moe_layers(model.config, layers)

    def truncate(w: torch.Tensor, hook) -> torch.Tensor:
        return truncated_weights(w, k_prime)

    return [(f"blocks.{L}.moe.hook_topk_weights", truncate) for L in layers]


def knockout_topk(model, r: int, layers: Iterable[int] | None = None) -> list:
    """Hooks dropping each token's ``r`` highest-ranked experts (by the bias-corrected selection
    score) and routing it to the next ``k`` of the ranking; the model reweights them by their unbiased
    probs, renormalised. ``r = 0`` selects what the model selects."""
    cfg = model.config
    r = as_int(r, f"r (0..E-k={cfg.moe_num_experts - cfg.moe_k})", 0, cfg.moe_num_experts - cfg.moe_k + 1)
    hooks = []
    for L in cfg.moe_layers if layers is None else moe_layers(cfg, layers):
        stash, bias = {}, model.blocks[L].mlp.moe_statics.e_score_correction_bias

        def keep_probs(p, hook, stash=stash) -> None:
            stash["p"] = p

        def knock(idx, hook, stash=stash, bias=bias) -> torch.Tensor:
            scores = stash.pop("p") + bias.squeeze(0)
            return scores.topk(idx.shape[-1] + r, dim=-1).indices[..., r:]

        hooks += [(f"blocks.{L}.moe.hook_router_probs", keep_probs), (f"blocks.{L}.moe.hook_topk_idx", knock)]
    return hooks


def _mean_nll(model, sequences, hook_sets: list[list], batch_size: int, progress: bool) -> np.ndarray:
    """Mean next-token NLL over predicted real tokens for each hook set: ``[len(hook_sets)]``. One base
    pass per batch serves every empty hook set (the model itself), and each set runs from its first
    edited block (:func:`ernie_lab.ablation.core.run_per_sequence`)."""
    check_batch_size(batch_size)
    per = run_per_sequence(model, sequences, hook_sets, batch_size, progress)
    return (per.ablated.sum(1) / per.count.sum()).numpy()


def truncation_lens(
    model, data: Any, tokenizer: Any = None, batch_size: int = 8, progress: bool = True
) -> pd.DataFrame:
    """Per MoE layer and k' = 1..k: ``cosine``, the mean over real tokens of ``cos(y^(k'), y)`` where
    ``y`` is the layer's MoE output (routed + shared) and ``y^(k')`` the same with only the k'
    highest-weight experts (weights rescaled); and ``nll``, the mean next-token NLL when every MoE
    layer keeps only k' experts (k' = k: the model). Columns: layer, k_prime, cosine, nll, delta_nll.
    """
    cfg = model.config
    layers, k = list(cfg.moe_layers), cfg.moe_k
    check_batch_size(batch_size)
    sequences = as_sequences(data, tokenizer)
    cos_sum = torch.zeros(len(layers), k, dtype=torch.float64)
    n_real, state = 0, {}

    def stash(name):
        def keep(x, hook) -> None:
            state[name] = x

        return keep

    def lens(y, hook):
        f, w, real = state.pop("f"), state.pop("w").to(y.dtype), state["real"].to(y.device)
        shared = state.pop("shared", 0.0)
        for j in range(k):
            y_j = einsum(f, truncated_weights(w, j + 1), "b p k d, b p k -> b p d") + shared
            cos = F.cosine_similarity(y_j[real].float(), y[real].float(), dim=-1)
            cos_sum[layers.index(hook.layer), j] += float(cos.double().sum())

    probes = []
    for L in layers:
        probes += [(f"blocks.{L}.moe.hook_topk_weights", stash("w")), (f"blocks.{L}.moe.hook_expert_out", stash("f"))]
        if cfg.moe_num_shared_experts:
            probes.append((f"blocks.{L}.moe.hook_shared_out", stash("shared")))
        probes.append((f"blocks.{L}.hook_mlp_out", lens))
    batches = iter_batches(sequences, batch_size, cfg.pad_token_id or 0)
    with torch.no_grad(), model.hooks(probes):
        for ids, mask, _ in tqdm(batches, total=-(-len(sequences) // batch_size), disable=not progress, desc="lens"):
            state["real"] = mask.bool()
            n_real += int(mask.sum())
            model(ids, attention_mask=mask)
    sets = [truncate_topk(model, j + 1) for j in range(k - 1)] + [[]]  # k' = k is the model itself
    nll = _mean_nll(model, sequences, sets, batch_size, progress)
    return pd.DataFrame(
        {
            "layer": np.repeat(layers, k),
            "k_prime": np.tile(np.arange(1, k + 1), len(layers)),
            "cosine": (cos_sum / n_real).reshape(-1).numpy(),
            "nll": np.tile(nll, len(layers)),
            "delta_nll": np.tile(nll - nll[-1], len(layers)),
        }
    )


def topk_knockout(
    model,
    data: Any,
    ranks: Iterable[int] | None = None,
    tokenizer: Any = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Mean next-token NLL when every MoE layer drops each token's ``r`` top-ranked experts and takes
    the next ``k`` (``ranks`` default 0..min(k, E-k); r = 0 is the model). Columns: r, nll, delta_nll."""
    cfg = model.config
    top = cfg.moe_num_experts - cfg.moe_k
    ranks = (
        list(range(min(cfg.moe_k, top) + 1)) if ranks is None else as_ints(ranks, f"ranks (0..E-k={top})", 0, top + 1)
    )
    hook_sets = [knockout_topk(model, r) for r in ranks]
    sequences = as_sequences(data, tokenizer)
    sets = [[] if r == 0 else hooks for r, hooks in zip(ranks, hook_sets, strict=True)]  # r = 0: the model
    nll = _mean_nll(model, sequences, [[], *sets], batch_size, progress)
    return pd.DataFrame({"r": ranks, "nll": nll[1:], "delta_nll": nll[1:] - nll[0]})
