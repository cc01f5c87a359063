"""Nothing lost: save_model, reports and the toy build replace only their own earlier output."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest
from conftest import tiny_model

from ernie_lab.io.atomic import MARKER, read_marker
from ernie_lab.io.weights import load_model, save_model


def hidden(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def model():
    return tiny_model()


def test_save_model_refuses_a_folder_it_did_not_write(model, tmp_path):
    """A folder with a config.json is not proof: only ernie_lab's marker is."""
    out = tmp_path / "someone_elses"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"their weights")
    with pytest.raises(FileExistsError, match="not written by ernie_lab"):
        save_model(model, out)
    assert (out / "model.safetensors").read_bytes() == b"their weights"


def test_save_model_overwrite_replaces_only_the_checkpoint_files(model, tmp_path):
    out = tmp_path / "hub_copy"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    (out / "adapter_model.safetensors").write_bytes(b"adapter")
    (out / "tokenizer.json").write_text("{}")
    save_model(model, out, overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() == b"adapter"
    assert (out / "tokenizer.json").read_text() == "{}"
    assert load_model(out).config == model.config
    assert read_marker(out)["files"] == ["config.json", "generation_config.json", "model.safetensors"]


def test_save_model_into_its_own_checkpoint_removes_only_what_it_wrote(model, tmp_path):
    out = tmp_path / "ckpt"
    save_model(model, out, max_shard_size="40KB")
    shards = read_marker(out)["files"]
    assert len(shards) > 3 and read_marker(out)["kind"] == "checkpoint"
    (out / "adapter_model.safetensors").write_bytes(b"adapter")  # not ours: never removed
    save_model(model, out)
    assert sorted(os.listdir(out)) == [
        MARKER,
        "adapter_model.safetensors",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert hidden(tmp_path) == []


def test_save_model_follows_a_symlinked_destination(model, tmp_path):
    target = tmp_path / "disk" / "ckpt"
    save_model(model, target)
    link = tmp_path / "latest"
    link.symlink_to(target)
    save_model(model, link, dtype="bfloat16")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"


def test_files_that_appear_during_a_save_are_kept(model, tmp_path, monkeypatch):
    """The destination is checked again at the swap: a file written meanwhile survives."""
    from ernie_lab.io import weights

    out = tmp_path / "ckpt"
    save_model(model, out)
    real = weights.write_checkpoint

    def slow_write(*args, **kwargs):
        (out / "written_meanwhile.txt").write_text("keep")
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "write_checkpoint", slow_write)
    save_model(model, out)
    assert (out / "written_meanwhile.txt").read_text() == "keep"
    fresh = tmp_path / "fresh"

    def someone_else(*args, **kwargs):  # the folder appears, foreign, while we write
        fresh.mkdir()
        (fresh / "theirs.txt").write_text("theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "write_checkpoint", someone_else)
    with pytest.raises(FileExistsError, match="not written by ernie_lab"):
        save_model(model, fresh)
    assert os.listdir(fresh) == ["theirs.txt"] and hidden(tmp_path) == []


def test_report_refuses_a_folder_with_a_manifest_it_did_not_write(tmp_path, monkeypatch):
    from ernie_lab.report import runner

    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("checked after loading the model"))
    out = tmp_path / "results"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # any file of that name used to be enough
    (out / "thesis.tex").write_text("precious")
    spec = {"datasets": {"d": {"texts": ["a b"]}}, "analyses": {"balance": {"dataset": "d"}}}
    with pytest.raises(FileExistsError, match="not written by ernie_lab"):
        runner.run_report(spec, out, progress=False)
    assert (out / "thesis.tex").read_text() == "precious"


def test_train_toy_refuses_a_foreign_folder_before_training(tmp_path, monkeypatch):
    from ernie_lab.toy import build

    monkeypatch.setattr(build, "training_corpus", lambda **k: pytest.fail("checked after starting"))
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by ernie_lab"):
        build.build_toy(tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="ernie_lab checkpoint, not a toy"):
        save_model(tiny_model(), tmp_path / "ckpt")
        build.build_toy(tmp_path / "ckpt", progress=False)


def test_leftovers_of_a_killed_run_are_cleaned_with_a_message(model, tmp_path, caplog):
    dead = 2**22 + 1  # above the default pid_max: no such process
    leftover = tmp_path / f".ckpt.tmp-{socket.gethostname()}-{dead}-0123abcd"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="ernie_lab.io.atomic"):
        save_model(model, tmp_path / "ckpt")
    assert not leftover.exists() and "interrupted run" in caplog.text
    assert hidden(tmp_path) == []


def test_a_foreign_file_the_new_output_would_replace_is_kept_aside(model, tmp_path, caplog):
    out = tmp_path / "ckpt"
    save_model(model, out)
    (out / "model.safetensors.index.json").write_text("my own index")  # not listed in the marker
    with caplog.at_level(logging.WARNING, logger="ernie_lab.io.atomic"):
        save_model(model, out, max_shard_size="40KB")  # writes an index of its own
    (backup,) = [p for p in tmp_path.iterdir() if ".old-" in p.name]
    assert (backup / "model.safetensors.index.json").read_text() == "my own index"
    assert str(backup) in caplog.text and load_model(out).config == model.config
