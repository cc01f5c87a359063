"""Expert ablation and direct logit attribution: invariants and hand-checked reductions."""

from __future__ import annotations

import ast

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from ernie_lab import ErnieConfig, ErnieMoE
from ernie_lab import ablation as A
from ernie_lab import routing as R
from ernie_lab.ablation.core import mean_outputs as _mean_outputs
from ernie_lab.interventions import (
    expert_mean_outputs,
    mean_ablate_experts,
    reroute_ablate_experts,
    zero_ablate_experts,
)

UNUSED = (1, 3)  # (layer, expert) that the correction bias keeps out of every selection


def tiny_model(**overrides) -> ErnieMoE:
    torch.manual_seed(0)
    model = ErnieMoE(ErnieConfig.preset("tiny").replace(initializer_range=0.2, **overrides)).eval()
    with torch.no_grad():
        model.blocks[UNUSED[0]].mlp.moe_statics.e_score_correction_bias[0, UNUSED[1]] = -10.0
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def sequences():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (n,), generator=g) for n in (5, 8, 3, 10)]


def padded(sequences):
    ids, mask, _ = next(R.iter_batches(sequences, len(sequences)))
    return ids, mask


def test_token_nll_matches_cross_entropy_and_masks_padding(model, sequences):
    ids, mask = padded(sequences)
    nll = A.token_nll(model, ids, mask)
    assert nll.shape == (len(sequences), ids.shape[1] - 1)
    for row, seq in enumerate(sequences):
        logits = model(seq[None])[0]
        expected = torch.nn.functional.cross_entropy(logits[:-1], seq[1:], reduction="none")
        n_pred = len(seq) - 1
        torch.testing.assert_close(nll[row, -n_pred:], expected, atol=1e-5, rtol=1e-5)
        assert torch.isnan(nll[row, : nll.shape[1] - n_pred]).all()  # padding is never context nor target


def test_unselected_expert_changes_nothing(model, sequences):
    r = R.collect_routing(model, sequences, progress=False)
    assert R.expert_load(r).set_index(["layer", "expert"]).loc[UNUSED, "count"] == 0
    for mode in ("zero", "reroute", "mean"):
        df = A.ablation_effect(model, sequences, {UNUSED[0]: [UNUSED[1]]}, mode=mode, progress=False)
        df = df[~df["control"]]
        assert df["delta_loss"].abs().max() < 1e-7, mode
        assert df["kl"].abs().max() < 1e-7, mode


def test_ablation_effect_equals_token_nll_means(model, sequences):
    ids, mask = padded(sequences)
    experts = {2: [0, 5]}
    hooks = zero_ablate_experts(model, experts)
    base, ablated = A.token_nll(model, ids, mask), A.token_nll(model, ids, mask, fwd_hooks=hooks)
    groups = ["x", "y", "x", "y"]
    df = A.ablation_effect(model, sequences, experts, groups=groups, batch_size=3, controls=0, progress=False)
    df = df.set_index("group")
    assert df.index.tolist() == ["all", "x", "y"]
    real = ~torch.isnan(base)
    assert df.loc["all", "n_tokens"] == real.sum() == sum(len(s) - 1 for s in sequences)
    assert df.loc["all", "nll_base"] == pytest.approx(base[real].mean().item(), abs=1e-5)
    assert df.loc["all", "delta_loss"] == pytest.approx((ablated[real].mean() - base[real].mean()).item(), abs=1e-5)
    rows_x = torch.tensor([g == "x" for g in groups])
    assert df.loc["x", "nll_ablated"] == pytest.approx(ablated[rows_x][real[rows_x]].mean().item(), abs=1e-5)
    # the "all" row is the token-weighted mean of the group rows
    weighted = (df.loc[["x", "y"], "delta_loss"] * df.loc[["x", "y"], "n_tokens"]).sum() / df.loc["all", "n_tokens"]
    assert weighted == pytest.approx(df.loc["all", "delta_loss"], abs=1e-9)
    # KL(p_base || p_ablated) by hand
    logp_b = model(ids, attention_mask=mask).log_softmax(-1)[:, :-1][real]
    logp_a = model.run_with_hooks(ids, fwd_hooks=hooks, attention_mask=mask).log_softmax(-1)[:, :-1][real]
    kl = (logp_b.exp() * (logp_b - logp_a)).sum(-1).mean().item()
    assert df.loc["all", "kl"] == pytest.approx(kl, abs=1e-5)
    assert df.loc["all", "kl"] > 0


