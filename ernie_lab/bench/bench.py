"""Speed figures (README, "How speed is measured"): ernie_lab against transformers on one checkpoint, side by side.

Both models load the same ``save_pretrained`` checkpoint (random weights) in one process with the same
dtype and thread count; every figure is a median over ``repeats`` interleaved runs (ours, theirs,
ours, ...) after a warm-up, so load from other processes hits both sides alike. Functions return
tidy DataFrames with columns ``figure, ours, transformers, ratio, unit, note`` (ratio > 1 means
ernie_lab is better); ``ernie-lab bench`` prints them.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ernie_lab.bench.op_count import decode_op_count, transformers_decode_op_count
from ernie_lab.generation.generate import generate
from ernie_lab.io.weights import load_model
from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.hook_points import HookPoint
from ernie_lab.model.kv_cache import KVCache
from ernie_lab.model.params import stored_active_bytes


@dataclass(frozen=True)
class BenchSizes:
    """Workload sizes: the README's by default, tiny ones for ``--quick`` smoke runs."""

    prefill_tokens: int = 512
    prompt_tokens: int = 16
    new_tokens: int = 64
    batch: int = 8


FULL = BenchSizes()
QUICK = BenchSizes(prefill_tokens=32, prompt_tokens=4, new_tokens=4, batch=2)


def save_random_checkpoint(config: ErnieConfig, directory: Path, seed: int = 0) -> Path:
    """Build ``config`` with transformers (its own random init) and ``save_pretrained`` it."""
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    hf_dict = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**hf_dict)).save_pretrained(directory)
    return directory


def load_pair(directory: Path, dtype: torch.dtype, device: str):
    """(ours, transformers) loaded from the same checkpoint directory, in eval mode."""
    from transformers import Ernie4_5_MoeForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # no load/generation chatter in the table
    logging.disable_progress_bar()
    ours = load_model(directory, dtype=dtype, device=device)
    theirs = Ernie4_5_MoeForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    return ours, theirs


