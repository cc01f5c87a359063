"""``ernie-lab info``: presets, local checkpoints, hub ids (config.json only), JSON output, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import save_hf_checkpoint

from ernie_lab import cli
from ernie_lab.commands import info
from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.params import count_params, human


def run_info(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["info", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("preset", ["21b-a3b", "300b-a47b"])
def test_info_preset(capsys, preset):
    rc, out, _ = run_info(capsys, preset)
    cfg = ErnieConfig.preset(preset)
    counts = count_params(cfg)
    first_moe = cfg.moe_layer_start_index
    assert rc == 0
    assert f"{cfg.num_hidden_layers}: {'D' * first_moe}{'M' * (cfg.num_hidden_layers - first_moe)}" in out
    assert f"MoE       {first_moe}-{cfg.num_hidden_layers - 1}" in out
    assert f"total {human(counts['total'])} ({counts['total']:,})" in out
    assert f"active {human(counts['active'])} per token" in out
    assert f"bf16 {human(counts['bytes']['bf16'], 'B')}" in out and f"fp32 {human(counts['bytes']['fp32'], 'B')}" in out
    assert f"hidden_size              {cfg.hidden_size}" in out


def test_info_local_checkpoint_json(capsys, tmp_path):
    save_hf_checkpoint(tmp_path, num_hidden_layers=6, moe_layer_start_index=0, moe_layer_interval=2)
    rc, out, _ = run_info(capsys, str(tmp_path), "--json")
    summary = json.loads(out)
    assert rc == 0
    assert summary["layers"] == {"map": "DMDMDM", "dense": [0, 2, 4], "moe": [1, 3, 5]}
    assert summary["params"]["total"] == count_params(ErnieConfig.from_hf(tmp_path))["total"]
    assert summary["config"]["hidden_size"] == 32 and summary["checkpoint"]["files"] == 1
    rc, out, _ = run_info(capsys, str(tmp_path))
    assert "dense     0, 2, 4" in out and "1 safetensors file(s)" in out


def test_info_hub_id_downloads_only_config(capsys, monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ErnieConfig.preset("bench").to_hf_dict()))
    calls = []

    def fake_resolve(src, allow_patterns=None):
        calls.append((src, allow_patterns))
        return tmp_path

    monkeypatch.setattr(info, "resolve_source", fake_resolve)
    rc, out, _ = run_info(capsys, "baidu/ERNIE-4.5-21B-A3B-PT")
    assert rc == 0 and calls == [("baidu/ERNIE-4.5-21B-A3B-PT", ["config.json"])]
    assert f"total {human(count_params(ErnieConfig.preset('bench'))['total'])}" in out


def test_info_errors_exit_nonzero(capsys, tmp_path):
    rc, out, err = run_info(capsys, str(tmp_path / "missing"))
    assert rc == 2 and out == "" and err.startswith("ernie-lab info: error: ") and "missing" in err
    (tmp_path / "config.json").write_text(json.dumps({"moe_num_experts": [64, 64]}))
    rc, _, err = run_info(capsys, str(tmp_path))
    assert rc == 2 and "moe_num_experts" in err and err.count("\n") == 1


def test_layer_ranges():
    assert info.layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert info.layer_ranges([3]) == "3"
    assert info.layer_ranges([]) == "none"


def test_console_entry_point():
    run = subprocess.run(
        [sys.executable, "-m", "ernie_lab.cli", "info", "tiny"], capture_output=True, text=True, check=True
    )
    assert "3: DMM" in run.stdout


def test_info_quantized_memory_matches_loaded_models(capsys, tmp_path):
    """The memory ``info --quantization --expert-slots`` predicts is what loading takes."""
    import torch

    import ernie_lab as el

    save_hf_checkpoint(tmp_path)
    rc, out, _ = run_info(capsys, str(tmp_path), "--json", "--quantization", "nf4", "--expert-slots", "2")
    memory = json.loads(out)["memory"]
    assert rc == 0
    model = el.load_model(tmp_path, dtype=torch.bfloat16, quantization="nf4", offload="experts", expert_slots=2)
    host = sum(
        getattr(b.mlp.experts, n).numel() * getattr(b.mlp.experts, n).element_size()
        for b in model.blocks
        if b.mlp.__class__.__name__ == "MoE"
        for n in b.mlp.experts.names
    )
    assert memory["routed_experts"] == host
    assert memory["device"] == model.get_memory_footprint() - host
    resident = el.load_model(tmp_path, dtype=torch.bfloat16, quantization="nf4")
    assert memory["total"] == resident.get_memory_footprint()
    rc, out, _ = run_info(capsys, str(tmp_path), "--quantization", "int8")
    assert rc == 0 and "loaded      int8:" in out
    rc, _, err = run_info(capsys, str(tmp_path), "--expert-slots", "0")
    assert rc == 2 and "--expert-slots must be in 1.." in err
