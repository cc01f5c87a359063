"""Noise floors of the ablation analyses: intervals over sequences, random-expert controls, held-out splits."""

from __future__ import annotations

import ast

import pytest
import torch

from ernie_lab import ErnieConfig, ErnieMoE, noise
from ernie_lab import ablation as A


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ErnieMoE(ErnieConfig.preset("tiny").replace(initializer_range=0.2)).eval()


@pytest.fixture(scope="module")
def sequences():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 512, (int(n),), generator=g) for n in torch.randint(4, 12, (10,), generator=g)]


def count_passes(model):
    """A hook list that counts forward passes (hook_embed fires once per pass) and the counter."""
    calls = []
    return [("hook_embed", lambda x, hook: calls.append(1))], calls


def test_effect_interval_contains_the_estimate_and_controls_are_marked(model, sequences):
    experts = {2: [0, 3]}
    groups = ["a", "b"] * 5
    df = A.ablation_effect(model, sequences, experts, groups=groups, controls=4, seed=5, progress=False)
    assert set(df["control"]) == {False, True}
    assert (df.groupby("control")["group"].apply(list) == [["all", "a", "b"]] * 2).all()
    assert ((df["ci_low"] <= df["delta_loss"]) & (df["delta_loss"] <= df["ci_high"])).all()
    assert (df["ci_high"] > df["ci_low"]).all()
    assert df.set_index("group").loc["all", "n_seq"].tolist() == [len(sequences)] * 2
    control = df[df["control"]]["experts"].iloc[0]
    drawn = [ast.literal_eval(part.split(": ", 1)[1]) for part in control.removeprefix("random: ").split(" | ")]
    assert len(drawn) == 4 and all(len(d) == 2 and not set(d) & {0, 3} for d in drawn)
    again = A.ablation_effect(model, sequences, experts, groups=groups, controls=4, seed=5, progress=False)
    assert again.equals(df)
    other = A.ablation_effect(model, sequences, experts, groups=groups, controls=4, seed=6, progress=False)
    assert not other["experts"].equals(df["experts"])
    wide = A.ablation_effect(model, sequences, experts, controls=0, level=0.99, progress=False).iloc[0]
    narrow = A.ablation_effect(model, sequences, experts, controls=0, level=0.5, progress=False).iloc[0]
    assert wide["ci_high"] - wide["ci_low"] > narrow["ci_high"] - narrow["ci_low"]


def test_bootstrap_reuses_stored_values(model, sequences):
    """The number of forward passes does not depend on the number of resamples."""
    passes = []
    for n_boot in (5, 3000):
        hooks, calls = count_passes(model)
        with model.hooks(hooks):
            A.ablation_effect(model, sequences, {1: [2]}, controls=2, n_boot=n_boot, batch_size=4, progress=False)
        passes.append(len(calls))
    assert passes[0] == passes[1] > 0


def test_importance_ranks_on_one_half_and_measures_on_the_other(model, sequences):
    halves = noise.split_sequences(len(sequences))
    df = A.expert_importance(model, sequences, layers=[2], controls=3, progress=False)
    ranked = df[~df["control"]].set_index("expert")
    assert ranked["n_seq"].iloc[0] == len(halves.evaluate)
    discover, evaluate = ([sequences[i] for i in part] for part in (halves.discover, halves.evaluate))
    for e in (0, 5):
        on_discover = A.ablation_effect(model, discover, {2: [e]}, controls=0, progress=False)
        on_evaluate = A.ablation_effect(model, evaluate, {2: [e]}, controls=0, progress=False)
        assert ranked.loc[e, "delta_loss_discover"] == pytest.approx(on_discover["delta_loss"].item(), abs=1e-7)
        assert ranked.loc[e, "delta_loss"] == pytest.approx(on_evaluate["delta_loss"].item(), abs=1e-7)
    # rank follows the discover half
    assert ranked.sort_values("rank")["delta_loss_discover"].is_monotonic_decreasing
    assert ((ranked["ci_low"] <= ranked["delta_loss"]) & (ranked["delta_loss"] <= ranked["ci_high"])).all()
    control = df[df["control"]]
    assert len(control) == 1 and control["expert"].item() == -1
    top = int(ranked.index[ranked["rank"] == 1][0])
    drawn = [int(x.strip("[]")) for x in control["experts"].item().removeprefix("random: ").split(" | ")]
    assert len(drawn) == 3 and top not in drawn
    assert control["delta_loss"].item() == pytest.approx(ranked.loc[drawn, "delta_loss"].mean(), abs=1e-9)


def test_pruning_curve_is_held_out_by_default(model, sequences):
    halves = noise.split_sequences(len(sequences))
    curve = A.pruning_curve(model, sequences, 2, steps=[0, 2, 8], controls=2, progress=False)
    assert curve["held_out"].all()
    main, control = curve[~curve["control"]], curve[curve["control"]]
    assert control["order_by"].unique().tolist() == ["random"] and len(control) == 3
    evaluate = [sequences[i] for i in halves.evaluate]
    base = A.ablation_effect(model, evaluate, {}, controls=0, progress=False)["nll_base"].item()
    assert main["loss"].iloc[0] == pytest.approx(base, abs=1e-7)  # measured on the evaluate half only
    # the order comes from the discover half
    importance = A.expert_importance(model, [sequences[i] for i in halves.discover], [2], split=None, progress=False)
    order = importance[~importance["control"]].sort_values("rank", ascending=False)["expert"].tolist()
    assert ast.literal_eval(main["ablated"].iloc[1]) == order[:2]
    assert main["n_seq"].iloc[0] == len(halves.evaluate)
    # everything ablated: ordered and random curves meet
    assert main["loss"].iloc[-1] == pytest.approx(control["loss"].iloc[-1], abs=1e-9)
    assert main["loss"].iloc[1] != pytest.approx(control["loss"].iloc[1], abs=1e-9)
    in_sample = A.pruning_curve(model, sequences, 2, steps=[0, 1], split=None, controls=0, progress=False)
    assert not in_sample["held_out"].any()
    fig = A.plot_pruning_curve(curve)
    assert "held-out" in fig.axes[0].get_title()


def test_bad_noise_arguments(model, sequences):
    for kwargs in ({"level": 1.5}, {"n_boot": 0}, {"controls": -1}):
        with pytest.raises(ValueError, match="level|n_boot|controls"):
            A.ablation_effect(model, sequences, {1: [0]}, progress=False, **kwargs)
    with pytest.raises(ValueError, match="split"):
        A.expert_importance(model, sequences, [1], split="thirds", progress=False)
    with pytest.raises(ValueError, match="control"):
        A.ablation_effect(model, sequences, {1: list(range(5))}, controls=1, progress=False)
