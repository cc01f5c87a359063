"""Expert steering (SteerMoE, arXiv 2509.09660): push experts into or out of every token's top-k, with a
graded ``strength`` between off (0) and force (``math.inf``).

Public as ``el.interventions.steer_experts``; a module of its own because it needs only the model,
so ``interventions`` imports it from below.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch

from ernie_lab.model.checks import expert_map
from ernie_lab.model.hook_points import HookPoint


def steer_experts(
    model,
    on: Mapping[int, Iterable[int]] | None = None,
    off: Mapping[int, Iterable[int]] | None = None,
    strength: float = math.inf,
) -> list:
    """Hooks pushing ``on`` experts into and ``off`` experts out of every token's top-k.

    ``on`` / ``off``: ``{layer: [expert, ...]}``. ``strength``: how hard, as an amount added to the
    ``on`` experts' selection scores ``probs + e_score_correction_bias`` and subtracted from the ``off``
    experts' (the scores lie within [0, 1] plus the bias): 0 changes nothing, a small value flips only
    the tokens where the expert was nearly chosen, and ``math.inf`` (the default) forces — each ``on``
    expert set to ``max + 1``, each ``off`` one to ``-inf``. Hooks: ``blocks.{L}.moe.hook_router_probs``
    ``[batch pos expert]`` (read) and ``hook_topk_idx`` ``[batch pos topk]`` (replaced by the top-k of the
    shifted scores). The model then weights the new set by its unbiased probs, renormalised, so a
    forced-on expert with a tiny prob gets a tiny weight. Works with ``run_with_hooks``, ``run_with_cache``
    and ``model.generate(..., fwd_hooks=...)`` (every step). Raises ValueError when a layer has an expert
    in both, more than k on, or fewer than k experts left, or when ``strength`` is negative or NaN. Warns
    (UserWarning) when ``on`` fills all k slots of a layer: forced, the router has no choice left there,
    so ``off`` cannot act and the layer ignores its input.
    """
    try:
        strength = float(strength)
    except (TypeError, ValueError) as err:
        raise ValueError(f"strength must be a number >= 0 (math.inf = force), got {strength!r}") from err
    if not strength >= 0:
        raise ValueError(f"strength must be a number >= 0 (math.inf = force), got {strength!r}")
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
        if len(up) == k and strength > 0:
            warnings.warn(
                f"steer_experts: layer {layer}: on={up} fills all k={k} slots; at full strength every token "
                f"selects exactly these experts, so off={down} cannot act there and the routing ignores the "
                "input. Put fewer experts on (e.g. steering_sets(..., n=1)) or use a finite strength=.",
                stacklevel=2,
            )
        forced = torch.zeros(n_expert, dtype=torch.long)
        forced[up], forced[down] = 1, -1
        statics, stash = model.blocks[layer].mlp.moe_statics, {}

        def keep_probs(probs: torch.Tensor, hook: HookPoint, stash=stash) -> None:
            stash["probs"] = probs

        def steer(idx: torch.Tensor, hook: HookPoint, stash=stash, forced=forced, statics=statics) -> torch.Tensor:
            scores = stash.pop("probs") + statics.e_score_correction_bias.squeeze(0)
            mark = forced.to(scores.device)
            if math.isinf(strength):
                top = scores.amax(-1, keepdim=True) + 1.0
                scores = torch.where(mark == 1, top, torch.where(mark == -1, float("-inf"), scores))
            else:
                scores = scores + strength * mark.to(scores.dtype)
            return scores.topk(idx.shape[-1], dim=-1).indices

        hooks += [(f"blocks.{layer}.moe.hook_router_probs", keep_probs), (f"blocks.{layer}.moe.hook_topk_idx", steer)]
    return hooks
