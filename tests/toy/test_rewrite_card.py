"""rewrite_card replaces a checkpoint's card files only once the new card is complete."""

from __future__ import annotations

import dataclasses
import json
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


@pytest.mark.parametrize(
    ("anneal", "anneal_lr", "freeze", "window"),
    [(0, None, False, None), (600, None, False, None), (600, 5e-4, False, None), (600, 5e-4, True, 256)],
)
def test_the_cards_reproduce_line_parses_back_to_the_settings(anneal, anneal_lr, freeze, window):
    from ernie_lab.cli import build_parser
    from ernie_lab.commands.train_toy import settings_from_args
    from ernie_lab.toy.train import TrainSettings

    settings = TrainSettings(
        steps=2500, anneal_steps=anneal, anneal_lr=anneal_lr, shared_dropout=0.6, seed=3, freeze_router=freeze
    )
    if window:
        settings = dataclasses.replace(settings, anneal_seq_len=window, anneal_batch_size=8)
    flags = f"{build._steps_flags(settings)} --shared-dropout {settings.shared_dropout} --seed {settings.seed}"
    args = build_parser().parse_args(["train-toy", "--out", "x", *flags.split()])
    assert settings_from_args(args) == settings
    words = build._schedule(settings)
    assert words.startswith(f"{2500 + anneal} steps")
    if anneal:
        shape = f" of 8 x {window} tokens" if window else ""
        assert words.endswith(f"then {anneal} steps{shape} falling linearly from {anneal_lr or 3e-4:g} to 0")
    else:
        assert "falling" not in words


def reproduce_command(card: str) -> list[str]:
    """The argv of a card's Reproduce command (``train-toy ...``), DIR and CKPT left as written."""
    import re

    return re.search(r"Reproduce: `ernie-lab (train-toy[^`]*)`", card).group(1).split()


def test_the_shipped_cards_reproduce_command_asks_for_its_recorded_settings():
    from ernie_lab.cli import build_parser
    from ernie_lab.commands.train_toy import settings_from_args
    from ernie_lab.toy.train import TrainSettings

    args = build_parser().parse_args(reproduce_command((TOY / "README.md").read_text()))
    metrics = json.loads((TOY / "metrics.json").read_text())
    recorded = TrainSettings(**metrics["settings"])
    if args.init_from is None:
        assert settings_from_args(args) == recorded and recorded.start_step == 0
    else:  # a continued run: the checkpoint it continued is named by its weights' digest
        assert args.init_from == "CKPT" and args.anneal_steps == recorded.anneal_steps
        assert args.anneal_lr == recorded.anneal_lr and args.freeze_router == recorded.freeze_router
        assert (args.anneal_batch_size, args.anneal_seq_len) == (recorded.anneal_batch_size, recorded.anneal_seq_len)
        assert recorded.start_step == metrics["init_from"]["steps"] and len(metrics["init_from"]["sha256"]) == 64
        assert f"sha256 {metrics['init_from']['sha256']}" in (TOY / "README.md").read_text()


def test_a_continued_runs_card_names_the_checkpoint_and_the_command():
    from ernie_lab.cli import build_parser
    from ernie_lab.toy.train import TrainSettings

    settings = TrainSettings(steps=3000, anneal_steps=800, start_step=3000)
    facts = {"n_docs": 10, "n_tokens": 1000, "seconds": 300.0, "init_from": {"sha256": "ab" * 32, "steps": 3000}}
    lines = build._training_lines(settings, facts, "x86_64, 1 thread", 1)
    assert f"sha256 {'ab' * 32}" in lines and "steps 3000-3799 continue a checkpoint of 3000 steps" in lines
    args = build_parser().parse_args(reproduce_command(lines))
    assert (args.init_from, args.anneal_steps, args.threads) == ("CKPT", 800, 1)


def test_a_frozen_router_run_says_so_and_its_command_asks_for_it(tmp_path):
    from ernie_lab.cli import build_parser
    from ernie_lab.commands.train_toy import settings_from_args
    from ernie_lab.toy.train import TrainSettings

    settings = TrainSettings(steps=3000, anneal_steps=800, start_step=3000, freeze_router=True)
    facts = {"n_docs": 10, "n_tokens": 1000, "seconds": 300.0, "init_from": {"sha256": "ab" * 32, "steps": 3000}}
    lines = build._training_lines(settings, facts, "x86_64, 1 thread", 1)
    assert "routers (gate weights, correction bias) frozen in steps 3000-3799" in lines
    assert build_parser().parse_args(reproduce_command(lines)).freeze_router
    scratch = dataclasses.replace(settings, start_step=0, anneal_steps=0)
    lines = build._training_lines(scratch, {k: v for k, v in facts.items() if k != "init_from"}, "x86_64", 1)
    assert "frozen in all steps" in lines
    assert settings_from_args(build_parser().parse_args(reproduce_command(lines))) == scratch
    plain = build._training_lines(TrainSettings(), {k: v for k, v in facts.items() if k != "init_from"}, "x86", 1)
    assert "frozen" not in plain and "--freeze-router" not in plain
    scratch_ckpt = tmp_path / "scratch"  # a checkpoint of a run without a cool-down (only metrics.json is read)
    scratch_ckpt.mkdir()
    (scratch_ckpt / "model.safetensors").write_bytes(b"")
    metrics = {"settings": dataclasses.asdict(TrainSettings(steps=3000)), "n_docs": 10, "seconds": 1.0}
    (scratch_ckpt / "metrics.json").write_text(json.dumps(metrics))
    continued = build.continued_run(scratch_ckpt, 5000, 1e-3, freeze_router=True, anneal_seq_len=256)["settings"]
    assert continued.freeze_router and continued.anneal_lr == 1e-3 and continued.anneal_steps == 5000
    assert continued.window_shape(continued.steps) == (continued.batch_size, 256)
    with pytest.raises(TypeError, match=r"\['seq_len'\] are not settings of the continued steps"):
        build.continued_run(scratch_ckpt, 5000, seq_len=256)
    # a checkpoint that already annealed keeps its cool-down's windows, whichever they were
    for held, asked in (((None, None), 256), ((8, 256), 128)):
        annealed = TrainSettings(steps=3000, anneal_steps=1500, anneal_batch_size=held[0], anneal_seq_len=held[1])
        (scratch_ckpt / "metrics.json").write_text(json.dumps({**metrics, "settings": dataclasses.asdict(annealed)}))
        kept = build.continued_run(scratch_ckpt, 5000)["settings"]
        assert kept.window_shape(5000) == annealed.window_shape(3000)
        match = f"annealed with anneal_seq_len={held[1]}; a continued cool-down keeps its window"
        with pytest.raises(ValueError, match=match):
            build.continued_run(scratch_ckpt, 5000, anneal_seq_len=asked)
    (scratch_ckpt / "metrics.json").write_text(json.dumps(metrics))
    assert not build.continued_run(scratch_ckpt, 5000)["settings"].freeze_router
