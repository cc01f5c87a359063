"""Add a steering vector to the residual stream of one layer (activation addition).

Params:
    layer: the block whose residual point is steered.
    vector: ``[d_model]`` direction; or, instead, ``positive`` and ``negative`` token ids
        (``[pos]`` or ``[batch pos]``) from which the direction is taken as the difference of the
        mean residual (over batch and positions) at that point, see :func:`direction`.
    scale: multiplier of the vector.
    positions: None (every position) or indices (see ``ernie_lab.interventions``: ``[-1]`` steers the
        last prompt token and every generated one, non-negative indices only prompt positions).
    point: ``"resid_pre"`` (default), ``"resid_mid"`` or ``"resid_post"``.

Hooks used: ``blocks.{layer}.hook_{point}`` ``[batch pos d_model]`` (``scale * vector`` added).

Decode: with ``positions=None`` each generated token is steered too; see ``positions`` otherwise.
"""

from __future__ import annotations

import torch

from ernie_lab import interventions

POINTS = ("resid_pre", "resid_mid", "resid_post")


def direction(model, layer: int, positive, negative, point: str = "resid_pre") -> torch.Tensor:
    """``mean(act(positive)) - mean(act(negative))`` ``[d_model]`` at ``blocks.{layer}.hook_{point}``."""
    name = f"blocks.{layer}.hook_{point}"
    means = []
    for ids in (positive, negative):
        _, cache = model.run_with_cache(torch.as_tensor(ids), names_filter=name)
        means.append(cache[name].float().mean(dim=(0, 1)))
    return means[0] - means[1]


def make_hooks(
    model, layer: int, vector=None, positive=None, negative=None, scale: float = 1.0, positions=None, point="resid_pre"
) -> list:
    """``[(hook_name, fn)]`` adding ``scale * vector`` at ``blocks.{layer}.hook_{point}``."""
    if point not in POINTS:
        raise ValueError(f"point must be one of {POINTS}, got {point!r}")
    if not 0 <= layer < model.config.num_hidden_layers:
        raise ValueError(f"layer {layer} is out of range [0, {model.config.num_hidden_layers})")
    if (vector is None) == (positive is None or negative is None):
        raise ValueError("give either vector=... or both positive=... and negative=... token ids")
    if vector is None:
        vector = direction(model, layer, positive, negative, point)
    return interventions.add_steering_vector(model, f"blocks.{layer}.hook_{point}", vector, scale, positions)
