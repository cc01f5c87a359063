"""Argument checks of :func:`~ernie_lab.generation.generate.generate`, ``stream`` and ``chat``: every
option's type and range at the call, before the prompt runs, each error naming the argument."""

from __future__ import annotations

from typing import Any

import torch

from ernie_lab.model.checks import ArgumentRangeError, ArgumentTypeError, is_int


def check_sampling(
    max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None, seed=None
) -> None:
    """Raise ValueError naming the first sampling option of the wrong type or range (no model needed,
    so a command line checks them before loading one)."""

    def number(value) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and value == value

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    checks = [
        (integer(max_new_tokens) and max_new_tokens >= 0, "max_new_tokens", max_new_tokens, "an integer >= 0"),
        (number(temperature) and temperature >= 0, "temperature", temperature, "a number >= 0 (0 = greedy)"),
        (top_k is None or (integer(top_k) and top_k >= 1), "top_k", top_k, "None or an integer >= 1"),
        (top_p is None or (number(top_p) and 0 < top_p <= 1), "top_p", top_p, "None or a number in (0, 1]"),
        (min_p is None or (number(min_p) and 0 <= min_p <= 1), "min_p", min_p, "None or a number in [0, 1]"),
        (
            repetition_penalty is None or (number(repetition_penalty) and repetition_penalty > 0),
            "repetition_penalty",
            repetition_penalty,
            "None or a number > 0 (1 = off)",
        ),
        (seed is None or integer(seed), "seed", seed, "None or an integer"),
    ]
    for ok, name, value, valid in checks:
        if not ok:
            raise ValueError(f"{name} must be {valid}, got {value!r}")


def check_options(
    model,
    input_ids,
    max_new_tokens,
    attention_mask,
    temperature=0.0,
    top_k=None,
    top_p=None,
    min_p=None,
    repetition_penalty=None,
    eos_token_id=None,
    pad_token_id=None,
    seed=None,
    stop_strings=None,
    tokenizer=None,
    fwd_hooks=(),
    **_: Any,
) -> None:
    """Check every option's type and range at the call, before the prompt runs (a generator would
    otherwise fail at its first step); each error names the argument and what is valid."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed)
    vocab = model.config.vocab_size
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {input_ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_position_embeddings={limit}"
        )
    ids = eos_token_id.flatten() if isinstance(eos_token_id, torch.Tensor) else eos_token_id
    ids = [] if ids is None else [ids] if is_int(ids) or isinstance(ids, str | bytes | float) else ids
    for name, values in (("eos_token_id", ids), ("pad_token_id", [] if pad_token_id is None else [pad_token_id])):
        if not isinstance(values, list | tuple | torch.Tensor) or not all(is_int(i) for i in values):
            raise ArgumentTypeError(f"{name} must be None or token ids (integers in [0, {vocab})), got {values!r}")
        if not all(0 <= int(i) < vocab for i in values):
            raise ArgumentRangeError(f"{name} must be None or token ids (integers in [0, {vocab})), got {values!r}")
    stops = [stop_strings] if isinstance(stop_strings, str) else stop_strings
    if stops is not None and not (isinstance(stops, list | tuple) and all(isinstance(t, str) and t for t in stops)):
        raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text; pass tokenizer=")
    if not isinstance(fwd_hooks, list | tuple) or not all(
        isinstance(h, list | tuple) and len(h) == 2 for h in fwd_hooks
    ):
        raise TypeError(f"fwd_hooks must be a list of (name, fn) pairs, got {fwd_hooks!r}")
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "generation needs left padding (every row's last column a real token); "
            "encode with tokenizer(texts) or padding_side='left'"
        )
