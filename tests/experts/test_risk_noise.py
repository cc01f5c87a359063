"""Risk difference with its noise floor: picked on one half, measured on the other, intervals and controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ernie_lab as el
from ernie_lab import noise


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return el.ErnieMoE(el.ErnieConfig.preset("tiny").replace(initializer_range=0.2)).eval()


@pytest.fixture(scope="module")
def sets():
    g = torch.Generator().manual_seed(4)
    a = [torch.randint(0, 256, (9,), generator=g) for _ in range(8)]  # two "domains": low and high token ids
    b = [torch.randint(256, 512, (9,), generator=g) for _ in range(8)]
    return a, b


def test_rd_is_picked_on_the_discover_half_and_measured_on_the_evaluate_half(model, sets):
    a, b = sets
    df = el.experts.risk_difference(model, a, b, controls=3, seed=2, progress=False)
    experts = df[~df["control"]].reset_index(drop=True)
    halves = noise.split_sequences(len(a))
    pick = lambda data, part: [data[i] for i in part]  # noqa: E731
    found = el.experts.risk_difference(
        model, pick(a, halves.discover), pick(b, halves.discover), split=None, controls=0, progress=False
    )
    measured = el.experts.risk_difference(
        model, pick(a, halves.evaluate), pick(b, halves.evaluate), split=None, controls=0, progress=False
    )
    np.testing.assert_allclose(experts["rd"], found["rd"])
    np.testing.assert_allclose(experts["rd_heldout"], measured["rd"])
    assert (experts["n_seq_a"] == len(halves.evaluate)).all()
    held = experts["rd_heldout"]
    assert ((experts["ci_low"] <= held + 1e-12) & (held <= experts["ci_high"] + 1e-12)).all()
    assert (experts["ci_high"] - experts["ci_low"]).max() > 0
    control = df[df["control"]]
    assert sorted(control["layer"]) == model.config.moe_layers and (control["expert"] == -1).all()
    again = el.experts.risk_difference(model, a, b, controls=3, seed=2, progress=False)
    assert again.equals(df)
    on, _ = el.experts.steering_sets(df, n=1)  # control rows are never picked
    assert all(e >= 0 for es in on.values() for e in es)


def test_plot_shows_held_out_rd_with_intervals(model, sets):
    df = el.experts.risk_difference(model, *sets, progress=False)
    fig = el.experts.plot_risk_difference(df, top=6)
    ax = fig.axes[0]
    assert "held-out" in ax.get_title() and "_" not in ax.get_ylabel()
    assert ax.containers  # bars and error bars
