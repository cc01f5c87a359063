"""Expert-level analyses against known answers: REAP under zeroed / scaled experts, the hook pass
against the same formulas on a full cache, super experts, steering, truncation lens, risk difference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import ernie_lab as el
from tests.conftest import tiny_model

LAYER = 1


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 512, (n,), generator=g) for n in (12, 9, 12, 5, 11, 12)]


def _busy_expert(sal: pd.DataFrame, layer: int = LAYER) -> int:
    sub = sal[sal["layer"] == layer]
    return int(sub.sort_values("n_tokens", ascending=False)["expert"].iloc[0])


@pytest.fixture(scope="module")
def base_saliency(model, data):
    return el.experts.saliency(model, data, batch_size=4, progress=False)


def _edited(model, layer, expert, scale):
    edited = tiny_model()
    edited.load_state_dict(model.state_dict())
    with torch.no_grad():
        edited.blocks[layer].mlp.experts.down_proj[expert] *= scale
    return edited


def test_saliency_matches_formulas_on_a_full_cache(model, data, base_saliency):
    cfg = model.config
    ids, mask, _ = next(el.routing.iter_batches(data, len(data), 0))
    names = [f"blocks.{L}.{p}" for L in cfg.moe_layers for p in ("hook_resid_mid", "hook_mlp_out")]
    names += [f"blocks.{L}.moe.hook_{p}" for L in cfg.moe_layers for p in ("topk_idx", "topk_weights", "expert_out")]
    _, cache = model.run_with_cache(ids, names_filter=names, attention_mask=mask)
    real = mask.bool()
    n = int(real.sum())
    for L in cfg.moe_layers:
        idx = cache[f"blocks.{L}.moe.hook_topk_idx"][real]
        g = cache[f"blocks.{L}.moe.hook_topk_weights"][real].double()
        f = cache[f"blocks.{L}.moe.hook_expert_out"][real].double()
        with torch.no_grad():
            h = model.blocks[L].post_attention_layernorm(cache[f"blocks.{L}.hook_resid_mid"])[real].double()
        y = cache[f"blocks.{L}.hook_mlp_out"][real].double()
        away = 1 - F.cosine_similarity(h, y, dim=-1)
        sub = base_saliency[base_saliency["layer"] == L].set_index("expert")
        for e in range(cfg.moe_num_experts):
            hit = idx == e
            norms, gates = f[hit].norm(dim=-1), g[hit]
            assert sub.loc[e, "n_tokens"] == int(hit.sum())
            assert sub.loc[e, "frequency"] == pytest.approx(int(hit.sum()) / n)
            assert sub.loc[e, "weighted_frequency"] == pytest.approx(float(gates.sum()) / n, rel=1e-6)
            if hit.any():
                assert sub.loc[e, "ean_mean"] == pytest.approx(float(norms.mean()), rel=1e-5)
                assert sub.loc[e, "reap"] == pytest.approx(float((gates * norms).mean()), rel=1e-5)
            token_away = away[:, None].expand_as(hit)[hit]
            assert sub.loc[e, "easy_ep"] == pytest.approx(float((gates * norms * token_away).sum()) / n, rel=1e-4)


def test_zeroed_expert_has_reap_zero(model, data, base_saliency):
    e = _busy_expert(base_saliency)
    sal = el.experts.saliency(_edited(model, LAYER, e, 0.0), data, batch_size=4, progress=False)
    row = sal[(sal["layer"] == LAYER) & (sal["expert"] == e)].iloc[0]
    assert row["n_tokens"] > 0 and row["reap"] == 0.0 and row["ean_mean"] == 0.0


def test_scaled_expert_scales_its_reap_only(model, data, base_saliency):
    e = _busy_expert(base_saliency)
    sal = el.experts.saliency(_edited(model, LAYER, e, 10.0), data, batch_size=4, progress=False)
    before = base_saliency[base_saliency["layer"] == LAYER].set_index("expert")["reap"]
    after = sal[sal["layer"] == LAYER].set_index("expert")["reap"]
    assert after[e] == pytest.approx(10 * before[e], rel=1e-5)
    others = [x for x in before.index if x != e]
    np.testing.assert_allclose(after[others], before[others], rtol=1e-12)


def test_loud_expert_is_super(model, data, base_saliency):
    e = _busy_expert(base_saliency)
    sup = el.experts.super_experts(_edited(model, LAYER, e, 1000.0), data, batch_size=4, progress=False)
    flagged = sup[sup["is_super"]]
    assert list(zip(flagged["layer"], flagged["expert"], strict=True)) == [(LAYER, e)]
    base = el.experts.super_experts(model, data, batch_size=4, progress=False, rel=0.5)
    assert base["is_super"].sum() <= 1  # no 1000x outlier: at most the maximum passes the quantile


def test_pruning_sets_and_rank_agreement(base_saliency):
    sets = el.experts.pruning_sets(base_saliency, "reap", n=2)
    for L, experts in sets.items():
        sub = base_saliency[base_saliency["layer"] == L]
        assert len(experts) == 2 and max(sub.set_index("expert")["reap"][experts]) <= sorted(sub["reap"])[1]
    fake = base_saliency[["layer", "expert"]].assign(delta_loss=base_saliency["reap"])
    rho = el.experts.saliency_vs_importance(base_saliency, fake, ["reap"])
    np.testing.assert_allclose(rho["rho"], 1.0)
    assert el.experts.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="exactly one"):
        el.experts.pruning_sets(base_saliency, "reap")


def test_steering_forces_experts_in_and_out(model, data):
    ids = data[0][None]
    on, off = {1: [3]}, {2: [0, 5]}
    seen: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    hooks = el.interventions.steer_experts(model, on=on, off=off)
    record = [(f"blocks.{L}.moe.hook_topk_idx", lambda x, hook: seen[hook.layer].append(x.clone())) for L in seen]
    model.generate(ids, max_new_tokens=4, fwd_hooks=hooks + record, progress=False)
    assert len(seen[1]) == 4  # prefill (first new token) + 3 decode steps
    assert all(bool((x == 3).any(-1).all()) for x in seen[1])
    assert not any(bool(((x == 0) | (x == 5)).any()) for x in seen[2])
    _, free = model.run_with_cache(ids, names_filter="blocks.*.moe.hook_topk_idx")
    assert not bool((free["blocks.1.moe.hook_topk_idx"] == 3).any(-1).all())  # the steering changes something
    assert bool(((free["blocks.2.moe.hook_topk_idx"] == 0) | (free["blocks.2.moe.hook_topk_idx"] == 5)).any())
    _, cache = model.run_with_cache(ids, names_filter="blocks.1.moe.hook_topk_weights", fwd_hooks=hooks)
    w = cache["blocks.1.moe.hook_topk_weights"]
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))  # weights renormalised
    with pytest.raises(ValueError, match="disjoint"):
        el.interventions.steer_experts(model, on={1: [2]}, off={1: [2]})


def test_truncation_at_k_is_the_model(model, data):
    ids = torch.stack([d[:5] for d in data])
    plain = model(ids)
    k = model.config.moe_k
    assert torch.equal(model.run_with_hooks(ids, fwd_hooks=el.experts.truncate_topk(model, k)), plain)
    assert torch.equal(model.run_with_hooks(ids, fwd_hooks=el.experts.knockout_topk(model, 0)), plain)
    assert not torch.equal(model.run_with_hooks(ids, fwd_hooks=el.experts.truncate_topk(model, 1)), plain)
    w = torch.tensor([[0.5, 0.3, 0.2]])
    torch.testing.assert_close(el.experts.truncated_weights(w, 2), torch.tensor([[0.625, 0.375, 0.0]]))


def test_truncation_lens_and_knockout(model, data):
    lens = el.experts.truncation_lens(model, data, batch_size=4, progress=False)
    k = model.config.moe_k
    full = lens[lens["k_prime"] == k]
    np.testing.assert_allclose(full["cosine"], 1.0, atol=1e-6)
    assert (lens[lens["k_prime"] < k]["cosine"] < 1).all()
    nll = [el.ablation.token_nll(model, d[None]) for d in data]
    base = float(torch.cat([n.flatten() for n in nll]).double().mean())
    np.testing.assert_allclose(full["nll"], base, rtol=1e-5)
    np.testing.assert_allclose(full["delta_nll"], 0.0)
    ko = el.experts.topk_knockout(model, data, batch_size=4, progress=False)
    assert list(ko["r"]) == [0, 1, 2] and ko["delta_nll"].iloc[0] == 0.0
    np.testing.assert_allclose(ko["nll"].iloc[0], base, rtol=1e-5)


def test_risk_difference(model, data):
    same = el.experts.risk_difference(model, data, data, split=None, progress=False)
    same = same[~same["control"]]
    np.testing.assert_array_equal(same["rd"], 0.0)
    r = el.routing.collect_routing(model, data, progress=False)
    load = el.routing.expert_load(r)
    np.testing.assert_allclose(same["p_a"], load["count"] / r.n_tokens)
    marks = [torch.arange(len(d)) == 0 for d in data]  # first token of each prompt only
    first = el.experts.risk_difference(model, data, data, marks_a=marks, split=None, controls=0, progress=False)
    assert (first["n_a"] == len(data)).all()
    first_idx = r.idx[:, r.pos == 0]
    expected = torch.zeros(len(r.layers), r.n_experts).scatter_(1, first_idx[:, :, 0], 0.0)
    for li in range(len(r.layers)):
        expected[li] = torch.bincount(first_idx[li].flatten(), minlength=r.n_experts) / len(data)
    np.testing.assert_allclose(first["p_a"], expected.reshape(-1).numpy())
    on, off = el.experts.steering_sets(first, n=1)
    for L, (e,) in on.items():
        sub = first[first["layer"] == L]
        assert sub.set_index("expert")["rd"][e] == sub["rd"].max()
    with pytest.raises(ValueError, match="one bool per real token"):
        el.experts.risk_difference(model, data, data, marks_a=marks[:2], progress=False)


def test_router_geometry(model):
    geo = el.experts.router_geometry(model)
    assert list(geo["layer"]) == model.config.moe_layers
    edited = tiny_model()
    edited.load_state_dict(model.state_dict())
    with torch.no_grad():
        w = edited.blocks[1].mlp.gate.weight
        w.copy_(torch.eye(w.shape[0], w.shape[1]) * 3.0)
        edited.blocks[2].mlp.gate.weight[1] = edited.blocks[2].mlp.gate.weight[0] * 2
    geo = el.experts.router_geometry(edited).set_index("layer")
    assert geo.loc[1, "mean_abs_cos"] == 0.0 and geo.loc[1, "max_abs_cos"] == 0.0
    assert geo.loc[2, "max_abs_cos"] == pytest.approx(1.0)


def test_sink_test_without_experts_is_unchanged(model, data):
    out = el.experts.sink_test(model, data[:3], {}, batch_size=2)
    np.testing.assert_array_equal(out["max_norm_base"], out["max_norm_ablated"])
    np.testing.assert_array_equal(out["first_attn_base"], out["first_attn_ablated"])
    assert (out["first_attn_base"] > 0).all() and (out["first_attn_base"] <= 1).all()
    hit = el.experts.sink_test(model, data[:3], {1: [0, 1, 2, 3, 4, 5, 6, 7]}, batch_size=2)
    assert hit["max_norm_ablated"].iloc[0] == hit["max_norm_base"].iloc[0]  # layer 0 precedes the ablation
    assert (hit["max_norm_ablated"].iloc[1:] != hit["max_norm_base"].iloc[1:]).all()


def test_plots_build(model, data, base_saliency):
    fake = base_saliency[["layer", "expert"]].assign(delta_loss=-base_saliency["frequency"])
    figures = [
        el.experts.plot_saliency(base_saliency),
        el.experts.plot_saliency_vs_importance(el.experts.saliency_vs_importance(base_saliency, fake)),
        el.experts.plot_super_experts(el.experts.super_experts(model, data, progress=False)),
        el.experts.plot_risk_difference(el.experts.risk_difference(model, data[:3], data[3:], progress=False)),
    ]
    assert all(f.axes for f in figures)


def test_forced_on_expert_gets_its_renormalised_prob(model, data):
    ids = torch.stack([d[:5] for d in data])
    on, off = {1: [3]}, {1: [0]}
    forced = el.experts.forced_weights(model, ids, on, off).iloc[0]
    steer = el.interventions.steer_experts(model, on, off)
    _, cache = model.run_with_cache(ids, names_filter="blocks.1.moe.hook_*", fwd_hooks=steer)
    probs, idx = cache["blocks.1.moe.hook_router_probs"], cache["blocks.1.moe.hook_topk_idx"]
    assert bool((idx == 3).any(-1).all()) and not bool((idx == 0).any())
    expected = probs[..., 3] / probs.gather(-1, idx).sum(-1)
    assert forced["mean_weight"] == pytest.approx(float(expected.mean()), rel=1e-6)
    assert forced["min_weight"] == pytest.approx(float(expected.min()), rel=1e-6)
    assert forced["mean_prob"] == pytest.approx(float(probs[..., 3].mean()), rel=1e-6)
