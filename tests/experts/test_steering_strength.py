"""Steering you can dose: strength 0 changes nothing, a large strength forces, the selection rate grows with
the strength, and filling all k slots warns."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import ernie_lab as el


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return el.ErnieMoE(el.ErnieConfig.preset("tiny").replace(initializer_range=0.2)).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 512, (10,), generator=g) for _ in range(6)]


def rarest(model, data, layer=1):
    load = el.routing.expert_load(el.routing.collect_routing(model, data, progress=False))
    sub = load[load["layer"] == layer]
    return int(sub.sort_values(["load", "expert"])["expert"].iloc[0])


def selections(model, ids, hooks, layer=1):
    name = f"blocks.{layer}.moe.hook_topk_idx"
    _, cache = model.run_with_cache(ids, names_filter=name, fwd_hooks=hooks)
    return cache[name]


def test_strength_zero_changes_nothing_and_a_large_one_forces(model, data):
    ids = torch.stack(data)
    e = rarest(model, data)
    plain = model(ids)
    zero = el.interventions.steer_experts(model, {1: [e]}, strength=0)
    torch.testing.assert_close(model.run_with_hooks(ids, fwd_hooks=zero), plain)
    forced = selections(model, ids, el.interventions.steer_experts(model, {1: [e]}))
    strong = selections(model, ids, el.interventions.steer_experts(model, {1: [e]}, strength=100.0))
    assert (forced == e).any(-1).all() and (strong == e).any(-1).all()
    assert torch.equal(forced.sort(-1).values, strong.sort(-1).values)
    off = selections(model, ids, el.interventions.steer_experts(model, off={1: [e]}, strength=100.0))
    assert not (off == e).any()


def test_selection_rate_grows_with_strength(model, data):
    e = rarest(model, data)
    busiest = el.routing.expert_load(el.routing.collect_routing(model, data, progress=False)).query("layer == 1")
    busy = int(busiest.sort_values("load")["expert"].iloc[-1])
    dose = el.experts.steering_dose(model, data, {1: [e]}, off={1: [busy]}, controls=2, n_boot=200, progress=False)
    steered = dose[~dose["control"]]
    assert steered["strength"].tolist() == list(el.experts.DEFAULT_STRENGTHS)
    assert np.all(np.diff(steered["on_rate"]) >= 0) and np.all(np.diff(steered["off_rate"]) <= 0)
    assert steered["on_rate"].iloc[-1] == 1.0 and steered["off_rate"].iloc[-1] == 0.0
    assert steered["on_rate"].iloc[0] < 1.0 and steered["delta_loss"].iloc[0] == 0.0  # strength 0: the plain model
    delta = steered["delta_loss"]
    assert ((steered["ci_low"] <= delta + 1e-12) & (delta <= steered["ci_high"] + 1e-12)).all()
    control = dose[dose["control"]]
    assert len(control) == len(steered) and control["experts"].str.startswith("random").all()
    assert str(e) not in control["experts"].iloc[0].removeprefix("random: L1: [").split("]")[0].split(", ")


def test_filling_every_slot_warns(model):
    k = model.config.moe_k
    with pytest.warns(UserWarning, match="fills all k"):
        el.interventions.steer_experts(model, on={1: list(range(k))}, off={1: [k]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        el.interventions.steer_experts(model, on={1: list(range(k - 1))})
        el.interventions.steer_experts(model, on={1: list(range(k))}, strength=0)


@pytest.mark.parametrize("strength", [-1.0, float("nan"), "strong"])
def test_bad_strength(model, strength):
    with pytest.raises(ValueError, match="strength"):
        el.interventions.steer_experts(model, on={1: [0]}, strength=strength)
    assert math.isinf(el.experts.DEFAULT_STRENGTHS[-1])


def test_steering_out_only_draws_random_off_experts_as_control(model, data):
    off = {1: [0, 1]}
    dose = el.experts.steering_dose(model, data, {}, off=off, strengths=[0.0, math.inf], controls=3, progress=False)
    steered, control = dose[~dose["control"]], dose[dose["control"]]
    assert steered["off_rate"].iloc[-1] == 0.0 and steered["experts"].iloc[0] == "off L1: [0, 1]"
    assert len(control) == 2 and control["off_rate"].iloc[-1] == 0.0  # the random experts are forced out too
    drawn = [s.removeprefix("L1: [").rstrip("]").split(", ") for s in control["experts"].iloc[0][8:].split(" | ")]
    assert all(len(d) == 2 and not {"0", "1"} & set(d) for d in drawn)