def test_mean_ablation_batches_combine_like_one_batch(model, sequences):
    ids, mask = padded(sequences)
    experts = {1: [0, 2, UNUSED[1]], 2: [5]}
    whole = expert_mean_outputs(model, ids, experts, attention_mask=mask)
    batched = _mean_outputs(model, sequences, experts, None, batch_size=3)
    assert batched.keys() == whole.keys()
    for key in whole:  # selected experts and the never-selected fallback alike
        torch.testing.assert_close(batched[key], whole[key], atol=1e-5, rtol=1e-5)
    df = A.ablation_effect(model, sequences, experts, mode="mean", batch_size=3, controls=0, progress=False)
    nll = A.token_nll(model, ids, mask, fwd_hooks=mean_ablate_experts(model, whole))
    assert df["nll_ablated"].item() == pytest.approx(nll[~torch.isnan(nll)].mean().item(), abs=1e-5)


def test_reroute_never_selects_the_ablated_expert(model, sequences):
    base = R.expert_load(R.collect_routing(model, sequences, progress=False)).set_index(["layer", "expert"])
    busiest = int(base.loc[2, "count"].idxmax())
    hooks = reroute_ablate_experts(model, {2: [busiest]})
    r = R.collect_routing(model, sequences, fwd_hooks=hooks, progress=False)
    load = R.expert_load(r).set_index(["layer", "expert"])
    assert base.loc[(2, busiest), "count"] > 0 and load.loc[(2, busiest), "count"] == 0
    assert (r.idx[r.layer_index(2)] != busiest).all()
    assert load.loc[2, "load"].sum() == pytest.approx(1.0)  # every token still gets k experts


def test_expert_importance_table(model, sequences):
    df = A.expert_importance(model, sequences, split=None, progress=False)
    df = df[~df["control"]]
    cfg = model.config
    assert len(df) == len(cfg.moe_layers) * cfg.moe_num_experts
    for _, sub in df.groupby("layer"):
        assert sub["rank"].tolist() == list(range(1, cfg.moe_num_experts + 1))
        assert sub["delta_loss"].is_monotonic_decreasing
        assert sub["load"].sum() == pytest.approx(1.0)
    unused = df.set_index(["layer", "expert"]).loc[UNUSED]
    assert unused["delta_loss"] == 0 and unused["load"] == 0
    single = A.ablation_effect(model, sequences, {2: [4]}, controls=0, progress=False).iloc[0]
    row = df.set_index(["layer", "expert"]).loc[(2, 4)]
    assert row["delta_loss"] == pytest.approx(single["delta_loss"], abs=1e-7)
    assert row["kl"] == pytest.approx(single["kl"], abs=1e-7)


