"""``ernie-lab bench --tp N``: a tensor + expert parallel model on N CPU processes (gloo) against one
process, on the same random checkpoint: forward times and the bytes each process holds.

Every process (and the single-process reference) uses one thread, so TP-N uses N cores against one.
On the CPU this measures the plan's overhead (collectives through gloo, off-rank expert slots), not
multi-GPU speed: NCCL and several GPUs are not available to this bench.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

from ernie_lab.bench.bench import FULL, QUICK, BenchSizes, _decode_step_time, save_random_checkpoint
from ernie_lab.distributed import check_size, load_model, spawn
from ernie_lab.model.config import ErnieConfig


def _held_bytes(model) -> int:
    """Bytes of the parameters and buffers this process holds (tied tensors once)."""
    unique = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _prefill_time(model, sizes: BenchSizes, repeats: int) -> float:
    """Median seconds of one forward over ``[1 prefill_tokens]`` (the same tokens in every process)."""
    ids = torch.randint(
        0, model.config.vocab_size, (1, sizes.prefill_tokens), generator=torch.Generator().manual_seed(0)
    )
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _measure(model, sizes: BenchSizes, repeats: int) -> dict:
    torch.manual_seed(0)  # the decode bench draws its prompt: the same in every process
    return {
        "prefill": _prefill_time(model, sizes, repeats),
        "decode": _decode_step_time(model, sizes, repeats, "cpu"),
        "bytes": _held_bytes(model),
    }


def _rank(directory: str, sizes: BenchSizes, repeats: int) -> dict:
    return _measure(load_model(directory, tp_plan="auto"), sizes, repeats)


def run_tp_bench(config: str = "bench", n: int = 2, repeats: int = 5, quick: bool = False) -> pd.DataFrame:
    """Rows: prefill forward, one decode step, bytes held per process; one process vs TP-``n``.
    ``ratio`` is TP-n / one process (below 1: TP-n is faster, or holds less)."""
    cfg = ErnieConfig.preset("tiny" if quick else config)
    check_size(cfg, n)  # before the one-process model is timed
    sizes = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="ernie-tp-bench-") as tmp:
            directory = save_random_checkpoint(cfg, Path(tmp))
            one = _measure(load_model(directory), sizes, repeats)
            ranks = spawn(_rank, n, str(directory), sizes, repeats)
    finally:
        torch.set_num_threads(threads)
    tp = {k: max(r[k] for r in ranks) for k in one}  # the slowest process sets the pace
    rows = [
        ("prefill forward", 1e3 * one["prefill"], 1e3 * tp["prefill"], "ms", f"[1 {sizes.prefill_tokens}] tokens"),
        ("decode step", 1e3 * one["decode"], 1e3 * tp["decode"], "ms", f"after {sizes.prompt_tokens} tokens"),
        ("weights held", one["bytes"] / 2**20, tp["bytes"] / 2**20, "MiB per process", "fp32"),
    ]
    return pd.DataFrame(
        [dict(figure=f, one_process=a, **{f"tp{n}": b}, ratio=b / a, unit=u, note=note) for f, a, b, u, note in rows]
    )
