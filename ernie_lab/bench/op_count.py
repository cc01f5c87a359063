"""Operator calls per decode token: the machine-independent cost figure of the bench (README, "How speed is measured").

A decode step at batch 1 is bound by per-call overhead (Python, dispatch; kernel launches on a GPU)
more than by arithmetic, so the number of aten operator calls it makes is what the speed work
steers by. It is deterministic: the same on every machine and under any load.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from ernie_lab.generation.generate import generate


def aten_calls(fn) -> int:
    """How many aten operator calls ``fn()`` makes (nested calls included), counted by ``torch.profiler``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def decode_op_count(model, batch: int = 1, prompt_tokens: int = 16, seed: int = 0, **generate_kwargs) -> float:
    """Aten calls per decode token: those of a greedy generation of 17 new tokens minus those of a
    generation of 1 (prefill and set-up cancel out), divided by 16. ``generate_kwargs`` go to
    :func:`~ernie_lab.generation.generate.generate` (e.g. ``fwd_hooks`` to count a hooked decode)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=gen)
    ids = ids.to(model.model.embed_tokens.weight.device)
    generate(model, ids, max_new_tokens=2, **generate_kwargs)  # warm-up: lazy caches are made here
    long = aten_calls(lambda: generate(model, ids, max_new_tokens=17, **generate_kwargs))
    short = aten_calls(lambda: generate(model, ids, max_new_tokens=1, **generate_kwargs))
    return (long - short) / 16


def transformers_decode_op_count(model, batch: int = 1, prompt_tokens: int = 16, seed: int = 0) -> float:
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
    return (aten_calls(lambda: run(17)) - aten_calls(lambda: run(1))) / 16
