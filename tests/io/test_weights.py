"""load_model / save_model: layouts, round trips with transformers, placement, memory, errors, bad inputs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_hf_model, save_hf_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ernie_lab.io.checkpoint import INDEX_FILE, SINGLE_FILE, hub_layout, write_checkpoint
from ernie_lab.io.weights import CheckpointError, load_model, save_model
from ernie_lab.model.config import PRESETS, ErnieConfig
from ernie_lab.model.ernie import ErnieMoE
from ernie_lab.model.placement import plan_auto, unit_bytes

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def rewrite(directory: Path, edit) -> None:
    """Apply ``edit(state) -> state`` to the single-file checkpoint in ``directory``."""
    path = directory / SINGLE_FILE
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))


def stored(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of every tensor of a checkpoint directory."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[k] = (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
    return out


# ----------------------------------------------------------------------------------- layouts
def test_sharded_transformers_checkpoint(tmp_path):
    hf = build_hf_model(seed=3, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / INDEX_FILE).exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    model = load_model(tmp_path)
    assert (logits(model) - logits(hf)).abs().max() <= 1e-4


def test_no_parameter_left_on_meta_and_no_random_init(hf_checkpoint, monkeypatch):
    directory, _ = hf_checkpoint
    monkeypatch.setattr(ErnieMoE, "init_weights", lambda self: pytest.fail("load_model ran a random init"))
    model = load_model(directory)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "cpu" for t in tensors)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert not model.training


def test_save_model_round_trip_and_layout_equals_transformers(hf_checkpoint, tmp_path):
    directory, hf = hf_checkpoint
    model = load_model(directory)
    out = save_model(model, tmp_path / "ours")
    assert stored(out) == stored(directory)  # same keys, shapes, dtypes as transformers wrote
    again = load_model(out)
    assert again.config == model.config
    ours, theirs = model.state_dict(), again.state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_save_model_sharded_is_read_by_transformers(tmp_path):
    from transformers import Ernie4_5_MoeForCausalLM

    save_hf_checkpoint(tmp_path / "src", seed=4, use_bias=True, tie_word_embeddings=False, moe_num_shared_experts=1)
    model = load_model(tmp_path / "src")
    out = save_model(model, tmp_path / "sharded", max_shard_size="30KB")
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in out.glob("*.safetensors")) - sum(
        8 + int.from_bytes((out / s).read_bytes()[:8], "little") for s in shards
    )
    hf = Ernie4_5_MoeForCausalLM.from_pretrained(out).eval()
    assert (logits(hf) - logits(model)).abs().max() <= 1e-4
    assert (logits(load_model(out)) - logits(model)).abs().max() == 0


def test_save_model_bf16(hf_checkpoint, tmp_path):
    from transformers import Ernie4_5_MoeForCausalLM

    out = save_model(load_model(hf_checkpoint[0]), tmp_path / "bf16", dtype="bfloat16")
    dtypes = {k: dt for k, (_, dt) in stored(out).items()}
    assert {dt for k, dt in dtypes.items() if "mlp.gate.weight" in k or "moe_statics" in k} == {"F32"}
    assert {dt for k, dt in dtypes.items() if "mlp.gate.weight" not in k and "moe_statics" not in k} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_model(out)  # default dtype: the checkpoint's
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.blocks[1].mlp.gate.weight.dtype == torch.float32
    hf = Ernie4_5_MoeForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert torch.equal(logits(model).argmax(-1), logits(hf).argmax(-1))


def test_save_model_replaces_atomically_and_keeps_other_files(hf_checkpoint, tmp_path, monkeypatch):
    model = load_model(hf_checkpoint[0])
    out = tmp_path / "saved"
    save_model(model, out, max_shard_size="30KB")
    (out / "tokenizer.json").write_text("{}")
    save_model(model, out)  # sharded -> single file
    assert sorted(p.name for p in out.iterdir()) == [
        ".ernie_lab.json",
        "config.json",
        "generation_config.json",
        SINGLE_FILE,
        "tokenizer.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "saved"]  # no temp or backup left

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ernie_lab.io.weights.write_checkpoint", crash)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        save_model(model, out, dtype=torch.bfloat16)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "saved"]


def test_save_model_refuses_to_replace_non_checkpoints(hf_checkpoint, tmp_path):
    model = load_model(hf_checkpoint[0])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="notes"):
        save_model(model, tmp_path / "notes")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_model(model, tmp_path / "file")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"


# ------------------------------------------------------------------------------ dtype / memory
def test_default_dtype_from_tensors_when_config_has_none(hf_checkpoint):
    directory, _ = hf_checkpoint
    rewrite(
        directory,
        lambda sd: {k: v if "gate.weight" in k or "moe_statics" in k else v.bfloat16() for k, v in sd.items()},
    )
    edit_config(directory, dtype=None)
    assert load_model(directory).model.embed_tokens.weight.dtype == torch.bfloat16
    assert load_model(directory, dtype="float32").model.embed_tokens.weight.dtype == torch.float32


_MEASURE = """
import json, sys, torch
from ernie_lab.model.config import PRESETS, ErnieConfig
from ernie_lab.model.ernie import ErnieMoE
from ernie_lab.io.weights import load_model
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
with torch.device("meta"):  # the first meta-device model imports torch's meta kernels (~70 MB, once)
    ErnieMoE(ErnieConfig.preset("tiny"), init=False)
