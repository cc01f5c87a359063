"""Routing statistics: hand-computed answers on hand-built Routings, and collection from a model."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import ernie_lab as el
from ernie_lab import ErnieConfig, ErnieMoE
from ernie_lab import routing as R

# One MoE layer, E = 4 experts, k = 2, N = 4 tokens. Each selection is the top-2 of its probs.
IDX = [[0, 1], [0, 2], [1, 0], [3, 0]]
PROBS = [[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1], [0.3, 0.5, 0.1, 0.1], [0.3, 0.1, 0.2, 0.4]]


def hand_routing(**kw) -> R.Routing:
    fields = dict(layers=[5], probs=torch.tensor([PROBS]), idx=torch.tensor([IDX]))
    fields.update(kw)
    return R.Routing(**fields)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ErnieMoE(ErnieConfig.preset("tiny").replace(initializer_range=0.2)).eval()


@pytest.fixture(scope="module")
def sequences():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (n,), generator=g) for n in (4, 9, 6, 12, 3)]


def test_load_weighted_load_and_mean_prob():
    df = R.expert_load(hand_routing())
    assert list(df.columns) == ["layer", "expert", "count", "load", "wload", "mean_prob"]
    assert df["layer"].tolist() == [5] * 4
    # expert 0 is in all 4 sets, 1 in two, 2 and 3 in one; N k = 8 slots
    assert df["count"].tolist() == [4, 2, 1, 1]
    np.testing.assert_allclose(df["load"], [0.5, 0.25, 0.125, 0.125])
    # weights are the selected probs renormalised: token 0 [.4, .3]/.7, token 1 [.5, .3]/.8, ...
    w0 = 0.4 / 0.7 + 0.5 / 0.8 + 0.3 / 0.8 + 0.3 / 0.7
    np.testing.assert_allclose(df["wload"], [w0 / 4, (3 / 7 + 5 / 8) / 4, (3 / 8) / 4, (4 / 7) / 4])
    np.testing.assert_allclose(df["wload"].sum(), 1.0)
    np.testing.assert_allclose(df["mean_prob"], [0.375, 0.25, 0.2, 0.175])


def test_balance_cv_maxvio_entropy():
    row = R.balance(hand_routing()).iloc[0]
    # load = [1/2, 1/4, 1/8, 1/8]; mean 1/4; population std sqrt(3/128)
    assert row["cv"] == pytest.approx(math.sqrt(3 / 128) / 0.25)
    assert row["max_vio"] == pytest.approx((0.5 - 0.25) / 0.25)
    # H = (1/2 + 1/2 + 3/4) ln 2, normalised by ln 4
    assert row["load_entropy"] == pytest.approx(0.875)


def test_balance_of_uniform_load():
    r = R.Routing(layers=[1], probs=torch.full((1, 2, 4), 0.25), idx=torch.tensor([[[0, 1], [2, 3]]]))
    row = R.balance(r).iloc[0]
    assert row["cv"] == pytest.approx(0.0) and row["max_vio"] == pytest.approx(0.0)
    assert row["load_entropy"] == pytest.approx(1.0)


def test_router_entropy_and_confidence():
    probs = torch.tensor([[[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]]])
    r = R.Routing(layers=[1], probs=probs, idx=torch.tensor([[[0, 1], [0, 1], [1, 0]]]))
    ent = R.router_entropy(r)
    np.testing.assert_allclose(ent["entropy"], [1.0, 0.0, 0.5])  # ln 2 / ln 4 = 0.5
    assert ent["token"].tolist() == [0, 1, 2]
    summary = R.layer_summary(ent, "entropy")
    assert summary["mean"].iloc[0] == pytest.approx(0.5) and summary["n"].iloc[0] == 3
    np.testing.assert_allclose(R.topk_confidence(hand_routing())["confidence"], [0.7, 0.8, 0.8, 0.7])


def test_bias_effect_hand_built():
    assert R.bias_effect(hand_routing())["frac_changed"].iloc[0] == 0.0
    bias = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # expert 3 is always selected
    idx = (torch.tensor([PROBS]) + bias[:, None]).topk(2, dim=-1).indices
    row = R.bias_effect(hand_routing(idx=idx, bias=bias)).iloc[0]
    # only token 3 has expert 3 in its unbiased top-2
    assert row["n_changed"] == 3 and row["frac_changed"] == pytest.approx(0.75)
    assert row["mean_swapped"] == pytest.approx(0.75)


def test_coactivation_counts_and_fractions():
    r = hand_routing()
    counts = R.coactivation_matrix(r, 5, normalise=False)
    expected = torch.tensor([[4, 2, 1, 1], [2, 2, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(counts, expected)
    frac = R.coactivation_matrix(r, 5)
    torch.testing.assert_close(frac[0], torch.tensor([1.0, 0.5, 0.25, 0.25], dtype=torch.float64))
    torch.testing.assert_close(frac.diagonal(), torch.ones(4, dtype=torch.float64))
    df = R.coactivation(r, 5)
    assert len(df) == 16
    assert df.query("i == 1 and j == 0")["frac"].item() == pytest.approx(1.0)
    assert df.query("i == 0 and j == 1")["count"].item() == 2


def test_domain_specialisation_lift():
    df = R.domain_specialisation(hand_routing(groups=["a", "a", "b", "b"]))
    a = df[df["group"] == "a"].sort_values("expert")
    b = df[df["group"] == "b"].sort_values("expert")
    np.testing.assert_allclose(a["spec"], [1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(a["lift"], [2.0, 1.0, 1.0, 0.0])  # k/E = 1/2
    np.testing.assert_allclose(b["lift"], [2.0, 1.0, 0.0, 1.0])
    assert (df["n_tokens"] == 2).all()
    with pytest.raises(ValueError, match="group"):
        R.domain_specialisation(hand_routing())


def test_vocab_specialisation_lift_and_ties():
    r = hand_routing(token_ids=torch.tensor([9, 9, 7, 7]))
    df = R.vocab_specialisation(r, min_count=2, top=2)
    top = df[df["rank"] == 1].set_index("expert")
    # expert 2 (load 1/8) takes token 9 in 1 of its 2 uses: vspec 1/2, lift (1/2) / (1/8) / 2 = 2
    assert top.loc[2, "token_id"] == 9 and top.loc[2, "lift"] == pytest.approx(2.0)
    assert top.loc[3, "token_id"] == 7 and top.loc[3, "lift"] == pytest.approx(2.0)
    # expert 0: both tokens lift 1 and equally frequent -> the smaller id first
    assert top.loc[0, "token_id"] == 7 and top.loc[0, "lift"] == pytest.approx(1.0)
    second = df[(df["expert"] == 2) & (df["rank"] == 2)].iloc[0]
    assert second["token_id"] == 7 and second["lift"] == 0.0 and second["hits"] == 0
    with pytest.raises(ValueError, match="min_count"):
        R.vocab_specialisation(r, min_count=3)


def test_vocab_specialisation_prefers_frequent_token_on_tie():
    # tokens 4 (twice) and 8 (three times) both always go to experts {0, 1}: equal lift, 8 is more frequent
    r = R.Routing(
        layers=[1],
        probs=torch.full((1, 5, 4), 0.25),
        idx=torch.tensor([[[0, 1]] * 5]),
        token_ids=torch.tensor([4, 8, 4, 8, 8]),
    )
    top = R.vocab_specialisation(r, min_count=2, top=1)
    assert top["token_id"].tolist() == [8, 8]  # experts 0 and 1; experts 2, 3 have no load
    assert top["expert"].tolist() == [0, 1]


def test_routing_agreement():
    other = hand_routing(idx=torch.tensor([[[1, 0], [2, 3], [3, 2], [0, 3]]]))
    row = R.routing_agreement(hand_routing(), other).iloc[0]
    assert row["overlap"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert row["identical"] == pytest.approx(0.5)
    assert R.routing_agreement(other, other)["overlap"].item() == 1.0
    with pytest.raises(ValueError, match="aligned"):
        R.routing_agreement(hand_routing(), R.Routing(layers=[5], probs=torch.rand(1, 3, 4), idx=torch.zeros(1, 3, 2)))


def test_routing_validates_shapes():
    with pytest.raises(ValueError, match="layer N"):
        R.Routing(layers=[1], probs=torch.rand(1, 4, 4), idx=torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="outside"):
        R.Routing(layers=[1], probs=torch.rand(1, 2, 4), idx=torch.full((1, 2, 2), 4))


# ----------------------------------------------------------------------------- from a model
def test_collect_matches_a_cached_run(model, sequences):
    r = R.collect_routing(model, sequences[:1], progress=False)
    names = ["blocks.*.moe.hook_router_probs", "blocks.*.moe.hook_topk_idx", "blocks.*.moe.hook_topk_weights"]
    names += ["blocks.*.moe.hook_routed_out", "blocks.*.moe.hook_shared_out"]
    _, cache = model.run_with_cache(sequences[0][None], names_filter=names)
    assert r.layers == model.config.moe_layers == [1, 2]
    torch.testing.assert_close(r.probs, cache.stack("moe.hook_router_probs")[:, 0])
    assert torch.equal(r.idx, cache.stack("moe.hook_topk_idx")[:, 0])
    torch.testing.assert_close(r.weights, cache.stack("moe.hook_topk_weights")[:, 0])
    routed, shared = cache.stack("moe.hook_routed_out")[:, 0], cache.stack("moe.hook_shared_out")[:, 0]
    torch.testing.assert_close(r.routed_norm, routed.norm(dim=-1))
    torch.testing.assert_close(r.shared_norm, shared.norm(dim=-1))
    torch.testing.assert_close(r.cosine, torch.nn.functional.cosine_similarity(routed, shared, dim=-1))
    df = R.shared_vs_routed(r)
    assert df["shared_norm"].tolist() == pytest.approx(shared.norm(dim=-1).mean(-1).tolist())
    assert torch.equal(r.bias[0], model.blocks[1].mlp.moe_statics.e_score_correction_bias[0])


def test_padding_excluded(model, sequences):
    alone = R.collect_routing(model, sequences, batch_size=1, groups=list("abcab"), progress=False)
    padded = R.collect_routing(model, sequences, batch_size=5, groups=list("abcab"), progress=False)
    n = sum(len(s) for s in sequences)
    assert len(alone) == len(padded) == n
    assert torch.equal(padded.token_ids, torch.cat(sequences))
    assert padded.seq.tolist() == [i for i, s in enumerate(sequences) for _ in s]
    assert padded.pos.tolist() == [p for s in sequences for p in range(len(s))]
    assert list(padded.groups) == [g for g, s in zip("abcab", sequences, strict=True) for _ in s]
    assert torch.equal(alone.idx, padded.idx)
    torch.testing.assert_close(alone.probs, padded.probs, atol=1e-5, rtol=1e-5)
    pd.testing.assert_frame_equal(R.expert_load(alone)[["count"]], R.expert_load(padded)[["count"]])
    pd.testing.assert_frame_equal(R.domain_specialisation(alone), R.domain_specialisation(padded), atol=1e-6)


def test_input_forms_agree(model, sequences):
    class CharTokenizer:  # left-pads like ErnieTokenizer.__call__
        def __call__(self, texts):
            rows = [[ord(c) for c in t] for t in texts]
            width = max(map(len, rows))
            ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            return {"input_ids": ids, "attention_mask": mask}

    texts = ["hello", "hi", "routing"]
    from_texts = R.collect_routing(model, texts, tokenizer=CharTokenizer(), progress=False)
    from_lists = R.collect_routing(model, [[ord(c) for c in t] for t in texts], progress=False)
    from_batch = R.collect_routing(model, CharTokenizer()(texts), batch_size=2, progress=False)
    assert torch.equal(from_texts.idx, from_lists.idx) and torch.equal(from_texts.idx, from_batch.idx)
    assert from_texts.token_ids.tolist() == [ord(c) for t in texts for c in t]
    with pytest.raises(ValueError, match="tokenizer"):
        R.collect_routing(model, texts, progress=False)
    with pytest.raises(ValueError, match="groups"):
        R.collect_routing(model, texts, tokenizer=CharTokenizer(), groups=["a"], progress=False)


def test_bias_effect_from_the_model(model, sequences):
    statics = model.blocks[2].mlp.moe_statics.e_score_correction_bias
    try:
        with torch.no_grad():
            statics.zero_()
        assert (R.bias_effect(R.collect_routing(model, sequences, progress=False))["frac_changed"] == 0).all()
        with torch.no_grad():
            statics[0, 0] = 10.0  # expert 0 now wins every selection in layer 2
        r = R.collect_routing(model, sequences, progress=False)
        effect = R.bias_effect(r).set_index("layer")
        assert effect.loc[2, "frac_changed"] > 0 and effect.loc[1, "frac_changed"] == 0
        assert (r.idx[1] == 0).any(-1).all()
        load = R.expert_load(r).set_index(["layer", "expert"])
        assert load.loc[(2, 0), "load"] == pytest.approx(1 / model.config.moe_k)
    finally:
        with torch.no_grad():
            statics.zero_()


def test_plots_return_figures(model, sequences):
    r = R.collect_routing(model, sequences, groups=list("abcab"), progress=False)
    figures = [
        R.plot_load_heatmap(R.expert_load(r)),
        R.plot_coactivation(R.coactivation(r), layer=2),
        R.plot_specialisation(R.domain_specialisation(r), layer=1, top=4),
        R.plot_entropy_by_layer(R.router_entropy(r)),
        R.plot_entropy_by_layer(R.layer_summary(R.router_entropy(r), "entropy")),
    ]
    assert all(isinstance(f, Figure) for f in figures)
    with pytest.raises(ValueError, match="layer="):
        R.plot_coactivation(R.coactivation(r))


def test_model_without_shared_experts(sequences):
    torch.manual_seed(0)
    model = ErnieMoE(ErnieConfig.preset("tiny").replace(initializer_range=0.2, moe_num_shared_experts=0)).eval()
    r = R.collect_routing(model, sequences[:2], progress=False)
    assert torch.isnan(r.shared_norm).all() and torch.isnan(r.cosine).all()
    assert (r.routed_norm > 0).all()
    assert R.shared_vs_routed(r)["routed_norm"].notna().all()


def test_to_frame_one_row_per_token_layer_slot(model, sequences):
    r = R.collect_routing(model, sequences[:3], batch_size=3, groups=list("abc"), progress=False)
    tok = el.load_tokenizer("toy")
    df = r.to_frame(tokenizer=tok)
    cfg = model.config
    assert len(df) == len(r) * len(r.layers) * cfg.moe_k
    assert list(df.columns) == ["seq", "pos", "token_id", "token", "group", "layer", "slot", "expert", "weight", "prob"]
    names = ["blocks.*.moe.hook_topk_idx", "blocks.*.moe.hook_topk_weights", "blocks.*.moe.hook_router_probs"]
    for seq_i, seq in enumerate(sequences[:3]):
        _, cache = model.run_with_cache(seq[None], names_filter=names)
        for L in r.layers:
            rows = df[(df["seq"] == seq_i) & (df["layer"] == L)].sort_values(["pos", "slot"])
            idx = cache[f"blocks.{L}.moe.hook_topk_idx"][0]
            assert rows["expert"].tolist() == idx.flatten().tolist()
            assert rows["pos"].tolist() == [p for p in range(len(seq)) for _ in range(cfg.moe_k)]
            assert rows["token_id"].tolist() == seq.repeat_interleave(cfg.moe_k).tolist()
            want = cache[f"blocks.{L}.moe.hook_router_probs"][0].gather(-1, idx).flatten()
            np.testing.assert_allclose(rows["prob"].to_numpy(), want.numpy(), atol=1e-5)
            w = cache[f"blocks.{L}.moe.hook_topk_weights"][0].flatten()
            np.testing.assert_allclose(rows["weight"].to_numpy(), w.numpy(), atol=1e-5)
            assert set(rows["group"]) == {"abc"[seq_i]}
    first = df[(df["seq"] == 0) & (df["pos"] == 0)]["token"]
    assert set(first) == set(tok.convert_ids_to_tokens(sequences[0][:1]))
    assert r.to_frame()["token"].isna().all()
