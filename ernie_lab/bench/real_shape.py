"""``ernie-lab bench --real-shape``: ERNIE-4.5-21B-A3B's real shape on a GPU, ours only.

Each timed figure gets its own peak-memory row (the peak counter is reset before the figure and read
before the bandwidth row's copy buffers exist); with ``compile=True`` decode is timed in the steady
state (:func:`~ernie_lab.bench.bench.decode_seconds`: prefill, warm-up and graph capture outside).
"""

from __future__ import annotations

import pandas as pd
import torch

from ernie_lab.bench.bench import (
    FULL,
    STEADY_NOTE,
    BenchSizes,
    _row,
    bandwidth_row,
    decode_seconds,
    interleaved_medians,
)
from ernie_lab.generation.generate import generate
from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.ernie import ErnieMoE
from ernie_lab.model.offload import device_bytes, offload_experts
from ernie_lab.model.quant import quantize_model


def run_real_shape(
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    repeats: int = 3,
    preset: str = "21b-a3b",
    seed: int = 0,
    compile: bool = False,
    sizes: BenchSizes = FULL,
    quantization: str | None = None,
    expert_slots: int | None = None,
) -> pd.DataFrame:
    """ERNIE-4.5-21B-A3B's real shape with random weights, ours only (two copies of 21B parameters do
    not fit beside each other on one 80 GB GPU): prefill, decode and the bandwidth fraction.

    The model is built directly on ``device`` in ``dtype`` (never as fp32 on the host), then
    quantized (``quantization``) and/or its experts offloaded to host memory with ``expert_slots``
    device slots per layer; a row then gives the weights' bytes on the device."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--real-shape needs a CUDA GPU (the 21B-A3B shape takes ~42 GB in bf16)")

    cfg = ErnieConfig.preset(preset)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: an fp32 21B model would not fit
    try:
        with torch.device(device):
            model = ErnieMoE(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    if quantization is not None:
        quantize_model(model, quantization)
    if expert_slots is not None:
        offload_experts(model, expert_slots, device)
    rows = []
    if quantization is not None or expert_slots is not None:
        rows.append(_row("weights on the device", device_bytes(model) / 2**30, None, "GiB", f"{quantization or dtype}"))
    cuda = str(device).startswith("cuda")
    ids = torch.randint(0, cfg.vocab_size, (1, sizes.prefill_tokens), device=device)
    _reset_peak(cuda)
    with torch.inference_mode():
        (t,) = interleaved_medians([lambda: model(ids)], repeats, device)
    rows.append(_row("prefill", sizes.prefill_tokens / t, None, "tokens/s", f"{sizes.prefill_tokens} tokens"))
    rows += _peak_row("prefill", cuda)
    n = sizes.new_tokens
    for batch in (1, sizes.batch):
        prompt = torch.randint(0, cfg.vocab_size, (batch, sizes.prompt_tokens), device=device)
        run = lambda m=n, p=prompt: generate(model, p, max_new_tokens=m, compile=compile, eos_token_id=())
        _reset_peak(cuda)
        (t,) = decode_seconds(run, n=n, repeats=repeats, device=device, steady=compile)
        name = "decode" if batch == 1 else f"batched decode (batch {batch})"
        note = f"{preset}, {dtype}" + (STEADY_NOTE if compile else "")
        rows.append(_row(name, batch * n / t, None, "new tokens/s", note))
        peak = _peak_row(name, cuda)  # read before the bandwidth row's copy buffers exist
        if batch == 1:
            rows.append(bandwidth_row(model, rows[-1]["ours"], device))
        rows += peak
    return pd.DataFrame(rows)


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def _peak_row(figure: str, cuda: bool) -> list[dict]:
    """Peak GPU memory since the last :func:`_reset_peak` (one row per timed figure)."""
    if not cuda:
        return []
    return [_row(f"peak GPU memory ({figure})", torch.cuda.max_memory_allocated() / 2**30, None, "GiB")]