rss = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
model = load_model(sys.argv[1], dtype=torch.bfloat16)
dtypes = sorted({str(t.dtype) for t in model.parameters()})
print(json.dumps({"rss": rss, "peak": status("VmHWM:"), "dtypes": dtypes}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak RSS")
def test_bf16_load_never_materialises_an_fp32_copy(tmp_path):
    """~100 MB bf16 checkpoint in 8 shards: peak RSS growth while loading stays near 1x its size (an
    fp32 copy alone would add 2x)."""
    cfg = ErnieConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        moe_num_experts=16,
        moe_k=2,
        moe_intermediate_size=512,
    )
    with torch.device("meta"):
        layout = hub_layout(ErnieMoE(cfg, init=False))
    tensors = {k: (torch.Size(s.shape), torch.float32 if s.fp32 else torch.bfloat16) for k, s in layout.items()}
    nbytes = sum(shape.numel() * dt.itemsize for shape, dt in tensors.values())
    write_checkpoint(tensors, lambda k: torch.full(tensors[k][0], 0.5, dtype=tensors[k][1]), tmp_path, nbytes // 8)
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_hf_dict(), "dtype": "bfloat16"}))
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path)], capture_output=True, text=True, check=True)
    m = json.loads(run.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["rss"]
    assert m["dtypes"] == ["torch.bfloat16", "torch.float32"]
    assert 0.8 * nbytes < grew < 1.5 * nbytes, f"peak RSS grew {grew / 1e6:.0f} MB for {nbytes / 1e6:.0f} MB"


# ---------------------------------------------------------------------------------- placement
def test_device_auto_on_cpu_and_explicit_devices(hf_checkpoint):
    directory, hf = hf_checkpoint
    for device in ("auto", "cpu", torch.device("cpu")):
        model = load_model(directory, device=device)
        assert {t.device.type for t in model.state_dict().values()} == {"cpu"}
    assert (logits(model) - logits(hf)).abs().max() <= 1e-4


def test_plan_auto_fills_gpus_in_order_then_cpu():
    cfg = ErnieConfig(**{**PRESETS["tiny"], "num_hidden_layers": 6, "tie_word_embeddings": False})
    with torch.device("meta"):
        sizes = unit_bytes(ErnieMoE(cfg, init=False), torch.bfloat16)
    assert list(sizes)[:2] == ["model.embed_tokens", "model.layers.0"] and list(sizes)[-2:] == ["model.norm", "lm_head"]
    layer = sizes["model.layers.1"]
    gpus = [torch.device("cuda", i) for i in range(2)]
    budgets = {gpus[0]: sizes["model.embed_tokens"] + 2 * layer + 10, gpus[1]: 3 * layer}
    plan = plan_auto(sizes, budgets, tied=False)
    order = [plan[u] for u in sizes]
    assert plan["model.embed_tokens"] == gpus[0] and plan["lm_head"] == torch.device("cpu")
    assert order == sorted(order, key=[*gpus, torch.device("cpu")].index)  # never goes back
    assert all(sum(n for u, n in sizes.items() if plan[u] == d) <= b for d, b in budgets.items())  # no GPU over budget
    roomy = plan_auto(sizes, {gpus[0]: 10**12}, tied=False)
    assert set(roomy.values()) == {gpus[0]}
    tied = plan_auto(sizes, {gpus[0]: sizes["model.embed_tokens"], gpus[1]: 10**12}, tied=True)
    assert tied["lm_head"] == tied["model.embed_tokens"] == gpus[0] and tied["model.norm"] == gpus[1]


# ------------------------------------------------------------------------------------- errors
def test_missing_unexpected_and_misshaped_keys_are_named(hf_checkpoint):
    directory, _ = hf_checkpoint
    key = "model.layers.1.self_attn.q_proj.weight"
    original = load_file(directory / SINGLE_FILE)

    rewrite(
        directory,
        lambda sd: {k: v for k, v in sd.items() if k not in (key, "model.layers.2.mlp.experts.3.up_proj.weight")},
    )
    with pytest.raises(CheckpointError, match=r"2 key\(s\) missing") as err:
        load_model(directory)
    assert key in str(err.value) and "experts.3.up_proj" in str(err.value)

    rewrite(directory, lambda sd: {**original, "model.layers.0.mlp.bogus.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected key.*model\.layers\.0\.mlp\.bogus\.weight"):
        load_model(directory)

    rewrite(directory, lambda sd: {**original, key: torch.zeros(33, 32)})
    with pytest.raises(CheckpointError, match=rf"{key}.*\(33, 32\).*\(32, 32\)"):
        load_model(directory)


def test_mtp_keys_are_ignored_with_one_note(hf_checkpoint, caplog):
    directory, hf = hf_checkpoint
    extra = {"mtp_block.0.self_attn.q_proj.weight": torch.ones(4, 4), "model.mtp_emb_norm.0.weight": torch.ones(4)}
    rewrite(directory, lambda sd: {**sd, **extra})
    with caplog.at_level(logging.INFO, logger="ernie_lab"):
        model = load_model(directory)
    notes = [r.getMessage() for r in caplog.records if "mtp" in r.getMessage()]
    assert len(notes) == 1 and "2 " in notes[0]
    assert (logits(model) - logits(hf)).abs().max() <= 1e-4


@pytest.mark.parametrize("aux_free", [False, True, None])
def test_missing_moe_statics(hf_checkpoint, aux_free):
    directory, _ = hf_checkpoint
    rewrite(directory, lambda sd: {k: v for k, v in sd.items() if "moe_statics" not in k})
    edit_config(directory, moe_use_aux_free=aux_free)
    if aux_free is False:
        model = load_model(directory)
        assert all(not b.any() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    else:
        with pytest.raises(CheckpointError, match="moe_statics.e_score_correction_bias.*moe_use_aux_free"):
            load_model(directory)


def test_tied_checkpoint_with_stored_lm_head(hf_checkpoint, caplog):
    from transformers import Ernie4_5_MoeForCausalLM

    directory, hf = hf_checkpoint
    rewrite(directory, lambda sd: {**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()})
    model = load_model(directory)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    different = torch.randn(128, 32, generator=torch.Generator().manual_seed(5))
    rewrite(directory, lambda sd: {**sd, "lm_head.weight": different})
    with caplog.at_level(logging.WARNING, logger="ernie_lab"):
        model = load_model(directory)
    assert any("lm_head.weight differs" in r.getMessage() for r in caplog.records)
    assert not model.config.tie_word_embeddings and torch.equal(model.lm_head.weight, different)
    reference = Ernie4_5_MoeForCausalLM.from_pretrained(directory).eval()  # transformers unties too
    assert (logits(model) - logits(reference)).abs().max() <= 1e-4


def test_unreadable_or_incomplete_checkpoints(tmp_path):
    hf = build_hf_model(seed=6)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(tmp_path / "sharded")
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{INDEX_FILE} names shard {shard.name}"):
        load_model(tmp_path / "sharded")

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(ErnieConfig.preset("tiny").to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_model(tmp_path / "nowhere" / "model")


# --------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("ids", "mask", "error", "match"),
    [
        (torch.tensor([[1, 128]]), None, ValueError, "token id 128 is outside the vocabulary"),
        (torch.tensor([[-1, 2]]), None, ValueError, "token id -1"),
        (torch.tensor([[1.0, 2.0]]), None, TypeError, "integer token ids.*float"),
        (torch.tensor([[True, False]]), None, TypeError, "integer token ids.*bool"),
        (torch.ones(1, 2, 3, dtype=torch.long), None, ValueError, r"\[batch pos\].*\(1, 2, 3\)"),
        (torch.ones(1, 0, dtype=torch.long), None, ValueError, r"pos >= 1"),
        ([[1, 2]], None, TypeError, "torch.Tensor"),
        (torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3), ValueError, r"attention_mask shape \(2, 3\)"),
        (torch.ones(2, 4, dtype=torch.long), torch.full((2, 4), 2), ValueError, "only 0.*and 1.*found 2"),
        (torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), ValueError, r"rows \[1\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(ids, mask, error, match):
    model = ErnieMoE(ErnieConfig.preset("tiny").replace(vocab_size=128))
    with pytest.raises(error, match=match):
        model(ids, attention_mask=mask)
