"""``ernie-lab info SRC --tp N``: weights per GPU under ``tp_plan="auto"``."""

from __future__ import annotations

import json

import pytest

from ernie_lab import cli
from ernie_lab.distributed import memory_split
from ernie_lab.model import ErnieConfig, count_params


@pytest.mark.parametrize(("preset", "n"), [("21b-a3b", 2), ("300b-a47b", 8)])
def test_per_gpu_bytes(capsys, preset, n):
    assert cli.main(["info", preset, "--tp", str(n), "--json"]) == 0
    parallel = json.loads(capsys.readouterr().out)["tensor_parallel"]
    cfg = ErnieConfig.preset(preset)
    total = count_params(cfg)["bytes"]["bf16"]
    split, replicated = memory_split(cfg, n)
    # the split tensors divide exactly; together with the replicated ones they make the whole model
    assert split * n + replicated == total
    assert parallel["per_gpu_bytes"] == split + replicated < total / n * 1.1
    assert cli.main(["info", preset, "--tp", str(n)]) == 0
    assert f"on {n} GPUs" in capsys.readouterr().out


def test_invalid_gpu_count(capsys):
    assert cli.main(["info", "300b-a47b", "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert "not divisible by 3" in err and "[1, 2, 4, 8]" in err
