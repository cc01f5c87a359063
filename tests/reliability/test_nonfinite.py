"""One finite-value policy: NaN or inf at a router or expert point (a hook injecting NaN, inf in expert
weights) raises ``NonFiniteError`` naming the layer and hook point in routing collection, routing
records, saliency, super experts, pruning and steering sets; ``check_finite=False`` opts out. Never a
confident statistic computed on them."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import ernie_lab as el
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 512, (n,), generator=g) for n in (9, 7, 11)]


def _nan_at(layer: int):
    def inject(x, hook):
        return x.index_fill(1, torch.tensor([1]), float("nan"))  # one position of every row

    return [(f"blocks.{layer}.hook_resid_mid", inject)]


@pytest.fixture(scope="module")
def inf_model():
    """The tiny model with one expert's down projection at inf, in the second MoE layer."""
    broken = tiny_model()
    layer = broken.config.moe_layers[1]
    with torch.no_grad():
        broken.blocks[layer].mlp.experts.down_proj[:].fill_(float("inf"))
    return broken, layer


def test_routing_collection_names_layer_and_point(model, data):
    layer = model.config.moe_layers[-1]
    with pytest.raises(el.NonFiniteError, match=rf"blocks\.{layer}\.moe\.hook_router_probs \(layer {layer}\)"):
        el.routing.collect_routing(model, data, fwd_hooks=_nan_at(layer), progress=False)
    r = el.routing.collect_routing(model, data, fwd_hooks=_nan_at(layer), progress=False, check_finite=False)
    assert bool(r.probs.isnan().any())  # opted out: recorded as they are


def test_inf_expert_weights_are_caught(inf_model, data):
    broken, layer = inf_model
    with pytest.raises(el.NonFiniteError, match=rf"blocks\.{layer}\.moe\.hook_routed_out"):
        el.routing.collect_routing(broken, data, progress=False)
    with pytest.raises(el.NonFiniteError, match=rf"blocks\.{layer}\.moe\.hook_expert_out \(layer {layer}\)"):
        el.experts.saliency(broken, data, progress=False)
    with pytest.raises(el.NonFiniteError, match=f"layer {layer}"):  # not a crash inside pandas
        el.experts.super_experts(broken, data, progress=False)


def test_routing_records_and_path_statistics(model, data):
    r = el.routing.collect_routing(model, data, progress=False)
    probs = r.probs.clone()
    probs[1, 3] = float("nan")
    with pytest.raises(el.NonFiniteError, match=rf"blocks\.{r.layers[1]}\.moe\.hook_router_probs"):
        el.routing.Routing(r.layers, probs, r.idx)
    unchecked = el.routing.Routing(r.layers, probs, r.idx, check_finite=False)
    assert len(el.routing.paths(unchecked, top=1)) == 1  # the caller asked for it
    assert len(el.routing.persistence(r)) > 0  # finite records are untouched


def test_saliency_with_a_nan_hook(model, data):
    layer = model.config.moe_layers[0]
    with pytest.raises(el.NonFiniteError, match=f"layer {layer}"):
        el.experts.expert_sums(model, data, progress=False, fwd_hooks=_nan_at(layer))
    sums = el.experts.expert_sums(model, data, progress=False, fwd_hooks=_nan_at(layer), check_finite=False)
    assert not bool(torch.isfinite(sums.gate_norm).all())


def test_sets_are_never_ranked_on_nonfinite_scores():
    frame = pd.DataFrame(
        {"layer": [1, 1, 1], "expert": [0, 1, 2], "reap": [float("nan"), 1.0, float("inf")], "rd": [0.1, -0.2, 0.0]}
    )
    with pytest.raises(el.NonFiniteError, match="column 'reap' \\(layer 1, expert 0\\)"):
        el.experts.pruning_sets(frame, n=1)
    assert el.experts.pruning_sets(frame, n=1, check_finite=False)[1] == [1]
    frame.loc[2, "rd"] = float("-inf")
    with pytest.raises(el.NonFiniteError, match="'rd'"):
        el.experts.steering_sets(frame)
