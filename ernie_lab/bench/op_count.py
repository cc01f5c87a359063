"""Operator calls per decode token: the machine-independent cost figure of the bench (README, "How speed is measured").

A decode step at batch 1 is bound by per-call overhead (Python, dispatch; kernel launches on a GPU)
more than by arithmetic, so the number of aten operator calls it makes is what the speed work
steers by. It is deterministic: the same on every machine and under any load.

A call is an aten operator called from Python (``torch.profiler``'s aten events whose parents are not
aten events): what pays the interpreter and, on a GPU, roughly one launch each. The calls an operator
makes inside itself in C++ are not counted (``nested=True`` counts them too): the CPU build of the
grouped expert matmul, one call, runs about 13 of them per expert (``select``, ``slice``, ``item``,
``mm``...), and every ``mm`` three ``resolve_conj`` checks.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from ernie_lab.generation.generate import generate


def _top_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def aten_calls(fn, nested: bool = False) -> int:
    """How many aten operator calls ``fn()`` makes from Python, counted by ``torch.profiler``;
    ``nested=True`` adds the calls operators make inside themselves."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return len(events) if nested else sum(1 for e in events if _top_level(e))


def decode_op_count(
    model, batch: int = 1, prompt_tokens: int = 16, seed: int = 0, nested: bool = False, **generate_kwargs
) -> float:
    """Aten calls per decode step (``batch`` rows): those of a greedy generation of 17 new tokens minus
    those of a generation of 1 (prefill and set-up cancel out), divided by 16 (``nested``: see
    :func:`aten_calls`). ``generate_kwargs`` go to :func:`~ernie_lab.generation.generate.generate`
    (e.g. ``fwd_hooks`` to count a hooked decode)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=gen)
    ids = ids.to(model.model.embed_tokens.weight.device)
    generate(model, ids, max_new_tokens=2, **generate_kwargs)  # warm-up: lazy caches are made here
    long = aten_calls(lambda: generate(model, ids, max_new_tokens=17, **generate_kwargs), nested)
    short = aten_calls(lambda: generate(model, ids, max_new_tokens=1, **generate_kwargs), nested)
    return (long - short) / 16


def transformers_decode_op_count(
    model, batch: int = 1, prompt_tokens: int = 16, seed: int = 0, nested: bool = False
) -> float:
    """:func:`decode_op_count` for a transformers ``Ernie4_5_MoeForCausalLM`` (its own ``generate``)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=gen)
    ids = ids.to(model.device)
    mask = torch.ones_like(ids)

    def run(n: int) -> None:
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0
            )

    run(2)
    return (aten_calls(lambda: run(17), nested) - aten_calls(lambda: run(1), nested)) / 16
