"""``ernie-lab bench --quantization / --offload experts``: a quantized or expert-offloaded model
against the same checkpoint in full precision, side by side.

Figures: weight bytes (and, with offload, bytes on the device), decode tokens/s at batch 1, greedy
and next-token agreement, routing agreement (a callable supplied by the caller, since routing
statistics live in a higher wing) and the offload counters. Columns ``figure, full, variant,
ratio, unit, note``; ratio > 1 means the variant is better (smaller, faster).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from ernie_lab.bench.bench import FULL, QUICK, interleaved_medians, save_random_checkpoint
from ernie_lab.generation.generate import generate
from ernie_lab.io.sources import toy_dir
from ernie_lab.io.weights import load_model
from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.offload import OffloadedExperts, device_bytes, reset_offload_stats

# (full model, variant, input_ids [batch pos]) -> mean fraction of top-k experts both pick
RoutingOverlap = Callable[[torch.nn.Module, torch.nn.Module, torch.Tensor], float]


def _row(figure: str, full, variant, unit: str, note: str = "", ratio=None) -> dict:
    return {"figure": figure, "full": full, "variant": variant, "ratio": ratio, "unit": unit, "note": note}


def run_variant_bench(
    config: str = "bench",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    repeats: int = 5,
    quick: bool = False,
    quantization: str | None = None,
    expert_slots: int | None = None,
    routing_overlap: RoutingOverlap | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Full precision vs ``quantization`` and/or expert offload with ``expert_slots`` slots.

    ``config``: a preset saved with random weights, or ``"toy"`` (the trained toy checkpoint, whose
    routing is meaningful: random weights route on near-ties, so agreement there is pessimistic).
    """
    if quantization is None and expert_slots is None:
        raise ValueError("give quantization= and/or expert_slots= (offload) to compare against full precision")
    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="ernie-bench-") as tmp:
        if config == "toy":
            directory = toy_dir()
        else:
            directory = save_random_checkpoint(ErnieConfig.preset("tiny" if quick else config), Path(tmp), seed=seed)
        full = load_model(directory, dtype=dtype, device=device)
        offload = "experts" if expert_slots is not None else None
        variant = load_model(
            directory, dtype=dtype, device=device, quantization=quantization, offload=offload, expert_slots=expert_slots
        )
    torch.manual_seed(seed)
    vocab = full.config.vocab_size
    rows = [_bytes_row("weights", full.get_memory_footprint(), variant.get_memory_footprint())]
    if offload:
        rows.append(_bytes_row("weights on the device", device_bytes(full), device_bytes(variant)))

    prompt = torch.randint(3, vocab, (1, sizes.prompt_tokens), device=device)
    n = sizes.new_tokens
    out: dict[str, torch.Tensor] = {}
    runs = [
        lambda m=m, k=k: out.__setitem__(k, generate(m, prompt, max_new_tokens=n))
        for k, m in (("full", full), ("variant", variant))
    ]
    t_full, t_variant = interleaved_medians(runs, repeats, device)
    rows.append(
        _row("decode", n / t_full, n / t_variant, "new tokens/s", f"batch 1, {n} new tokens", t_full / t_variant)
    )
    same = (out["full"][:, -n:] == out["variant"][:, -n:]).double().mean().item()
    rows.append(_row("greedy tokens agree", None, same, "fraction", f"{n} greedy tokens"))

    ids = torch.randint(3, vocab, (sizes.batch, sizes.prefill_tokens // sizes.batch), device=device)
    with torch.inference_mode():
        agree = (full(ids).argmax(-1) == variant(ids).argmax(-1)).double().mean().item()
    rows.append(_row("next-token agreement", None, agree, "fraction", f"{ids.numel()} random-token positions"))
    if routing_overlap is not None:
        overlap = routing_overlap(full, variant, ids)
        rows.append(_row("routing agreement", None, overlap, "fraction", "mean top-k overlap per token and layer"))
    if offload:
        rows += _offload_rows(variant, prompt, n)
    return pd.DataFrame(rows)


def _bytes_row(figure: str, full: int, variant: int) -> dict:
    return _row(figure, full / 2**20, variant / 2**20, "MiB", f"{variant / full:.2f}x of full", full / variant)


def _offload_rows(model, prompt: torch.Tensor, n: int) -> list[dict]:
    """Counters of one greedy decode (prompt prefill included)."""
    reset_offload_stats(model)
    generate(model, prompt, max_new_tokens=n)
    stats = model.offload_stats()
    asked = stats["hits"] + stats["misses"]
    slots = next(m.n_slots for m in model.modules() if isinstance(m, OffloadedExperts))
    note = f"{slots} slots per layer, {stats['hits']} hits, {stats['misses']} misses"
    return [
        _row("offload hit rate", None, stats["hits"] / asked, "fraction", note),
        _row("offload copied per token", None, stats["bytes_copied"] / n / 2**20, "MiB", f"{n} new tokens"),
    ]
