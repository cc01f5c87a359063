"""Ids, layers, expert ids and counts are integers, never coerced: a float, bool, string or float
tensor where an id goes is a named error (``ArgumentTypeError``), so is a negative count or an id out
of range (``ArgumentRangeError``), at every analysis and intervention that takes them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import ernie_lab as el
from ernie_lab.model.checks import ArgumentError, ArgumentRangeError, ArgumentTypeError, as_count, as_int, as_ints
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def routing(model):
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(3, 512, (n,), generator=g) for n in (9, 7)]
    return el.routing.collect_routing(model, data, progress=False)


NOT_INTS = [2.7, 2.0, True, "1", torch.tensor(2.0), torch.tensor(True), np.float64(2.0), None, [2]]


@pytest.mark.parametrize("value", NOT_INTS)
def test_the_helper_refuses_anything_but_an_integer(value):
    with pytest.raises(ArgumentTypeError, match="must be an integer"):
        as_int(value, "x")
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), torch.tensor(3), np.array(3)])
def test_the_helper_accepts_python_numpy_and_0d_tensor_integers(value):
    assert as_int(value, "x", 0, 4) == 3 and type(as_int(value, "x")) is int
    assert as_ints(torch.tensor([value, 1]) if not isinstance(value, np.ndarray) else [value], "xs", 0, 4)[0] == 3


def test_ranges_and_counts():
    with pytest.raises(ArgumentRangeError, match=r"x must be an integer in \[0, 4\), got 4"):
        as_int(4, "x", 0, 4)
    with pytest.raises(ArgumentRangeError, match="n must be an integer >= 0, got -1"):
        as_count(-1, "n")
    with pytest.raises(ArgumentTypeError, match="list of integers"):
        as_ints("123", "ids")  # a string is never iterated as digits
    with pytest.raises(ArgumentTypeError, match="each of ids"):
        as_ints(torch.tensor([1.0, 2.0]), "ids")


@pytest.mark.parametrize(
    ("on", "message"),
    [
        ({1: [2.7]}, "expert ids"),  # was: expert 2 steered
        ({1.9: [2]}, "layer must be an integer"),
        ({"1": [2]}, "layer must be an integer"),
        ({1: [True]}, "expert ids"),
        ({1: torch.tensor([2.0])}, "expert ids"),
        ({1: "2"}, "expert ids"),
    ],
)
def test_steer_experts_refuses_coerced_ids(model, on, message):
    with pytest.raises(ArgumentTypeError, match=message):
        el.interventions.steer_experts(model, on=on)


def test_ids_from_numpy_and_tensors_work_like_ints(model):
    ids = torch.tensor([[5, 6, 7]])
    plain = model.run_with_hooks(ids, fwd_hooks=el.interventions.steer_experts(model, on={1: [3]}))
    numpy_ids = el.interventions.steer_experts(model, on={np.int64(1): np.array([3])})
    assert torch.equal(plain, model.run_with_hooks(ids, fwd_hooks=numpy_ids))
    tensor_ids = el.interventions.steer_experts(model, on={torch.tensor(1): torch.tensor([3])})
    assert torch.equal(plain, model.run_with_hooks(ids, fwd_hooks=tensor_ids))


def test_every_intervention_checks_its_ids(model):
    iv = el.interventions
    cases = [
        lambda: iv.zero_ablate_experts(model, {1: [1.5]}),
        lambda: iv.reroute_ablate_experts(model, {1.0: [1]}),
        lambda: iv.force_routing(model, 1, [0.0, 1.0]),
        lambda: iv.force_routing(model, "1", [0, 1]),
        lambda: iv.patch_from_cache(model, model.run_with_cache(torch.tensor([[5, 6]]))[1], "hook_embed", [0.5]),
        lambda: iv.add_steering_vector(model, "hook_embed", torch.zeros(model.config.hidden_size), positions=[True]),
        lambda: el.ablation.ablation_hooks(model, {1: [2.0]}),
        lambda: el.experts.truncate_topk(model, 1.0),
        lambda: el.experts.knockout_topk(model, True),
        lambda: el.experts.router_cosines(model, 1.0),
    ]
    for case in cases:
        with pytest.raises(ArgumentTypeError):
            case()
    ranges = [
        lambda: iv.zero_ablate_experts(model, {1: [-1]}),
        lambda: iv.force_routing(model, 1, [0, 0]),
        lambda: el.experts.truncate_topk(model, 0),
        lambda: el.experts.knockout_topk(model, -1),
        lambda: el.experts.truncate_topk(model, 1, layers=[0]),  # dense layer
    ]
    for case in ranges:
        with pytest.raises(ArgumentRangeError):
            case()


def test_negative_counts_are_refused_not_used_as_slice_ends(routing):
    frame = pd.DataFrame({"layer": [1, 1, 1], "expert": [0, 1, 2], "rd": [0.5, 0.0, -0.5], "reap": [1.0, 2.0, 3.0]})
    for call in (
        lambda: el.experts.steering_sets(frame, n=-1),
        lambda: el.experts.pruning_sets(frame, n=-1),
        lambda: el.routing.paths(routing, top=-1),
        lambda: el.routing.paths(routing, examples=-1),
        lambda: el.routing.vocab_specialisation(routing, top=-5),
    ):
        with pytest.raises(ArgumentRangeError, match=">= "):
            call()
    with pytest.raises(ArgumentTypeError):
        el.experts.steering_sets(frame, n=1.5)
    with pytest.raises(ArgumentRangeError):
        el.experts.pruning_sets(frame, frac=1.5)
    with pytest.raises(ArgumentTypeError):
        el.routing.transitions(routing, 1.0, 2)
    with pytest.raises(ArgumentTypeError):
        el.routing.paths(routing, layers=["1"])
    assert len(el.routing.paths(routing, top=1)) == 1  # a valid count still works


def test_generation_and_tokenizer_ids(model):
    tok = el.load_tokenizer("toy")
    ids = torch.tensor([[5, 6, 7]])
    for eos in ("41", 4.0, [True], torch.tensor([4.0])):
        with pytest.raises(ArgumentError, match="eos_token_id"):
            model.generate(ids, max_new_tokens=1, eos_token_id=eos)
    out = model.generate(ids, max_new_tokens=2, eos_token_id=np.int64(3))  # a numpy id is an id
    assert out.shape[1] <= 5
    for bad in ("123", [1.0, 2.0], torch.tensor([1.0]), [True]):
        with pytest.raises(ArgumentTypeError):
            tok.decode(bad)
    with pytest.raises(ArgumentRangeError, match="out of range"):
        tok.decode([tok.vocab_size])
    assert tok.decode(np.array([5, 6])) == tok.decode([5, 6])


def test_patching_grids_and_batch_sizes(model):
    clean, corrupt = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 9, 7, 8]])
    setup = el.patching.PatchingSetup(model, clean, corrupt, el.patching.logit_diff(answer=3, distractor=4))
    for call in (
        lambda: setup.heads(layers=[0.0]),
        lambda: setup.heads(heads=[1.5]),
        lambda: setup.residual(positions=[True]),
        lambda: setup.experts(experts=["1"]),
    ):
        with pytest.raises(ArgumentTypeError):
            call()
    with pytest.raises(ArgumentRangeError):
        setup.heads(heads=[model.config.num_attention_heads])
    data = [torch.tensor([5, 6, 7])]
    for call in (
        lambda: el.experts.saliency(model, data, batch_size=0, progress=False),
        lambda: el.experts.super_experts(model, data, batch_size=-1, progress=False),
        lambda: el.experts.truncation_lens(model, data, batch_size=0, progress=False),
        lambda: el.routing.collect_routing(model, data, batch_size=0, progress=False),
    ):
        with pytest.raises(ArgumentRangeError, match="batch_size"):
            call()
    with pytest.raises(ArgumentTypeError, match="batch_size"):
        el.experts.saliency(model, data, batch_size=2.0, progress=False)
