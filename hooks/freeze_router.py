"""Freeze routing to the routing of another prompt: which experts run, and with what weights.

The run keeps computing its own expert outputs; only the selection and the mixing weights come from
the source ("routing patching" in the README's Definitions separates which experts ran from what they computed).

Params:
    cache: an ActivationCache holding ``blocks.L.moe.hook_topk_idx`` and ``hook_topk_weights`` of the
        source prompt; or ``source_ids`` (``[batch pos]``, with optional ``source_mask``) to run it now.
    layers: MoE layers to freeze (None = every MoE layer).
    positions: None (all) or indices of the positions to freeze.

The frozen run must have the source's batch and length (else a HookError names the hook point).

Hooks used (per layer L): ``blocks.L.moe.hook_topk_idx`` and ``blocks.L.moe.hook_topk_weights``,
both ``[batch pos topk]``, replaced by the cached values.

Decode: the cache covers the prompt only, so generation is frozen at prefill and each new token
(a decode step, pos=1) is routed freely by the model.
"""

from __future__ import annotations

from ernie_lab import interventions


def make_hooks(model, cache=None, source_ids=None, source_mask=None, layers=None, positions=None) -> list:
    """``[(hook_name, fn), ...]`` replacing top-k indices and weights by those in ``cache``."""
    layers = model.config.moe_layers if layers is None else [layers] if isinstance(layers, int) else list(layers)
    names = [f"blocks.{L}.moe.hook_{p}" for L in layers for p in ("topk_idx", "topk_weights")]
    if (cache is None) == (source_ids is None):
        raise ValueError("give either cache=... or source_ids=...")
    if cache is None:
        _, cache = model.run_with_cache(source_ids, names_filter=names, attention_mask=source_mask)
    return interventions.patch_from_cache(model, cache, names, positions=positions)
