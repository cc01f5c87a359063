"""Persistence, transitions, NMI, paths and next-token vocabulary specialisation on hand-built
routing records with hand-computed answers; router-logit sources against the router's own logits."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import ernie_lab as el
from tests.conftest import tiny_model


def hand_routing() -> el.routing.Routing:
    """Two layers, E=4, k=2; sequence 0 has tokens 0-2, sequence 1 tokens 3-4."""
    idx = torch.tensor(
        [
            [[0, 1], [0, 2], [3, 2], [1, 0], [1, 3]],  # layer 1
            [[2, 3], [3, 2], [0, 1], [0, 1], [2, 3]],  # layer 2
        ]
    )
    return el.routing.Routing(
        layers=[1, 2],
        probs=torch.full((2, 5, 4), 0.25),
        idx=idx,
        token_ids=torch.tensor([10, 11, 12, 13, 14]),
        seq=torch.tensor([0, 0, 0, 1, 1]),
        pos=torch.tensor([0, 1, 2, 0, 1]),
    )


def brute_force_chance(n_expert: int, k: int) -> tuple[float, float]:
    subsets = [set(s) for s in itertools.combinations(range(n_expert), k)]
    pairs = [(a, b) for a in subsets for b in subsets]
    overlap = sum(bool(a & b) for a, b in pairs) / len(pairs)
    jaccard = sum(len(a & b) / len(a | b) for a, b in pairs) / len(pairs)
    return overlap, jaccard


@pytest.mark.parametrize(("n_expert", "k"), [(4, 2), (6, 3), (7, 2)])
def test_chance_levels_equal_enumeration(n_expert, k):
    overlap, jaccard = brute_force_chance(n_expert, k)
    assert el.routing.overlap_chance(n_expert, k) == pytest.approx(overlap)
    assert el.routing.jaccard_chance(n_expert, k) == pytest.approx(jaccard)


def test_chance_levels_of_the_released_shapes():
    assert round(el.routing.overlap_chance(64, 6), 3) == 0.460
    assert round(el.routing.overlap_chance(64, 8), 3) == 0.679


def test_persistence_by_hand():
    p = el.routing.persistence(hand_routing()).set_index("layer")
    assert (p["n_pairs"] == 3).all()  # (0,1), (1,2), (3,4): never across sequences
    assert p.loc[1, "top1_repeat"] == pytest.approx(2 / 3)
    assert p.loc[1, "overlap"] == pytest.approx(1.0)
    assert p.loc[1, "jaccard"] == pytest.approx(1 / 3)
    assert p.loc[2, "top1_repeat"] == 0.0
    assert p.loc[2, "overlap"] == pytest.approx(1 / 3)
    assert p.loc[2, "jaccard"] == pytest.approx(1 / 3)
    assert (p["top1_repeat_chance"] == 0.25).all()
    assert p.loc[1, "overlap_chance"] == pytest.approx(5 / 6)
    assert p.loc[1, "jaccard_chance"] == pytest.approx(7 / 18)


def test_transitions_and_nmi_by_hand():
    t = el.routing.transitions(hand_routing(), 1, 2).set_index(["i", "j"])
    # top-1 at layer 1: 0 0 3 1 1; at layer 2: 2 3 0 0 2
    assert t.loc[(0, 2), "prob"] == 0.5 and t.loc[(0, 3), "prob"] == 0.5 and t.loc[(3, 0), "prob"] == 1.0
    assert t.loc[(0, 2), "lift"] == pytest.approx(0.5 / 0.4)
    assert t.loc[(3, 0), "lift"] == pytest.approx(1.0 / 0.4)
    assert np.isnan(t.loc[(2, 0), "prob"])  # expert 2 is never top-1 at layer 1
    h = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))  # both marginals: 0.4, 0.4, 0.2
    mutual = 2 * h - math.log(5)  # five cells of 1/5
    nmi = el.routing.transition_nmi(hand_routing())
    assert list(nmi["distance"]) == [1]
    assert nmi["nmi"].iloc[0] == pytest.approx(mutual / h) == t.attrs["nmi"]
    assert el.routing.nmi(torch.eye(3)) == pytest.approx(1.0)
    assert el.routing.nmi(torch.ones(3, 3)) == pytest.approx(0.0)


def test_paths_by_hand():
    p = el.routing.paths(hand_routing())
    assert list(p["path"]) == ["0>2", "0>3", "1>0", "1>2", "3>0"]
    assert (p["count"] == 1).all() and p["examples"].iloc[0] == [10]
    r = hand_routing()
    r.idx[1, 1, 0] = 2  # token 1 now also takes path 0>2
    p = el.routing.paths(r, top=1)
    assert p.iloc[0]["path"] == "0>2" and p.iloc[0]["count"] == 2 and p.iloc[0]["examples"] == [10, 11]


def test_next_token_vocab_specialisation():
    tokens = torch.tensor([5, 7] * 10)
    idx = (tokens == 5).long()[None, :, None]  # expert 1 on every 5 (whose next token is 7), expert 0 on 7
    r = el.routing.Routing(layers=[1], probs=torch.full((1, 20, 2), 0.5), idx=idx, token_ids=tokens)
    by_input = el.routing.vocab_specialisation(r, min_count=2, top=1).set_index("expert")
    by_next = el.routing.vocab_specialisation(r, min_count=2, top=1, key="next_token").set_index("expert")
    assert by_input.loc[1, "token_id"] == 5 and by_next.loc[1, "token_id"] == 7
    assert by_next.loc[1, "vspec"] == 1.0 and by_next["n_v"].sum() == 19  # the last token has no next
    with pytest.raises(ValueError, match="next_token"):
        el.routing.vocab_specialisation(r, key="output")


@pytest.mark.parametrize("split", [False, True])
def test_router_logit_sources_sum_to_the_logits(split):
    model = tiny_model()
    ids = torch.randint(3, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    layer = model.config.moe_layers[-1]
    names, parts = el.routing.router_logit_sources(model, ids, layer, attention_mask=mask, split_experts=split)
    _, cache = model.run_with_cache(ids, names_filter=f"blocks.{layer}.moe.hook_router_logits", attention_mask=mask)
    logits = cache[f"blocks.{layer}.moe.hook_router_logits"]
    assert parts.shape == (len(names), 2, 7, model.config.moe_num_experts)
    torch.testing.assert_close(parts.sum(0), logits, atol=1e-5, rtol=1e-5)
    expected = ["embed", "attn_out.0", "mlp_out.0", "attn_out.1"]
    expected += [f"routed.1.{e}" for e in range(8)] + ["shared.1"] if split else ["mlp_out.1"]
    assert names == expected + ["attn_out.2"]
    summary = el.routing.source_summary(names, parts, mask)
    assert summary["share"].sum() == pytest.approx(1.0)
    assert el.routing.plot_router_sources(summary).axes


def test_transition_plots_build():
    r = hand_routing()
    assert el.routing.plot_transitions(el.routing.transitions(r, 1, 2), "lift").axes
    assert el.routing.plot_nmi_by_distance(el.routing.transition_nmi(r)).axes
