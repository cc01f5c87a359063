"""What the saliency pass costs against a plain forward pass over the same batches."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pandas as pd
import torch

from ernie_lab.experts.collect import _StopForward, expert_sums
from ernie_lab.io.datasets import as_sequences, iter_batches


def saliency_overhead(model, data: Any, tokenizer: Any = None, batch_size: int = 8, repeats: int = 3) -> pd.DataFrame:
    """Wall-clock seconds of a plain forward pass over ``data``, of a plain pass stopped after the
    last MoE layer (as the saliency pass stops) and of the hooked saliency pass
    (:func:`~ernie_lab.experts.collect.expert_sums`), the best of ``repeats`` runs each, and their
    ratio to the plain pass. Columns: pass, seconds, ratio."""
    sequences = as_sequences(data, tokenizer)
    batches = list(iter_batches(sequences, batch_size, model.config.pad_token_id or 0))

    def plain() -> None:
        with torch.no_grad():
            for ids, mask, _ in batches:
                model(ids, attention_mask=mask)

    def truncated() -> None:
        def stop(x, hook):
            raise _StopForward

        with torch.no_grad(), model.hooks([(f"blocks.{model.config.moe_layers[-1]}.hook_mlp_out", stop)]):
            for ids, mask, _ in batches:
                with contextlib.suppress(_StopForward):
                    model(ids, attention_mask=mask)

    def hooked() -> None:
        expert_sums(model, sequences, batch_size=batch_size, progress=False)

    best = {}
    for name, fn in (
        ("plain forward", plain),
        ("plain, up to the last MoE layer", truncated),
        ("saliency pass", hooked),
    ):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best[name] = min(times)
    frame = pd.DataFrame({"pass": list(best), "seconds": list(best.values())})
    return frame.assign(ratio=frame["seconds"] / best["plain forward"])
