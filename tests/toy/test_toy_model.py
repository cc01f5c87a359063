"""The embedded toy checkpoint: loads everywhere, learned its corpus, experts specialise by domain.

Floors are set well below what the shipped checkpoint reaches (its model card, data/toy/README.md,
lists the measured values) so that they catch a broken checkpoint or loader, not noise.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ernie_lab as el
import ernie_lab.toy.train as train_module
from ernie_lab.io.sources import toy_dir
from ernie_lab.toy.evaluate import heldout_nll, routing_report, shared_expert_effect, task_accuracy
from ernie_lab.toy.prompts import load_prompt_set
from ernie_lab.toy.train import MOMENT_WARMUP, TrainSettings, lr_at, toy_config, train, window_starts

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toy():
    return el.load_model("toy"), el.load_tokenizer("toy")


@pytest.fixture(scope="module")
def domains():
    rows = load_prompt_set("domains")
    per_domain: dict[str, list] = {}
    for r in rows:
        per_domain.setdefault(r["domain"], []).append(r)
    return [r for group in per_domain.values() for r in group[:16]]


def test_toy_shape_is_ernie(toy):
    model, tok = toy
    cfg = model.config
    assert not cfg.is_moe_layer(0) and all(cfg.is_moe_layer(i) for i in range(1, cfg.num_hidden_layers))
    assert cfg.moe_num_experts >= 8 and cfg.moe_k > 1 and cfg.moe_num_shared_experts >= 1
    assert cfg.vocab_size == tok.vocab_size
    assert (REPO / "data" / "toy" / "model.safetensors").stat().st_size <= 24 * 2**20


def test_toy_matches_transformers(toy):
    from transformers import Ernie4_5_MoeForCausalLM

    model, tok = toy
    hf = Ernie4_5_MoeForCausalLM.from_pretrained(toy_dir()).eval()
    ids = torch.tensor([tok.encode("The capital of Veloria is Mirren. 37+45=82 北京很大。")])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_heldout_nll_far_below_shuffled(toy, domains):
    model, tok = toy
    nll = heldout_nll(model, tok, domains)
    shuffled = heldout_nll(model, tok, domains, shuffle_seed=0)
    assert set(nll["domain"]) == {"english", "chinese", "arithmetic", "code", "records", "chat"}
    # every domain: the model predicts real text far better than the same tokens shuffled
    gap = shuffled.set_index("domain")["nll"] - nll.set_index("domain")["nll"]
    assert (gap > 1.0).all(), gap
    # nats per character: the same summed NLL over the domain's characters
    chars = {d: sum(len(r["text"]) for r in domains if r["domain"] == d) for d in nll["domain"]}
    total = nll["nll"] * nll["n_tokens"]
    per_char = [t / chars[d] for t, d in zip(total, nll["domain"])]
    assert nll["nats_per_char"].tolist() == pytest.approx(per_char, rel=1e-9)


def test_task_accuracy_floors(toy):
    model, tok = toy
    # measured on the shipped checkpoint: recall 0.80, ioi 0.98, arithmetic 0.98, chat 0.55
    # (arithmetic_2digit, 0.07, has no floor: the toy model recalls sums, it did not learn to add)
    floors = {"recall": 0.6, "ioi": 0.7, "arithmetic": 0.7, "chat": 0.4}
    rows = [r for r in load_prompt_set("tasks") if r["task"] in floors]
    acc = task_accuracy(model, tok, rows).set_index("task")["accuracy"]
    for task, floor in floors.items():
        assert acc[task] >= floor, f"{task} accuracy {acc[task]:.2f} < floor {floor}"


def test_domains_route_differently(toy, domains):
    model, tok = toy
    rep = routing_report(model, tok, domains)
    # total-variation distance between per-domain expert-load distributions, averaged over pairs
    assert rep["tv"]["tv"].mean() > 0.2
    # the correction bias balances the experts: a lower coefficient of variation of the expert loads in every
    # MoE layer (MaxVio, one expert's excess, is not asserted: on these equal-domain prompts, whose mix is
    # not the training mix, the shipped toy's layer 1 has one expert at 2.5x its share with the bias; README)
    cv = rep["balance"].pivot(index="layer", columns="bias", values="cv")
    assert (cv["with"] < cv["without"]).all(), cv


def test_train_smoke_lowers_loss_and_balances():
    torch.manual_seed(0)
    cfg = toy_config(256, hidden_size=32, intermediate_size=64, num_hidden_layers=3, moe_intermediate_size=16)
    model = el.ErnieMoE(cfg)
    stream = torch.arange(4000) % 97 % 50  # a learnable periodic sequence
    log = train(
        model, stream, TrainSettings(steps=20, batch_size=4, seq_len=32, warmup=2, bias_gamma=0.01), progress=False
    )
    assert sum(log.loss[-5:]) / 5 < log.loss[0] - 0.5
    bias = model.blocks[1].mlp.moe_statics.e_score_correction_bias
    assert bias.abs().sum() > 0  # the bias moved
    # under-loaded experts gained bias relative to over-loaded ones (direction of sign(mean - load))
    with torch.no_grad():
        _, cache = model.run_with_cache(stream[:256].reshape(4, 64), names_filter="blocks.1.moe.hook_topk_idx")
        zero = bias.clone()
        bias.zero_()
        _, cache0 = model.run_with_cache(stream[:256].reshape(4, 64), names_filter="blocks.1.moe.hook_topk_idx")
        bias.copy_(zero)
    load = torch.bincount(cache["blocks.1.moe.hook_topk_idx"].flatten(), minlength=cfg.moe_num_experts).float()
    load0 = torch.bincount(cache0["blocks.1.moe.hook_topk_idx"].flatten(), minlength=cfg.moe_num_experts).float()
    assert load.max() <= load0.max()


def test_train_is_deterministic():
    cfg = toy_config(128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, moe_intermediate_size=16)
    stream = torch.arange(3000) % 61
    logs = []
    for _ in range(2):
        torch.manual_seed(0)
        logs.append(train(el.ErnieMoE(cfg), stream, TrainSettings(steps=4, batch_size=2, seq_len=16), progress=False))
    assert logs[0].loss == logs[1].loss


def test_anneal_steps_continue_the_schedule_to_zero_and_leave_the_first_steps_alone():
    s = TrainSettings(steps=100, warmup=10, lr=1e-3, min_lr_frac=0.1, anneal_steps=40)
    floor = 1e-3 * 0.1
    assert lr_at(99, s) == pytest.approx(floor, rel=0.01)  # the cosine ends at the floor
    tail = [lr_at(step, s) for step in range(100, 140)]
    assert tail[0] == pytest.approx(floor) and tail[-1] == pytest.approx(floor / 40)
    assert all(b - a == pytest.approx(-floor / 40) for a, b in zip(tail, tail[1:]))  # linear, towards 0
    hotter = dataclasses.replace(s, anneal_lr=5e-4)  # the cool-down may start elsewhere than the floor
    assert lr_at(100, hotter) == 5e-4 and lr_at(120, hotter) == pytest.approx(2.5e-4)
    with pytest.raises(ValueError, match="anneal_lr must be > 0"):
        dataclasses.replace(s, anneal_lr=float("nan"))
    plain = dataclasses.replace(s, anneal_steps=0)
    assert [lr_at(step, s) for step in range(100)] == [lr_at(step, plain) for step in range(100)]

    cfg = toy_config(128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, moe_intermediate_size=16)
    stream = torch.arange(3000) % 61
    short = TrainSettings(steps=4, batch_size=2, seq_len=16, warmup=1, shared_dropout=0.5)
    logs = []
    for settings in (short, dataclasses.replace(short, anneal_steps=3)):
        torch.manual_seed(0)
        logs.append(train(el.ErnieMoE(cfg), stream, settings, progress=False))
    assert len(logs[1].loss) == 7 and logs[1].loss[:4] == logs[0].loss  # the same first 4 steps, then 3 more
    assert logs[1].lr[4:] == pytest.approx([short.lr * 0.1 * f for f in (1, 2 / 3, 1 / 3)])
    with pytest.raises(ValueError, match="anneal_steps must be >= 0, got -2"):
        TrainSettings(anneal_steps=-2)


@pytest.fixture
def seen(monkeypatch):
    """The windows train() draws, in order (``sample_windows`` recorded)."""
    drawn = []
    sample = train_module.sample_windows

    def recording(stream, batch, seq_len, gen):
        drawn.append(sample(stream, batch, seq_len, gen))
        return drawn[-1]

    monkeypatch.setattr(train_module, "sample_windows", recording)
    return drawn


def test_start_step_skips_the_held_steps_draws_and_warms_the_moments_at_lr_0(seen):
    cfg = toy_config(128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, moe_intermediate_size=16)
    stream = torch.arange(3000) % 61
    settings = TrainSettings(steps=4, anneal_steps=3, start_step=4, batch_size=2, seq_len=16, warmup=1, seed=5)
    torch.manual_seed(0)
    model = el.ErnieMoE(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = train(model, stream, settings, progress=False)
    assert log.lr == [0.0] * MOMENT_WARMUP + [lr_at(step, settings) for step in (4, 5, 6)]
    assert log.step == list(range(4 - MOMENT_WARMUP, 7))  # the schedule's steps; the lr-0 ones before 4
    # the data the held steps drew are skipped: training goes on with the seeded stream's 5th window
    gen = torch.Generator().manual_seed(5)
    starts = [window_starts(3000, 2, 16, gen) for _ in range(4 + MOMENT_WARMUP + 3)][4:]
    assert [w[:, 0].tolist() for w in seen] == [(s % 61).tolist() for s in starts]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"start_step must be in \[0, steps \+ anneal_steps\) = \[0, 7\), got 7"):
        dataclasses.replace(settings, start_step=7)


def test_the_cool_down_draws_its_own_window_shape_and_a_continued_run_skips_each_steps_draws(seen):
    cfg = toy_config(128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, moe_intermediate_size=16)
    stream = torch.arange(3000) % 61
    full = TrainSettings(steps=4, anneal_steps=3, batch_size=2, seq_len=16, anneal_batch_size=3, anneal_seq_len=24)
    torch.manual_seed(0)
    train(el.ErnieMoE(cfg), stream, full, progress=False)
    assert [tuple(w.shape) for w in seen] == [(2, 17)] * 4 + [(3, 25)] * 3
    seen.clear()
    torch.manual_seed(0)
    train(el.ErnieMoE(cfg), stream, dataclasses.replace(full, start_step=5), progress=False)
    # the 5 held steps' draws are skipped in their own shapes (4 cosine, 1 cool-down); the lr-0 warm-up and the
    # remaining steps draw cool-down windows
    gen = torch.Generator().manual_seed(0)
    held = [window_starts(3000, *full.window_shape(step), gen) for step in range(5)]
    starts = [window_starts(3000, 3, 24, gen) for _ in range(MOMENT_WARMUP + 2)]
    assert len(held) == 5 and [w[:, 0].tolist() for w in seen] == [(s % 61).tolist() for s in starts]
    with pytest.raises(ValueError, match=r"anneal_seq_len must be >= 2 \(or None: as before the cool-down\), got 1"):
        dataclasses.replace(full, anneal_seq_len=1)
    with pytest.raises(ValueError, match="token stream of 20 tokens is shorter than seq_len \\+ 2 = 26"):
        train(el.ErnieMoE(cfg), torch.arange(20), full, progress=False)


def test_freeze_router_keeps_gates_and_bias_and_trains_the_rest():
    cfg = toy_config(128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, moe_intermediate_size=16)
    stream = torch.arange(3000) % 61
    settings = TrainSettings(steps=6, batch_size=2, seq_len=16, warmup=1, bias_gamma=0.01, freeze_router=True)
    torch.manual_seed(0)
    model = el.ErnieMoE(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, stream, settings, progress=False)
    after = model.state_dict()
    router = [k for k in before if k.endswith("mlp.gate.weight") or k.endswith("e_score_correction_bias")]
    assert len(router) == 2 * len(cfg.moe_layers)
    assert all(torch.equal(before[k], after[k]) for k in router)
    assert all(not torch.equal(before[k], after[k]) for k in after if k.endswith("experts.down_proj"))
    assert all(p.requires_grad for p in model.parameters())  # the model is left trainable, as it came
    torch.manual_seed(0)
    moving = el.ErnieMoE(cfg)
    train(moving, stream, dataclasses.replace(settings, freeze_router=False), progress=False)
    assert all(not torch.equal(before[k], moving.state_dict()[k]) for k in router)  # the control: they do move
    with pytest.raises(ValueError, match="aux_loss_coef=0.1 balances through the routers"):
        dataclasses.replace(settings, aux_loss_coef=0.1)


def test_shared_dropout_is_seeded_acts_in_training_only_and_checks_its_range():
    cfg = toy_config(128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, moe_intermediate_size=16)
    stream = torch.arange(3000) % 61
    settings = TrainSettings(steps=4, batch_size=2, seq_len=16, shared_dropout=0.5)
    runs = []
    for s in (settings, settings, dataclasses.replace(settings, shared_dropout=0.0)):
        torch.manual_seed(0)
        model = el.ErnieMoE(cfg)
        runs.append((model, train(model, stream, s, progress=False)))
    assert runs[0][1].loss == runs[1][1].loss  # seeded: the same drops every time
    assert runs[0][1].loss[1:] != runs[2][1].loss[1:]  # and it does drop something
    model = runs[0][0]
    x = (stream[:64] + 1).reshape(2, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no hook left behind: the trained model is deterministic
    with pytest.raises(ValueError, match=r"shared_dropout must be in \[0, 1\), got 1.0"):
        train(el.ErnieMoE(cfg), stream, dataclasses.replace(settings, shared_dropout=1.0), progress=False)


def test_toy_resolves_after_non_editable_install(tmp_path):
    """``pip install .`` (not editable) ships data/ and hooks/ as ernie_lab._data and ernie_lab._hooks,
    so "toy" and the recipes still resolve."""
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(REPO)]
    subprocess.run(pip, check=True, capture_output=True)
    code = (
        "import ernie_lab, ernie_lab.io.sources as s; "
        "m = ernie_lab.load_model('toy'); t = ernie_lab.load_tokenizer('toy'); "
        "r = ernie_lab.interventions.load_recipe('ablate_experts'); "
        "print(ernie_lab.__file__); print(s.toy_dir()); print(r.__file__); print(m.config.vocab_size == t.vocab_size)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    )
    module_file, toy_dir, recipe_file, ok = out.stdout.split()
    assert all(p.startswith(str(target)) for p in (module_file, toy_dir, recipe_file)) and ok == "True"


def test_shared_expert_effect_zeroes_the_shared_experts(toy, domains):
    model, tok = toy
    rows = domains[::4]
    table = shared_expert_effect(model, tok, rows)
    assert sorted(table.domain) == sorted({r["domain"] for r in rows})
    # the same figures as a copy whose shared experts' down projections are zero
    silent = el.load_model("toy")
    for block in silent.blocks:
        if block.is_moe:
            torch.nn.init.zeros_(block.mlp.shared_experts.down_proj.weight)
    expected = heldout_nll(silent, tok, rows).set_index("domain").nll
    got = table.set_index("domain").nll_zeroed.loc[expected.index]
    assert torch.allclose(torch.tensor(got.values), torch.tensor(expected.values), atol=1e-5)
    assert (table.delta == table.nll_zeroed - table.nll).all() and (table.delta.abs() > 0).all()


def test_compare_nll_pairs_the_texts(toy, domains):
    model, tok = toy
    rows = domains[::2]
    # a copy whose layer-3 routed experts all output zero: worse on every domain
    broken = el.load_model("toy")
    layer = model.config.num_hidden_layers - 1
    with torch.no_grad():
        broken.blocks[layer].mlp.experts.down_proj.zero_()
    table = el.toy.compare_nll((model, tok), (broken, tok), rows, n_boot=200, seed=3).set_index("domain")
    intact = heldout_nll(model, tok, rows).set_index("domain").nats_per_char
    zeroed = heldout_nll(broken, tok, rows).set_index("domain").nats_per_char
    assert sorted(table.index) == sorted(intact.index)
    assert torch.allclose(torch.tensor(table.nats_per_char_a.loc[intact.index].values), torch.tensor(intact.values))
    assert torch.allclose(torch.tensor(table.nats_per_char_b.loc[zeroed.index].values), torch.tensor(zeroed.values))
    assert ((table.difference - (table.nats_per_char_a - table.nats_per_char_b)).abs() < 1e-12).all()
    assert ((table.relative - table.difference / table.nats_per_char_b).abs() < 1e-12).all()
    assert (table.ci_low <= table.difference).all() and (table.difference <= table.ci_high).all()
    assert (table.ci_high < 0).all(), table  # intact is better than broken on every domain, beyond noise
    assert table.attrs == {"level": 0.95, "n_boot": 200, "seed": 3}
    # paired: swapping the checkpoints negates the difference and mirrors the interval (same resamples)
    swapped = el.toy.compare_nll((broken, tok), (model, tok), rows, n_boot=200, seed=3).set_index("domain")
    assert ((swapped.difference + table.difference).abs() < 1e-12).all()
    assert ((swapped.ci_low + table.ci_high).abs() < 1e-9).all() and (
        (swapped.ci_high + table.ci_low).abs() < 1e-9
    ).all()
    # a checkpoint against itself: no difference and an interval of width 0
    same = el.toy.compare_nll((model, tok), (model, tok), rows[:12], n_boot=50)
    assert (same.difference == 0).all() and (same.ci_low == 0).all() and (same.ci_high == 0).all()


def test_compare_nll_refuses_bad_input_before_running(toy):
    model, tok = toy
    row = {"domain": "english", "text": "The capital of Veloria is Mirren."}
    with pytest.raises(ValueError, match=r"a must be a \(model, tokenizer\) pair, got ErnieMoE"):
        el.toy.compare_nll(model, (model, tok), [row])
    with pytest.raises(ValueError, match="at least one row"):
        el.toy.compare_nll((model, tok), (model, tok), [])
    with pytest.raises(ValueError, match="lack 'domain' or 'text'"):
        el.toy.compare_nll((model, tok), (model, tok), [row, {"text": "no domain"}])
    with pytest.raises(ValueError, match="level must be"):
        el.toy.compare_nll((model, tok), (model, tok), [row], level=95)
    with pytest.raises(ValueError, match="n_boot"):
        el.toy.compare_nll((model, tok), (model, tok), [row], n_boot=0)


def test_shared_expert_effect_is_empty_without_shared_experts():
    cfg = toy_config(64, moe_num_shared_experts=0)
    torch.manual_seed(0)
    assert shared_expert_effect(el.ErnieMoE(cfg), None, []).empty