def test_pruning_curve(model, sequences):
    cfg = model.config
    zero = A.pruning_curve(model, sequences, 2, order_by="load", split=None, controls=0, progress=False)
    assert zero["n_ablated"].tolist() == list(range(cfg.moe_num_experts + 1))
    base = A.ablation_effect(model, sequences, {}, mode="mean", progress=False)["nll_base"].item()
    assert zero["loss"].iloc[0] == pytest.approx(base, abs=1e-9)
    assert zero["delta_loss"].iloc[0] == 0 and zero["kl"].iloc[0] == 0
    # every expert zero-ablated = the layer's routed output removed
    ids, mask = padded(sequences)
    no_routed = [("blocks.2.moe.hook_routed_out", lambda x, hook: torch.zeros_like(x))]
    nll = A.token_nll(model, ids, mask, fwd_hooks=no_routed)
    assert zero["loss"].iloc[-1] == pytest.approx(nll[~torch.isnan(nll)].mean().item(), abs=1e-5)
    # ordered by load: the first ablated expert has the smallest load
    load = R.expert_load(R.collect_routing(model, sequences, progress=False)).query("layer == 2")
    least_loaded = load.loc[load["load"] == load["load"].min(), "expert"].tolist()
    assert ast.literal_eval(zero["ablated"].iloc[1])[0] in least_loaded

    importance = A.expert_importance(model, sequences, layers=[1], mode="reroute", split=None, progress=False)
    reroute = A.pruning_curve(model, sequences, 1, mode="reroute", importance=importance, split=None, progress=False)
    assert reroute["n_ablated"].max() == cfg.moe_num_experts - cfg.moe_k
    ranked = importance[~importance["control"]]
    least = ranked.sort_values(["delta_loss", "expert"])["expert"].tolist()
    assert ast.literal_eval(reroute["ablated"].iloc[2]) == least[:2]
    with pytest.raises(ValueError, match="steps"):
        A.pruning_curve(model, sequences, 1, mode="reroute", steps=[cfg.moe_num_experts], progress=False)


@pytest.mark.parametrize("use_bias", [False, True])
def test_dla_sums_to_logit_difference(sequences, use_bias):
    model = tiny_model(use_bias=use_bias, tie_word_embeddings=not use_bias)
    if use_bias:
        with torch.no_grad():
            model.lm_head.bias.normal_(0.0, 1.0)
    ids, mask = padded(sequences)
    df = A.direct_logit_attribution(model, ids, answer=[3, 4, 5, 6], distractor=7, attention_mask=mask)
    logits = model(ids, attention_mask=mask)[:, -1]
    diff = logits[:, [3, 4, 5, 6]].diagonal() - logits[:, 7]
    sums = df.groupby("batch")["contribution"].sum()
    torch.testing.assert_close(torch.tensor(sums.to_numpy()), diff.double(), atol=1e-4, rtol=0)
    assert df.attrs["logit_diff"] == pytest.approx(diff.tolist(), abs=1e-6)
    assert (df["component"] == "bias").any() == use_bias
    if use_bias:
        bias_part = (model.lm_head.bias[[3, 4, 5, 6]] - model.lm_head.bias[7]).double()
        direct = torch.tensor(df[df["component"] != "bias"].groupby("batch")["contribution"].sum().to_numpy())
        torch.testing.assert_close(direct, diff.double() - bias_part, atol=1e-4, rtol=0)
    # one row per selected expert slot, matching the routing at the last position
    _, cache = model.run_with_cache(ids, names_filter="blocks.2.moe.hook_topk_idx", attention_mask=mask)
    experts = df[(df["component"] == "expert") & (df["layer"] == 2)].sort_values(["batch", "slot"])
    assert experts["expert"].tolist() == cache["blocks.2.moe.hook_topk_idx"][:, -1].flatten().tolist()


def test_dla_expert_row_by_hand(model, sequences):
    seq = sequences[1]
    df = A.direct_logit_attribution(model, seq, answer=10, distractor=20)
    names = ["blocks.2.moe.hook_expert_out", "blocks.2.moe.hook_topk_weights", "blocks.2.hook_resid_post"]
    _, cache = model.run_with_cache(seq[None], names_filter=names)
    resid = cache["blocks.2.hook_resid_post"][0, -1]
    rms = (resid.pow(2).mean() + model.config.rms_norm_eps).sqrt()
    w_u = model.lm_head.weight
    direction = model.model.norm.weight * (w_u[10] - w_u[20]) / rms
    out, w = cache["blocks.2.moe.hook_expert_out"][0, -1, 1], cache["blocks.2.moe.hook_topk_weights"][0, -1, 1]
    row = df[(df["component"] == "expert") & (df["layer"] == 2) & (df["slot"] == 1)].iloc[0]
    assert row["contribution"] == pytest.approx((w * out @ direction).item(), abs=1e-5)
    assert row["weight"] == pytest.approx(w.item())


