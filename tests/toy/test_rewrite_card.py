"""rewrite_card replaces a checkpoint's card files only once the new card is complete."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ernie_lab.toy import build

TOY = Path(build.__file__).resolve().parents[2] / "data" / "toy"


@pytest.fixture
def ckpt(tmp_path):
    out = tmp_path / "toy"
    shutil.copytree(TOY, out)
    return out


def test_a_failed_evaluation_leaves_the_old_card_whole(ckpt, monkeypatch):
    before = {name: (ckpt / name).read_bytes() for name in ("README.md", "metrics.json", "domain_load.png")}

    def half_written(out, *args):
        (out / "README.md").write_text("half a card")
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(build, "_write_card", half_written)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        build.rewrite_card(ckpt)
    assert {name: (ckpt / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["toy"]  # no staging folder left behind


def test_a_complete_card_replaces_the_files(ckpt, monkeypatch):
    seen = {}

    def card(out, model, tokenizer, settings, facts):
        seen.update(settings=settings, facts=facts, elsewhere=out != ckpt)
        (out / "README.md").write_text("new card")
        (out / "metrics.json").write_text("{}")

    monkeypatch.setattr(build, "_write_card", card)
    build.rewrite_card(ckpt)
    assert (ckpt / "README.md").read_text() == "new card" and (ckpt / "metrics.json").read_text() == "{}"
    assert seen["elsewhere"] and seen["facts"]["n_docs"] > 0 and seen["settings"].steps > 0
    assert (ckpt / "model.safetensors").exists()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["toy"]
