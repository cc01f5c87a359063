"""``--threads`` on the compute commands, the busy-machine default, and the bench's missing extra."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from ernie_lab import cli
from ernie_lab import commands as C

COMPUTE_COMMANDS = ("bench", "generate", "report", "train-toy")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_every_compute_command_takes_threads():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in COMPUTE_COMMANDS:
        assert "--threads" in sub.choices[name].format_help(), name


def test_busy_machine_defaults_to_one_thread_with_one_line(monkeypatch, capsys, restore_threads):
    torch.set_num_threads(2)
    monkeypatch.setattr(C, "machine_load", lambda: (5.9, 2))
    assert C.apply_threads(None, "report") == 1 and torch.get_num_threads() == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "load average 5.9 on 2 cores" in err and "--threads" in err
    torch.set_num_threads(2)
    monkeypatch.setattr(C, "machine_load", lambda: (0.2, 2))
    assert C.apply_threads(None, "report") is None and torch.get_num_threads() == 2  # quiet: torch's default
    assert capsys.readouterr().err == ""
    assert C.apply_threads(3, "report") == 3 and torch.get_num_threads() == 3  # explicit wins
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        C.apply_threads(0, "report")


def test_report_threads_override_the_spec_and_reach_the_manifest(tmp_path, restore_threads):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "datasets": {"domains": {"prompt_set": "domains", "limit": 6}},
                "analyses": {"balance": {}},
                "threads": 2,
            }
        )
    )
    out = tmp_path / "out"
    assert cli.main(["report", str(spec), "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["torch_threads"] == 1 and manifest["spec"]["threads"] == 1


def test_generate_threads(capsys, restore_threads):
    torch.set_num_threads(2)
    args = ["generate", "toy", "--prompt", "The capital of Veloria is", "--max-new-tokens", "4", "--threads", "1"]
    assert cli.main([*args, "--no-progress"]) == 0
    assert torch.get_num_threads() == 1 and "Mirren" in capsys.readouterr().out


def test_bench_names_the_extra_it_needs(monkeypatch, capsys):
    real = importlib.util.find_spec
    absent = lambda name, *a: None if name == "transformers" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", absent)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ernie-lab bench: error: ") and err.count("\n") == 1
    assert "transformers" in err and "ernie-lab[bench]" in err
