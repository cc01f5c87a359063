"""Expert steering (SteerMoE, arXiv 2509.09660): force experts into or out of every token's top-k.

Public as ``el.interventions.steer_experts``; a module of its own because it needs only the model,
so ``interventions`` imports it from below.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ernie_lab.model.checks import expert_map
from ernie_lab.model.hook_points import HookPoint


def steer_experts(
    model, on: Mapping[int, Iterable[int]] | None = None, off: Mapping[int, Iterable[int]] | None = None
) -> list:
    """Hooks forcing ``on`` experts into and ``off`` experts out of every token's top-k.

    ``on`` / ``off``: ``{layer: [expert, ...]}``. Hooks: ``blocks.{L}.moe.hook_router_probs``
    ``[batch pos expert]`` (read) and ``hook_topk_idx`` ``[batch pos topk]`` (replaced by the top-k of
    the bias-corrected selection scores ``probs + e_score_correction_bias`` with each ``on`` expert
    set to ``max + 1`` and each ``off`` expert to ``-inf``). The model then weights the new set by
    its unbiased probs, renormalised, so a forced-on expert with a tiny prob gets a tiny weight.
    Works with ``run_with_hooks``, ``run_with_cache`` and ``model.generate(..., fwd_hooks=...)``
    (every step). Layers and expert ids must be integers in range (``ernie_lab.model.checks``: a float,
    bool or string raises ArgumentTypeError, never rounded); raises ValueError when a layer has an
    expert in both, more than k on, or fewer than k experts left.
    """
    on = expert_map(model.config, {} if on is None else on, "on")
    off = expert_map(model.config, {} if off is None else off, "off")
    k, n_expert = model.config.moe_k, model.config.moe_num_experts
    hooks = []
    for layer in sorted({*on, *off}):
        up, down = on.get(layer, []), off.get(layer, [])
        if set(up) & set(down) or len(up) > k or n_expert - len(down) < k:
            raise ValueError(
                f"layer {layer}: on={up} and off={down} must be disjoint, with at most k={k} experts on "
                f"and at most E-k={n_expert - k} off"
            )
        forced = torch.zeros(n_expert, dtype=torch.long)
        forced[up], forced[down] = 1, -1
        statics, stash = model.blocks[layer].mlp.moe_statics, {}

        def keep_probs(probs: torch.Tensor, hook: HookPoint, stash=stash) -> None:
            stash["probs"] = probs

        def steer(idx: torch.Tensor, hook: HookPoint, stash=stash, forced=forced, statics=statics) -> torch.Tensor:
            scores = stash.pop("probs") + statics.e_score_correction_bias.squeeze(0)
            mark = forced.to(scores.device)
            top = scores.amax(-1, keepdim=True) + 1.0
            scores = torch.where(mark == 1, top, torch.where(mark == -1, float("-inf"), scores))
            return scores.topk(idx.shape[-1], dim=-1).indices

        hooks += [(f"blocks.{layer}.moe.hook_router_probs", keep_probs), (f"blocks.{layer}.moe.hook_topk_idx", steer)]
    return hooks
