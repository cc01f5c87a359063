"""Force the routing of MoE layers: every token goes to the same ``moe_k`` experts.

Params:
    experts: ``moe_k`` expert indices.
    layers: a MoE layer, a list of them, or None for every MoE layer.
    weights: optional ``moe_k`` mixing weights used as given; None weights the forced experts by their
        unbiased router probs, renormalised (as the model does for any selection).

Hooks used (per layer L): ``blocks.L.moe.hook_topk_idx`` ``[batch pos topk]`` (replaced) and, with
``weights``, ``blocks.L.moe.hook_topk_weights`` ``[batch pos topk]`` (replaced).

Decode: applies at every generation step, to the prompt at prefill and to each new token.
"""

from __future__ import annotations

from ernie_lab import interventions


def make_hooks(model, experts, layers=None, weights=None) -> list:
    """``[(hook_name, fn), ...]`` routing every token of ``layers`` to ``experts``."""
    if layers is None:
        layers = model.config.moe_layers
    elif isinstance(layers, int):
        layers = [layers]
    hooks = []
    for layer in layers:
        hooks += interventions.force_routing(model, layer, experts, weights=weights)
    return hooks
