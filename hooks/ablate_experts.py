"""Ablate routed experts of chosen MoE layers: zero, reroute or mean ablation (README, Definitions).

Params:
    experts: ``{layer: [expert, ...]}`` (MoE layers only).
    mode: ``"zero"`` (weight 0 where selected, no renormalisation), ``"reroute"`` (masked before
        top-k so each token gets its next-best expert, weights renormalised) or ``"mean"`` (its output
        replaced by its mean output over ``reference_ids``).
    reference_ids, reference_mask: ``[batch pos]`` token ids (and 1/0 padding mask) of the reference
        set for ``mode="mean"``.

Hooks used (per ablated layer L), shapes ``[batch pos topk]`` unless noted:
    zero:    ``blocks.L.moe.hook_topk_idx`` (read), ``blocks.L.moe.hook_topk_weights`` (edited)
    reroute: ``blocks.L.moe.hook_router_probs`` ``[batch pos expert]`` (read), ``hook_topk_idx`` (edited)
    mean:    ``blocks.L.moe.hook_topk_idx`` (read), ``hook_expert_out`` ``[batch pos topk d_model]`` (edited)

Decode: every mode applies at every generation step, to the prompt at prefill and to each new token.
"""

from __future__ import annotations

from ernie_lab import interventions

MODES = ("zero", "reroute", "mean")


def make_hooks(model, experts, mode: str = "zero", reference_ids=None, reference_mask=None) -> list:
    """``[(hook_name, fn), ...]`` ablating ``experts`` ({layer: [expert, ...]}) with ``mode``."""
    if mode == "zero":
        return interventions.zero_ablate_experts(model, experts)
    if mode == "reroute":
        return interventions.reroute_ablate_experts(model, experts)
    if mode == "mean":
        if reference_ids is None:
            raise ValueError("mode='mean' needs reference_ids [batch pos] to average the experts' outputs over")
        means = interventions.expert_mean_outputs(model, reference_ids, experts, attention_mask=reference_mask)
        return interventions.mean_ablate_experts(model, means)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