def interleaved_medians(fns: list[Callable[[], object]], repeats: int, device: str) -> list[float]:
    """Median seconds of each ``fn`` over ``repeats`` rounds, run alternately after one warm-up each."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _row(figure: str, ours: float, theirs: float | None, unit: str, note: str = "", higher_better=True) -> dict:
    ratio = None
    if theirs:
        ratio = ours / theirs if higher_better else theirs / ours
    return dict(figure=figure, ours=ours, transformers=theirs, ratio=ratio, unit=unit, note=note)


STEADY_NOTE = "; decode steps only: generate(n) - generate(2)"


def decode_seconds(*runs: Callable[..., object], n: int, repeats: int, device: str, steady: bool) -> list[float]:
    """Seconds of each ``run(m)`` generating ``n`` tokens. ``steady`` (compiled decode): the time of
    ``n`` decode steps alone, ``(t(n) - t(2)) * n / (n - 2)``, so the prefill, warm-up and graph
    capture that every ``generate`` call pays stay outside the timed region, on every side alike."""
    if not steady or n <= 2:
        return interleaved_medians(list(runs), repeats, device)
    times = interleaved_medians([f for run in runs for f in (run, lambda run=run: run(2))], repeats, device)
    return [(times[i] - times[i + 1]) * n / (n - 2) for i in range(0, len(times), 2)]


# ---------------------------------------------------------------------------------------- figures
def bench_prefill(ours, theirs, sizes: BenchSizes, repeats: int, device: str) -> list[dict]:
    """Tokens/s of one forward over ``prefill_tokens`` tokens at batch 1 (full logits both sides)."""
    ids = torch.randint(0, ours.config.vocab_size, (1, sizes.prefill_tokens), device=device)
    with torch.inference_mode():
        t_ours, t_theirs = interleaved_medians([lambda: ours(ids), lambda: theirs(ids)], repeats, device)
    n = sizes.prefill_tokens
    return [_row("prefill", n / t_ours, n / t_theirs, "tokens/s", f"{n} tokens, batch 1")]


def bench_decode(
    ours, theirs, sizes: BenchSizes, batch: int, repeats: int, device: str, compile: bool = False
) -> list[dict]:
    """New tokens/s generating ``new_tokens`` greedily after a ``prompt_tokens`` prompt.

    transformers runs its own ``generate(do_sample=False)`` with ``min_new_tokens`` so both sides
    produce the same number of tokens; the note says how many generated tokens agree.
    """
    ids = torch.randint(0, ours.config.vocab_size, (batch, sizes.prompt_tokens), device=device)
    mask = torch.ones_like(ids)
    n = sizes.new_tokens
    out: dict[str, torch.Tensor] = {}

    def run_ours(m: int = n):
        out[f"ours{m}"] = generate(ours, ids, max_new_tokens=m, compile=compile, eos_token_id=())  # exactly m

    def run_theirs(m: int = n):
        with torch.inference_mode():
            out[f"theirs{m}"] = theirs.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=m, min_new_tokens=m, pad_token_id=0
            )

    t_ours, t_theirs = decode_seconds(run_ours, run_theirs, n=n, repeats=repeats, device=device, steady=compile)
    same = (out[f"ours{n}"][:, -n:] == out[f"theirs{n}"][:, -n:]).float().mean().item()
    name = "decode" if batch == 1 else f"batched decode (batch {batch})"
    note = f"{n} new after {sizes.prompt_tokens}; {same:.0%} tokens agree" + (STEADY_NOTE if compile else "")
    return [_row(name, batch * n / t_ours, batch * n / t_theirs, "new tokens/s", note)]


def bench_op_count(ours, theirs, batch: int) -> list[dict]:
    """Aten operator calls per decode token (batch 1) and per step at ``batch``, both sides:
    deterministic, load-independent (``op_count``: calls made from Python, not those nested in them)."""
    rows = []
    figures = {1: "operator calls per decode token", batch: f"operator calls per decode step (batch {batch})"}
    for b, figure in figures.items():
        n_ours, n_theirs = decode_op_count(ours, batch=b), transformers_decode_op_count(theirs, batch=b)
        note = "torch.profiler aten calls from Python, 17 new tokens minus 1, / 16"
        rows.append(_row(figure, n_ours, n_theirs, "calls", note, higher_better=False))
    return rows


def hook_point_calls(model, ids: torch.Tensor) -> int:
    """How many hook-point calls one forward over ``ids`` makes (counted by a temporary wrapper)."""
    count = 0
    original = HookPoint.__call__

    def counting(self, x):
        nonlocal count
        count += 1
        return original(self, x)

    HookPoint.__call__ = counting
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        HookPoint.__call__ = original
    return count


def bench_hook_overhead(ours, sizes: BenchSizes, repeats: int, device: str) -> list[dict]:
    """Cost of the hook points when nothing is hooked, as % of the forward time.

    A model without hook points would skip each call outright, so the overhead is (hook-point calls
    per forward) x (time of one unhooked call, measured in a tight loop) / forward time, for the
    cheapest forward there is (a one-token decode step) and for the prefill. Timing two whole forwards
    against each other would drown a ~1% effect in the noise of a shared machine.
    """
    point, x = HookPoint("probe"), torch.zeros(1)
    n_calls = 100_000
    start = time.perf_counter()
    for _ in range(n_calls):
        point(x)
    per_call = (time.perf_counter() - start) / n_calls
    rows = []
    for label, t in (("decode step", 1), ("prefill", sizes.prefill_tokens)):
        ids = torch.randint(0, ours.config.vocab_size, (1, t), device=device)
        calls = hook_point_calls(ours, ids)
        if t == 1:
            fwd = _decode_step_time(ours, sizes, repeats, device)
        else:
            with torch.inference_mode():
                (fwd,) = interleaved_medians([lambda ids=ids: ours(ids)], repeats, device)
        note = f"{calls} calls x {per_call * 1e9:.0f} ns / {fwd * 1e3:.2f} ms forward"
        rows.append(_row(f"hook overhead ({label})", 100 * calls * per_call / fwd, None, "% of forward", note))
    return rows


def _decode_step_time(model, sizes: BenchSizes, repeats: int, device: str) -> float:
    """Median seconds of one decode forward after a ``prompt_tokens`` prefill (batch 1)."""

    ids = torch.randint(0, model.config.vocab_size, (1, sizes.prompt_tokens), device=device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            cache = KVCache.for_model(model, 1, sizes.prompt_tokens + 2)
            model.forward_unchecked(ids, None, cache)
            _sync(device)
            start = time.perf_counter()
            model.forward_unchecked(ids[:, -1:], None, cache)
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def bench_full_cache(ours, sizes: BenchSizes, repeats: int, device: str) -> list[dict]:
    """``run_with_cache`` on every hook point vs a plain forward over the prefill tokens."""
    ids = torch.randint(0, ours.config.vocab_size, (1, sizes.prefill_tokens), device=device)
    with torch.inference_mode():
        t_cache, t_plain = interleaved_medians([lambda: ours.run_with_cache(ids), lambda: ours(ids)], repeats, device)
        _, cache = ours.run_with_cache(ids)
    n_points = len(cache)
    return [
        _row("full cache time", t_cache / t_plain, None, "x plain forward", f"{n_points} hook points"),
        _row("full cache size", cache.nbytes / 2**20, None, "MiB", f"{sizes.prefill_tokens} tokens, batch 1"),
    ]


_LOAD_SCRIPT = """
import json, resource, sys, time
import torch
import torch._dynamo  # torch's own lazy import: paid up front by both sides, not timed as loading
which, directory = sys.argv[1], sys.argv[2]
if which == "ours":
    from ernie_lab.io.weights import load_model as load
