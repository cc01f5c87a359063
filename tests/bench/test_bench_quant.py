"""Smoke test of ``ernie-lab bench --quantization / --offload experts``: every figure, in range."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from ernie_lab.cli import main

FIGURES = [
    "weights",
    "weights on the device",
    "decode",
    "greedy tokens agree",
    "next-token agreement",
    "routing agreement",
    "offload hit rate",
    "offload copied per token",
]


def test_quantized_offloaded_bench_prints_every_figure(tmp_path, capsys):
    csv = tmp_path / "bench.csv"
    args = ["bench", "--quick", "--repeats", "1", "--quantization", "nf4", "--offload", "experts"]
    assert main([*args, "--expert-slots", "2", "--csv", str(csv)]) == 0
    assert "nf4, offload 2 slots vs full precision" in capsys.readouterr().out
    table = pd.read_csv(csv).set_index("figure")
    assert table.index.tolist() == FIGURES
    assert all(math.isfinite(v) and v > 0 for v in table["variant"])
    assert table.loc["weights", "variant"] < 0.35 * table.loc["weights", "full"]
    assert table.loc["weights on the device", "variant"] < table.loc["weights", "variant"]
    for fraction in ("greedy tokens agree", "next-token agreement", "routing agreement", "offload hit rate"):
        assert 0 <= table.loc[fraction, "variant"] <= 1


def test_bench_variant_needs_a_variant():
    from ernie_lab.bench.bench_quant import run_variant_bench

    with pytest.raises(ValueError, match="quantization= and/or expert_slots="):
        run_variant_bench(quick=True)


def test_real_shape_code_path_quantized_and_offloaded():
    from ernie_lab.bench.bench import QUICK
    from ernie_lab.bench.real_shape import run_real_shape

    table = run_real_shape(
        dtype=torch.float32, device="cpu", preset="tiny", repeats=1, sizes=QUICK, quantization="nf4", expert_slots=2
    )
    assert table["figure"].tolist()[:2] == ["weights on the device", "prefill"]
    assert (table["ours"] > 0).all()
