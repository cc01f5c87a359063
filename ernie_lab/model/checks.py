"""Argument checks shared by every wing: integers (token ids, layers, expert ids, counts, sizes) and
finite numbers (fractions, thresholds), each error naming the argument, what was given and what is
valid.

An integer is a Python ``int``, a numpy integer or a 0-d integer tensor; ``bool`` (an ``int`` in
Python), floats (``2.7`` is not expert 2), strings (``"41"`` is not ids 4 and 1) and float or bool
tensors are refused rather than coerced. Lists of integers may also be 1-D integer tensors or arrays.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any

import torch


class ArgumentError(ValueError):
    """A public argument of the wrong kind or outside its range."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong kind (a bool, float or string where an integer goes, ...)."""


class ArgumentRangeError(ArgumentError):
    """An argument of the right kind outside its valid range."""


def is_int(value: Any) -> bool:
    """True for a Python int (not bool), a numpy integer, or a 0-d integer tensor/array."""
    if isinstance(value, Integral):
        return not isinstance(value, bool)
    dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
    if dtype is None or shape is None or tuple(shape) != ():
        return False
    if hasattr(value, "is_floating_point"):  # torch
        return not (value.is_floating_point() or value.is_complex() or str(dtype) == "torch.bool")
    return getattr(dtype, "kind", "") in "iu"  # numpy 0-d array


