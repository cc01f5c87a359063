"""Transposed views of weights, made once per weight, for the inference forward (no copies).

``x @ weight.T`` dispatches ``t -> transpose -> as_strided`` before every matmul; at one token per
decode step those view calls outnumber the arithmetic. Outside autograd the forward instead takes a
view made once per weight and kept in a weak table keyed by the parameter object (not module state:
never saved, copied or pickled). The view shares the weight's storage, so in-place edits
(``weight.mul_(0)``, ``load_state_dict``) show through at once; a weight whose data is replaced
(``param.data = ...``, ``model.to(...)``) gets a new view at its next use, and
:func:`forget` drops the old one at once (``ErnieMoE._apply`` calls it, so moving or casting a model
never keeps the old storage alive). The memory cost is zero: views, never fused copies.

With grad enabled and a weight that requires grad, while ``torch.compile`` traces, or for a tensor
subclass (a DTensor shard, a quantized weight), the plain ``weight.t()`` is used, so gradients,
traced graphs and subclass dispatch see the parameter itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

_VIEWS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _cacheable(weight: torch.Tensor) -> bool:
    # tensor subclasses (DTensor shards, quantized weights) keep their own .t(): nothing is cached for them
    plain = type(weight) in (torch.Tensor, torch.nn.Parameter)
    return plain and not (torch.is_grad_enabled() and weight.requires_grad) and not torch.compiler.is_compiling()


def _key(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight.shape, weight.stride(), weight.dtype, weight.device


def _cached(weight: torch.Tensor, kind: str, make):
    """``make(weight.detach())``, made once per weight, kind and weight data."""
    key = _key(weight)
    entry = _VIEWS.get(weight)
    if entry is None or entry[0] != key:
        entry = (key, {})
        _VIEWS[weight] = entry
    made = entry[1].get(kind)
    if made is None:
        # normal (not inference) tensors that hold the storage, not the parameter object
        with torch.inference_mode(False), torch.no_grad():
            made = entry[1][kind] = make(weight.detach())
    return made


def transposed(weight: torch.Tensor) -> torch.Tensor:
    """``weight.t()``: ``[d_out d_in]`` -> ``[d_in d_out]``, a cached view outside autograd."""
    if not _cacheable(weight):
        return weight.t()
    return _cached(weight, "t", torch.Tensor.t)


def expert_slices(weight: torch.Tensor):
    """``weight[e]`` for every expert of a stacked ``[expert ...]`` weight, indexable by ``e``: a tuple
    of views made once outside autograd (one lookup instead of a ``select`` per use), else the weight."""
    if not _cacheable(weight):
        return weight
    return _cached(weight, "experts", lambda w: w.unbind(0))


def forget(weights: Iterable[torch.Tensor]) -> None:
    """Drop the views of ``weights`` (their data is about to be replaced)."""
    for w in weights:
        _VIEWS.pop(w, None)
