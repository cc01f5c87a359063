"""Smoke test of ``ernie-lab bench --quick``: the table has every figure, finite and positive.

Speed itself is not asserted (ratios are read from the printed table, not tested).
"""

from __future__ import annotations

import math

import pytest
import torch

from ernie_lab.bench.bench import FULL, QUICK, hook_point_calls
from ernie_lab.bench.real_shape import run_real_shape
from ernie_lab.cli import main

FIGURES = [
    "prefill",
    "decode",
    "decode / bandwidth limit",
    "batched decode (batch 2)",
    "operator calls per decode token",
    "operator calls per decode step (batch 2)",
    "hook overhead (decode step)",
    "hook overhead (prefill)",
    "full cache time",
    "full cache size",
    "load time",
    "load peak memory",
]
COMPARED = {
    "prefill",
    "decode",
    "batched decode (batch 2)",
    "operator calls per decode token",
    "operator calls per decode step (batch 2)",
    "load time",
    "load peak memory",
}


def test_quick_bench_command_prints_every_figure(tmp_path, capsys):
    import pandas as pd

    csv = tmp_path / "bench.csv"
    assert main(["bench", "--quick", "--repeats", "1", "--csv", str(csv)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("ernie-lab bench: config tiny (quick)")
    table = pd.read_csv(csv)
    assert table["figure"].tolist() == FIGURES
    for row in table.itertuples():
        assert row.figure in printed
        assert math.isfinite(row.ours) and row.ours >= 0, row.figure
        if row.figure in COMPARED:
            assert row.transformers > 0 and math.isfinite(row.ratio), row.figure
        else:
            assert math.isnan(row.transformers), row.figure
    decode = table.set_index("figure").loc["decode"]
    assert "100% tokens agree" in decode["note"]  # both sides generated the same greedy tokens


def test_hook_point_calls_counts_each_unhooked_point_once():
    from ernie_lab.model.config import ErnieConfig
    from ernie_lab.model.ernie import ErnieMoE

    model = ErnieMoE(ErnieConfig.preset("tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    # unhooked, the costly attention / expert points are never reached (fast paths)
    costly = ("hook_attn_scores", "hook_pattern", "hook_expert_post", "hook_expert_out")
    expected = sum(not name.endswith(costly) for name in model.hook_names())
    assert hook_point_calls(model, ids) == expected
    assert FULL.prefill_tokens == 512 and FULL.new_tokens == 64 and FULL.prompt_tokens == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without a GPU")
def test_real_shape_needs_a_gpu():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        run_real_shape(device="cuda")


def test_real_shape_code_path_on_a_tiny_preset():
    table = run_real_shape(dtype=torch.float32, device="cpu", preset="tiny", repeats=1, sizes=QUICK)
    assert table["figure"].tolist() == ["prefill", "decode", "decode / bandwidth limit", "batched decode (batch 2)"]
    assert (table["ours"] > 0).all()


def test_steady_decode_time_leaves_prefill_and_capture_out(monkeypatch):
    """Compiled decode is timed as ``(t(n) - t(2)) * n / (n - 2)``: a run costing ``fixed + m * step``
    (prefill, warm-up, capture: ``fixed``) gives ``n * step``; eager runs are timed whole."""
    from ernie_lab.bench import bench

    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    calls = []

    def run(m: int = 16, fixed: float = 5.0, step: float = 0.25):
        calls.append(m)
        clock[0] += fixed + m * step

    steady = bench.decode_seconds(run, lambda m=16: run(m, 1.0, 0.5), n=16, repeats=3, device="cpu", steady=True)
    assert steady == pytest.approx([16 * 0.25, 16 * 0.5])
    assert sorted(set(calls)) == [2, 16]
    (whole,) = bench.decode_seconds(run, n=16, repeats=3, device="cpu", steady=False)
    assert whole == pytest.approx(5.0 + 16 * 0.25)