def _span(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"an integer in [{low}, {high})" if high > low else f"an integer in [{low}, {high}) (none exists)"
    if low is not None:
        return f"an integer >= {low}"
    if high is not None:
        return f"an integer < {high}"
    return "an integer"


def as_int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high)`` (either bound optional); ArgumentTypeError for anything
    that is not an integer, ArgumentRangeError outside the range."""
    if not is_int(value):
        raise ArgumentTypeError(f"{name} must be {_span(low, high)}, got {value!r} ({type(value).__name__})")
    out = int(value)
    if (low is not None and out < low) or (high is not None and out >= high):
        raise ArgumentRangeError(f"{name} must be {_span(low, high)}, got {out} (out of range)")
    return out


def as_count(value: Any, name: str, low: int = 0, high: int | None = None) -> int:
    """A count or size: an int >= ``low`` (0 unless told); negative counts are refused, never slice ends."""
    return as_int(value, name, low, high)


def as_ints(values: Any, name: str, low: int | None = None, high: int | None = None, scalar: bool = False) -> list[int]:
    """A list of ints from an iterable (list, tuple, set, 1-D integer tensor or array), each checked as
    :func:`as_int`; with ``scalar=True`` a single integer is accepted as a list of one."""
    if scalar and is_int(values):
        return [as_int(values, name, low, high)]
    if isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable) or is_int(values):
        raise ArgumentTypeError(
            f"{name} must be a list of integers{' (or one integer)' if scalar else ''}, got {values!r}"
        )
    if getattr(values, "ndim", 1) != 1:
        raise ArgumentTypeError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
    items = list(values)
    bad = [v for v in items if not is_int(v)]
    if bad:
        raise ArgumentTypeError(f"each of {name} must be {_span(low, high)}, got {bad[0]!r} in {values!r}")
    return [as_int(v, name, low, high) for v in items]


def as_number(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """A finite real number (int or float, not bool or string) in the interval ``low .. high``; each
    bound is closed unless ``open_low`` / ``open_high``."""
    lo = "" if low is None else f"{'>' if open_low else '>='} {low}"
    hi = "" if high is None else f"{'<' if open_high else '<='} {high}"
    valid = "a finite number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "")
    if hasattr(value, "item") and tuple(getattr(value, "shape", (1,))) == ():  # 0-d tensor or numpy scalar
        value = value.item()
    if not isinstance(value, Real) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be {valid}, got {value!r} ({type(value).__name__})")
    out = float(value)
    below = low is not None and (out <= low if open_low else out < low)
    above = high is not None and (out >= high if open_high else out > high)
    if not math.isfinite(out) or below or above:
        raise ArgumentRangeError(f"{name} must be {valid}, got {value!r}")
    return out


def as_bool(value: Any, name: str) -> bool:
    """A real bool (``1``, ``"yes"`` and ``None`` are refused)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_text(text: str, name: str = "text") -> None:
    """ArgumentRangeError naming the first lone surrogate (``"\\ud800"``, from bytes decoded with
    ``errors="surrogateescape"``) and its position: such a str has no UTF-8 form to tokenize."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = text[err.start]
        raise ArgumentRangeError(
            f"{name} holds a lone surrogate {char!r} (U+{ord(char):04X}) at position {err.start}, which has no "
            f"UTF-8 form; decode bytes with errors='replace' (or fix the source) before tokenizing"
        ) from None


def moe_layer(config, layer: Any, name: str = "layer") -> int:
    """A MoE layer index of ``config`` (dense layers have no router)."""
    out = as_int(layer, name, 0, config.num_hidden_layers)
    if out not in config.moe_layers:
        where = "" if name == "layer" else f"{name}: "
        raise ArgumentRangeError(f"{where}layer {out} is not a MoE layer; MoE layers are {list(config.moe_layers)}")
    return out


def moe_layers(config, layers: Any, name: str = "layers") -> list[int]:
    """A list of MoE layer indices (order kept, duplicates refused)."""
    out = [moe_layer(config, L, name) for L in as_ints(layers, name)]
    if len(set(out)) != len(out):
        raise ArgumentRangeError(f"{name} must not repeat a layer, got {out}")
    return out


def expert_ids(config, experts: Any, layer: int | None = None, name: str = "experts", scalar: bool = True) -> list[int]:
    """Sorted distinct routed-expert ids in ``[0, moe_num_experts)`` (of ``layer``, for the message)."""
    where = name if layer is None else f"{name} of layer {layer}"
    ids = as_ints(experts, f"{where} (expert ids)", scalar=scalar)
    n = config.moe_num_experts
    bad = sorted({e for e in ids if not 0 <= e < n})
    if bad:
        raise ArgumentRangeError(
            f"{name} {bad}{'' if layer is None else f' of layer {layer}'} are out of range [0, {n})"
        )
    return sorted(set(ids))


def expert_map(config, experts: Any, name: str = "experts") -> dict[int, list[int]]:
    """``{layer: [expert, ...]}`` checked: MoE layers as keys, expert ids as values (sorted, distinct).
    Keys that name the same layer twice (``1`` and ``np.int64(1)``) are merged."""
    if not isinstance(experts, Mapping):
        raise ArgumentTypeError(f"{name} must be a mapping {{layer: [expert, ...]}}, got {experts!r}")
    out: dict[int, list[int]] = {}
    for layer, ids in experts.items():
        L = moe_layer(config, layer, f"{name}: layer")
        out[L] = sorted(set(out.get(L, [])) | set(expert_ids(config, ids, L, name)))
    return out


def token_ids(values: Any, name: str, vocab: int, scalar: bool = True) -> list[int]:
    """Token ids in ``[0, vocab)`` (a 1-D tensor, a list, or one id when ``scalar``)."""
    return as_ints(values, name, 0, vocab, scalar=scalar)


# ----------------------------------------------------------------------------- finite values
class NonFiniteError(ValueError):
    """NaN or inf in router or expert values that an analysis would otherwise turn into statistics
    (NaN router probs collapse top-k onto the lowest ids; an inf saliency ranks first). The message
    names the layer and hook point and the opt-out (``check_finite=False``)."""


def nonfinite_error(where: str, count: int, opt_out: str = "check_finite=False") -> NonFiniteError:
    return NonFiniteError(
        f"{count} non-finite value(s) (NaN or inf) at {where}: a statistic computed on them would be "
        f"meaningless; find the hook or weight that produced them, or pass {opt_out} to compute anyway"
    )


def check_finite(x, where: str, layers: list[int] | None = None, opt_out: str = "check_finite=False") -> None:
    """Raise :class:`NonFiniteError` when tensor ``x`` holds NaN or inf. With ``layers``, ``x``'s
    first axis is the layer axis and the message names the first layer holding one; ``where`` may
    contain ``{layer}``, filled with it."""
    bad = ~torch.isfinite(x.detach())
    if not bool(bad.any()):
        return
    if layers is not None:
        per_layer = bad.reshape(bad.shape[0], -1).sum(-1)
        first = int(torch.nonzero(per_layer)[0, 0])
        where = where.format(layer=layers[first]) if "{layer}" in where else f"{where} (layer {layers[first]})"
    raise nonfinite_error(where, int(bad.sum()), opt_out)


def check_frame_finite(df, columns: list[str], call: str, opt_out: str = "check_finite=False") -> None:
    """Raise :class:`NonFiniteError` when a numeric ``columns`` entry of frame ``df`` is NaN or inf,
    naming the first such row's layer and expert when the frame has them."""
    for column in columns:
        values = torch.as_tensor(df[column].to_numpy(dtype="float64", copy=True))
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0, 0])
            at = ", ".join(f"{k} {df[k].iloc[first]}" for k in ("layer", "expert") if k in df.columns)
            raise nonfinite_error(f"{call}: column {column!r}" + (f" ({at})" if at else ""), int(bad.sum()), opt_out)