def test_bad_arguments(model, sequences):
    with pytest.raises(ValueError, match="mode"):
        A.ablation_effect(model, sequences, {}, mode="nope", progress=False)
    with pytest.raises(ValueError, match="MoE"):
        A.expert_importance(model, sequences, layers=[0], progress=False)
    with pytest.raises(ValueError, match="order_by"):
        A.pruning_curve(model, sequences, 1, order_by="random", progress=False)


def test_plots_return_figures(model, sequences):
    importance = A.expert_importance(model, sequences, progress=False)
    curve = pd.concat(
        [
            A.pruning_curve(model, sequences, 2, order_by=o, importance=importance, progress=False)
            for o in ("importance", "load")
        ]
    )
    dla = A.direct_logit_attribution(model, sequences[0], answer=1, distractor=2)
    figures = [
        A.plot_importance(importance),
        A.plot_importance(importance, layer=2, top=5),
        A.plot_pruning_curve(curve),
        A.plot_dla(dla, top=5),
    ]
    assert all(isinstance(f, Figure) for f in figures)


@pytest.mark.parametrize("use_bias", [False, True])
def test_dla_head_rows_sum_to_the_attention_row(sequences, use_bias):
    model = tiny_model(use_bias=use_bias, tie_word_embeddings=not use_bias)
    if use_bias:
        with torch.no_grad():
            for block in model.blocks:
                block.self_attn.o_proj.bias.normal_(0.0, 1.0)
    ids, mask = padded(sequences)
    df = A.direct_logit_attribution(model, ids, answer=[3, 4, 5, 6], distractor=7, attention_mask=mask, heads=True)
    cfg = model.config
    heads = df[df["component"] == "head"]
    assert len(heads) == len(sequences) * cfg.num_hidden_layers * cfg.num_attention_heads
    assert sorted(set(heads["head"])) == list(range(cfg.num_attention_heads))
    by_layer = heads.groupby(["batch", "layer"])["contribution"].sum()
    attn = df[df["component"] == "attn"].set_index(["batch", "layer"])["contribution"]
    if not use_bias:
        np.testing.assert_allclose(by_layer.sort_index().to_numpy(), attn.sort_index().to_numpy(), atol=1e-5, rtol=0)
    else:  # the o_proj bias is in the attn row but in no head: g * bias / rms · (W_U[a] - W_U[b])
        last = f"blocks.{cfg.num_hidden_layers - 1}.hook_resid_post"
        _, cache = model.run_with_cache(ids, names_filter=last, attention_mask=mask)
        resid = cache[last][:, -1].double()
        rms = (resid.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps).sqrt()
        w_u = model.lm_head.weight.detach().double()
        direction = model.model.norm.weight.detach().double() * (w_u[[3, 4, 5, 6]] - w_u[7]) / rms
        for L, block in enumerate(model.blocks):
            bias_part = direction @ block.self_attn.o_proj.bias.detach().double()
            gap = attn.xs(L, level="layer").sort_index() - by_layer.xs(L, level="layer").sort_index()
            np.testing.assert_allclose(gap.to_numpy(), bias_part.numpy(), atol=1e-5, rtol=0)
    # the other rows still partition the logit difference
    logits = model(ids, attention_mask=mask)[:, -1]
    diff = (logits[:, [3, 4, 5, 6]].diagonal() - logits[:, 7]).double()
    sums = torch.tensor(df[df["component"] != "head"].groupby("batch")["contribution"].sum().to_numpy())
    torch.testing.assert_close(sums, diff, atol=1e-4, rtol=0)
    assert isinstance(A.plot_dla(df, top=6), Figure)