else:
    from transformers import Ernie4_5_MoeForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    load = Ernie4_5_MoeForCausalLM.from_pretrained

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

try:  # Linux: reset the high-water mark so the peak is the load's own (proc(5), clear_refs)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, peak_key = status("VmRSS:"), "VmHWM:"
except OSError:
    before, peak_key = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, None
start = time.perf_counter()
model = load(directory)
seconds = time.perf_counter() - start
peak = status(peak_key) if peak_key else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "rss_before": before, "rss_peak": peak}))
"""


def measure_load(directory: Path, which: str) -> dict:
    """Load ``directory`` in a fresh Python (``which`` = "ours" or "transformers"): seconds and peak RSS.

    A subprocess keeps the peak clean of the benchmark's own models; imports happen before the clock
    and the peak counter start, so ``rss_peak - rss_before`` is what loading itself added.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, which, str(directory)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loading with {which} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_load(directory: Path) -> list[dict]:
    ckpt = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    ours, theirs = measure_load(directory, "ours"), measure_load(directory, "transformers")

    def added(m: dict) -> float:
        return (m["rss_peak"] - m["rss_before"]) / ckpt

    note = (
        f"peak added / checkpoint {ckpt / 2**20:.0f} MiB; peak RSS {ours['rss_peak'] / 2**20:.0f} MiB ours, "
        f"{theirs['rss_peak'] / 2**20:.0f} MiB transformers"
    )
    return [
        _row("load time", ours["seconds"], theirs["seconds"], "s", higher_better=False),
        _row("load peak memory", added(ours), added(theirs), "x checkpoint", note, higher_better=False),
    ]


def copy_bandwidth(device: str, nbytes: int | None = None, repeats: int = 5) -> float:
    """Device memory bandwidth in bytes/s from timing ``dst.copy_(src)`` (read + write both counted)."""
    if nbytes is None:
        nbytes = 2**30 if str(device).startswith("cuda") else 2**28
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    (t,) = interleaved_medians([lambda: dst.copy_(src)], repeats, device)
    return 2 * nbytes / t


def bandwidth_row(model, decode_tps: float, device: str) -> dict:
    """Batch-1 decode tokens/s as a fraction of the memory-bandwidth limit.

    The limit is (measured copy bandwidth) / (bytes of the weights one token reads: attention, dense
    MLPs, shared experts, ``moe_k`` routed experts, router, embedding and LM head), counted on the
    model's stored tensors (:func:`~ernie_lab.model.params.stored_active_bytes`: quantized bytes for a
    quantized model).
    """
    active = stored_active_bytes(model)
    bandwidth = copy_bandwidth(device)
    limit = bandwidth / active
    note = f"{active / 2**20:.0f} MiB/token at {bandwidth / 1e9:.0f} GB/s copy bandwidth = {limit:.0f} tokens/s"
    return _row("decode / bandwidth limit", 100 * decode_tps / limit, None, "%", note)


# ---------------------------------------------------------------------------------------- driver
def run_bench(
    config: str = "bench",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    repeats: int = 5,
    quick: bool = False,
    threads: int | None = None,
    seed: int = 0,
    compile: bool = False,
) -> pd.DataFrame:
    """Every bench figure for preset ``config`` (``quick``: the tiny preset and tiny workloads).

    ``compile=True`` runs our decode steps through ``torch.compile`` (the warm-up compiles; on the CPU
    batch 1 only, see ``generate``).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = ErnieConfig.preset("tiny" if quick else config)
    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="ernie-bench-") as tmp:
        directory = save_random_checkpoint(cfg, Path(tmp), seed=seed)
        ours, theirs = load_pair(directory, dtype, device)
        torch.manual_seed(seed)
        rows = bench_prefill(ours, theirs, sizes, repeats, device)
        rows += bench_decode(ours, theirs, sizes, 1, repeats, device, compile)
        rows.append(bandwidth_row(ours, rows[-1]["ours"], device))
        rows += bench_decode(ours, theirs, sizes, sizes.batch, repeats, device, compile)
        if device == "cpu":  # the profiler counts host-side calls; on a GPU launches are counted elsewhere
            rows += bench_op_count(ours, theirs, sizes.batch)
        rows += bench_hook_overhead(ours, sizes, repeats, device)
        rows += bench_full_cache(ours, sizes, repeats, device)
        del ours, theirs
        rows += bench_load(directory)
    return pd.DataFrame(rows)
