"""Where a router's logits come from: the residual stream feeding MoE layer L is a sum of components
(embedding, every attention output up to L, every MLP/MoE output before L), and with the RMS of the
router input frozen the router is linear in them, so its logits split exactly into one part per
component (README "Definitions", router-logit sources).

Axes: component batch pos d_model expert. ``n(h) = gamma * h / rms(h)``, ``logits = W_r n(h)``.
"""

from __future__ import annotations

import pandas as pd
import torch
from einops import einsum

from ernie_lab.model.hook_points import ActivationCache


def _names(model, layer: int, split_experts: bool) -> tuple[list[str], list[str]]:
    """Component names and the hook points to cache for them."""
    cfg = model.config
    names = ["embed"]
    points = ["hook_embed", f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.moe.hook_router_logits"]
    for m in range(layer + 1):
        names.append(f"attn_out.{m}")
        points.append(f"blocks.{m}.hook_attn_out")
        if m == layer:
            break
        if split_experts and cfg.is_moe_layer(m):
            names += [f"routed.{m}.{e}" for e in range(cfg.moe_num_experts)]
            points += [f"blocks.{m}.moe.hook_{p}" for p in ("topk_idx", "topk_weights", "expert_out")]
            if cfg.moe_num_shared_experts:
                names.append(f"shared.{m}")
                points.append(f"blocks.{m}.moe.hook_shared_out")
        else:
            names.append(f"mlp_out.{m}")
            points.append(f"blocks.{m}.hook_mlp_out")
    return names, points


def _parts(cache: ActivationCache, name: str) -> torch.Tensor:
    """The ``[batch pos d_model]`` residual part behind component ``name``; ``routed.{m}.{e}`` is
    ``sum_k g_k f_k`` over the slots of layer m that hold expert e."""
    kind, _, rest = name.partition(".")
    if kind == "embed":
        return cache["hook_embed"]
    if kind in ("attn_out", "mlp_out"):
        return cache[f"blocks.{rest}.hook_{kind}"]
    if kind == "shared":
        return cache[f"blocks.{rest}.moe.hook_shared_out"]
    m, e = (int(v) for v in rest.split("."))
    moe = f"blocks.{m}.moe.hook_"
    hit = (cache[moe + "topk_idx"] == e).to(cache[moe + "topk_weights"].dtype)
    out = cache[moe + "expert_out"]
    return einsum(out, (cache[moe + "topk_weights"] * hit).to(out.dtype), "b p k d, b p k -> b p d")


@torch.no_grad()
def router_logit_sources(
    model, input_ids: torch.Tensor, layer: int, attention_mask: torch.Tensor | None = None, split_experts: bool = False
) -> tuple[list[str], torch.Tensor]:
    """Split MoE ``layer``'s router logits into residual components.

    Returns ``(names, contributions)``: ``contributions [component batch pos expert]`` (fp32) with
    ``contributions[c] = W_r (gamma * part_c / rms(h))``, ``rms(h)`` taken from the actual router
    input and frozen, so ``contributions.sum(0)`` equals ``hook_router_logits`` to fp32 round-off
    (in a bf16 model, to the round-off of the residual stream's bf16 sums).
    Components: ``embed``, ``attn_out.{m}`` for m <= layer, ``mlp_out.{m}`` for m < layer; with
    ``split_experts`` each earlier MoE layer's output is split into ``routed.{m}.{e}`` per expert
    (``g_e f_e`` where selected) and ``shared.{m}``.
    """
    cfg = model.config
    if not cfg.is_moe_layer(layer):
        raise ValueError(f"layer {layer!r} is not a MoE layer; MoE layers are {cfg.moe_layers}")
    names, points = _names(model, layer, split_experts)
    _, cache = model.run_with_cache(input_ids, names_filter=points, attention_mask=attention_mask)
    norm, gate = model.blocks[layer].post_attention_layernorm, model.blocks[layer].mlp.gate
    h = cache[f"blocks.{layer}.hook_resid_mid"].float()
    scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.float()  # gamma / rms(h)
    weight = gate.weight.float()
    parts = [_parts(cache, n).float() * scale.to(cache["hook_embed"].device) for n in names]
    contributions = torch.stack([einsum(p.to(weight.device), weight, "b p d, e d -> b p e") for p in parts])
    return names, contributions


def source_summary(
    names: list[str], contributions: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> pd.DataFrame:
    """Per component, over real tokens: ``share`` = mean over experts of ``cov(part_c, logit_e) /
    var(logit_e)`` (shares sum to 1 because the parts sum to the logits), and ``mean_abs`` = mean
    ``|part_c|``. Columns: component, share, mean_abs; ordered by the components' order."""
    if len(names) != contributions.shape[0]:
        raise ValueError(f"{len(names)} names for {contributions.shape[0]} components")
    real = torch.ones(contributions.shape[1:3], dtype=torch.bool) if attention_mask is None else attention_mask
    parts = contributions.double()[:, real.to(contributions.device).bool()]  # [component n expert]
    if parts.shape[1] < 2:
        raise ValueError("the variance shares need at least two real tokens")
    centred = parts - parts.mean(1, keepdim=True)
    logits = centred.sum(0)  # [n expert]
    share = (centred * logits).mean(1) / logits.pow(2).mean(0)  # [component expert]
    return pd.DataFrame(
        {"component": names, "share": share.mean(-1).cpu().numpy(), "mean_abs": parts.abs().mean((1, 2)).cpu().numpy()}
    )
