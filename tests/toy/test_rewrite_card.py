"""rewrite_card replaces a checkpoint's card files only once the new card is complete."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
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


def _table(delta: float, passes: bool) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "layer": 1,
                "domain": "chinese",
                "passes": passes,
                "delta": delta,
                "ci_low": delta - 0.01,
                "ci_high": delta + 0.01,
                "other": 0.0,
                "other_domain": "code",
            }
        ]
    )


@pytest.mark.parametrize("rise, named", [(0.001, True), (-0.02, True), (0.3, False)])
def test_the_card_says_when_the_shared_expert_carries_nothing(rise, named):
    shared = pd.DataFrame({"domain": ["chinese", "code"], "delta": [rise, 0.0]})
    text = build._failing(_table(0.5, True), pd.Series({1: 0.6}), shared, 0.5)
    assert ("no model for studying what shared experts do" in text) == named
    assert ("probability 0.5" in text) == named
    without_dropout = build._failing(_table(0.5, True), pd.Series({1: 0.6}), shared, 0.0)
    assert "probability" not in without_dropout


def test_the_card_line_for_a_model_without_shared_experts():
    empty = pd.DataFrame(columns=["domain", "delta"])
    assert "shared" not in build._failing(_table(0.5, True), pd.Series({1: 0.6}), empty, 0.5)
    assert build._shared_line(empty) == "The model has no shared experts."
