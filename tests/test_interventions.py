"""Intervention primitives: each edit does exactly what its docstring says, checked independently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from ernie_lab import interventions as iv
from ernie_lab.model.ernie import ErnieMoE
from ernie_lab.model.hook_points import HookError

BATCH, POS = 2, 7


@pytest.fixture(scope="module")
def model() -> ErnieMoE:
    return tiny_model(bias_std=0.1)


@pytest.fixture(scope="module")
def ids(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (BATCH, POS), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def corrupt(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (BATCH, POS), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def clean(model, ids):
    """Plain logits and a cache of the cheap points (fast paths, so patched runs can match bitwise)."""
    names = lambda n: not n.endswith(("hook_attn_scores", "hook_pattern", "hook_expert_post", "hook_expert_out"))
    logits, cache = model.run_with_cache(ids, names_filter=names)
    assert torch.equal(logits, model(ids))
    return logits, cache


def moe(L: int, point: str) -> str:
    return f"blocks.{L}.moe.hook_{point}"


def run_expert(model, L: int, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = model.blocks[L].mlp.experts
    gate, up = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ ex.down_proj[e]


def selected_and_unselected(cache, model, L: int) -> tuple[int, int | None]:
    idx = cache[moe(L, "topk_idx")]
    counts = torch.bincount(idx.flatten(), minlength=model.config.moe_num_experts)
    unused = (counts == 0).nonzero().flatten().tolist()
    return int(counts.argmax()), (unused[0] if unused else None)


# ----------------------------------------------------------------------------- zero ablation
def test_zero_ablate_sets_weights_to_zero_without_renormalising(model, ids, clean):
    _, c = clean
    L = model.config.moe_layers[0]
    e, _ = selected_and_unselected(c, model, L)
    names = [moe(L, p) for p in ("topk_idx", "topk_weights", "expert_out", "routed_out")]  # attention: fast path
    logits, got = model.run_with_cache(ids, names_filter=names, fwd_hooks=iv.zero_ablate_experts(model, {L: [e]}))
    hit = c[moe(L, "topk_idx")] == e
    assert bool(hit.any())
    w = got[moe(L, "topk_weights")]
    assert bool((w[hit] == 0).all())
    assert torch.equal(w[~hit], c[moe(L, "topk_weights")][~hit])
    # manual: drop that expert's slots from the weighted sum of expert outputs
    keep = (~hit).float()[..., None]
    manual = (w[..., None] * got[moe(L, "expert_out")] * keep).sum(-2)
    torch.testing.assert_close(got[moe(L, "routed_out")], manual, atol=1e-5, rtol=1e-5)

    def zero_slots(out, hook):
        return out.masked_fill(hit[..., None], 0.0)

    by_output = model.run_with_hooks(ids, fwd_hooks=[(moe(L, "expert_out"), zero_slots)])
    torch.testing.assert_close(logits, by_output, atol=1e-5, rtol=1e-5)


def test_zero_ablate_several_layers(model, ids):
    experts = {L: [0, 1, 2] for L in model.config.moe_layers}
    _, got = model.run_with_cache(ids, fwd_hooks=iv.zero_ablate_experts(model, experts))
    for L in model.config.moe_layers:
        hit = got[moe(L, "topk_idx")] <= 2
        assert bool(hit.any()) and bool((got[moe(L, "topk_weights")][hit] == 0).all())
        assert bool((got[moe(L, "topk_weights")][~hit] > 0).all())


def test_ablating_an_unselected_expert_changes_nothing(model, ids, clean):
    base, c = clean
    L = model.config.moe_layers[-1]
    _, unused = selected_and_unselected(c, model, L)
    assert unused is not None, "every expert is selected; use a shorter input"
    assert torch.equal(model.run_with_hooks(ids, fwd_hooks=iv.zero_ablate_experts(model, {L: [unused]})), base)
    assert torch.equal(model.run_with_hooks(ids, fwd_hooks=iv.reroute_ablate_experts(model, {L: [unused]})), base)


# ----------------------------------------------------------------------------- reroute ablation
def test_reroute_picks_next_best_and_keeps_probs(model, ids, clean):
    _, c = clean
    L = model.config.moe_layers[0]
    e, _ = selected_and_unselected(c, model, L)
    names = [moe(L, p) for p in ("router_probs", "topk_idx", "topk_weights")]
    _, got = model.run_with_cache(ids, names_filter=names, fwd_hooks=iv.reroute_ablate_experts(model, {L: [e]}))
    idx, w, probs = got[moe(L, "topk_idx")], got[moe(L, "topk_weights")], got[moe(L, "router_probs")]
    assert not bool((idx == e).any())
    assert torch.equal(probs, c[moe(L, "router_probs")])  # caches show the real router
    chosen = probs.gather(-1, idx)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(w.sum(-1), torch.ones(BATCH, POS))


def test_reroute_equals_a_model_that_cannot_select_the_expert(model, ids, clean):
    _, c = clean
    L = model.config.moe_layers[0]
    e, _ = selected_and_unselected(c, model, L)
    rerouted = model.run_with_hooks(ids, fwd_hooks=iv.reroute_ablate_experts(model, {L: [e]}))
    twin = ErnieMoE(model.config, init=False)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():  # selection only: weights still come from the unbiased probs
        twin.blocks[L].mlp.moe_statics.e_score_correction_bias[0, e] = float("-inf")
    torch.testing.assert_close(rerouted, twin.eval()(ids), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(rerouted, model(ids), atol=1e-4)


def test_reroute_limits(model, ids):
    E, k = model.config.moe_num_experts, model.config.moe_k
    L = model.config.moe_layers[1]
    with pytest.raises(ValueError, match="at most"):
        iv.reroute_ablate_experts(model, {L: range(E - k + 1)})
    _, got = model.run_with_cache(ids, fwd_hooks=iv.reroute_ablate_experts(model, {L: range(E - k)}))
    assert bool((got[moe(L, "topk_idx")] >= E - k).all())


@pytest.mark.parametrize("fn", [iv.zero_ablate_experts, iv.reroute_ablate_experts])
def test_expert_arguments_are_validated(model, fn):
    with pytest.raises(ValueError, match="not a MoE layer"):
        fn(model, {0: [1]})  # layer 0 is dense
    with pytest.raises(ValueError, match="out of range"):
        fn(model, {1: [model.config.moe_num_experts]})


# ----------------------------------------------------------------------------- mean ablation
def test_mean_ablate_replaces_activation(model, ids, clean):
    _, c = clean
    name = "blocks.1.hook_resid_mid"
    mean = torch.randn(model.config.hidden_size)
    _, got = model.run_with_cache(ids, names_filter=name, fwd_hooks=iv.mean_ablate(model, name, mean))
    assert torch.equal(got[name], mean.expand(BATCH, POS, -1))
    _, got = model.run_with_cache(
        ids, names_filter=name, fwd_hooks=iv.mean_ablate(model, name, mean, positions=[2, -1])
    )
    edited = torch.zeros(POS, dtype=torch.bool)
    edited[[2, POS - 1]] = True
    assert torch.equal(got[name][:, edited], mean.expand(BATCH, 2, -1))
    assert torch.equal(got[name][:, ~edited], c[name][:, ~edited])
    z_mean = torch.randn(model.config.num_attention_heads, model.config.d_head)
    _, got = model.run_with_cache(
        ids, names_filter="blocks.0.attn.hook_z", fwd_hooks=iv.mean_ablate(model, "*.hook_z", z_mean)
    )
    assert torch.equal(got["blocks.0.attn.hook_z"], z_mean.expand(BATCH, POS, -1, -1))


def test_mean_ablating_the_whole_input_makes_every_position_alike(model, ids):
    mean = torch.randn(model.config.hidden_size)
    logits = model.run_with_hooks(ids, fwd_hooks=iv.mean_ablate(model, "blocks.0.hook_resid_pre", mean))
    torch.testing.assert_close(logits, logits[:1, :1].expand_as(logits), atol=1e-5, rtol=1e-5)


def test_mean_of_wrong_shape_names_the_hook(model, ids):
    with pytest.raises(HookError, match=r"blocks\.1\.hook_resid_mid"):
        model.run_with_hooks(ids, fwd_hooks=iv.mean_ablate(model, "blocks.1.hook_resid_mid", torch.ones(3)))


def test_expert_mean_outputs_by_hand(model, ids, clean):
    _, c = clean
    L = model.config.moe_layers[-1]
    e, unused = selected_and_unselected(c, model, L)
    assert unused is not None
    means = iv.expert_mean_outputs(model, ids, {L: [e, unused]})
    x = model.blocks[L].post_attention_layernorm(c[f"blocks.{L}.hook_resid_mid"])  # [batch pos d_model]
    where = (c[moe(L, "topk_idx")] == e).any(-1)
    with torch.no_grad():
        torch.testing.assert_close(means[(L, e)], run_expert(model, L, e, x[where]).mean(0), atol=1e-5, rtol=1e-5)
        fallback = run_expert(model, L, unused, x.flatten(0, 1)).mean(0)  # never selected: mean over all tokens
    torch.testing.assert_close(means[(L, unused)], fallback, atol=1e-5, rtol=1e-5)


def test_expert_mean_outputs_ignore_padding(model, ids):
    L, e = model.config.moe_layers[0], 4
    pad = 3
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[1, :pad], mask[1, :pad] = 0, 0
    got = iv.expert_mean_outputs(model, padded, [(L, e)], attention_mask=mask)[(L, e)]
    outs = []
    for row in (ids[0], ids[1, pad:]):
        _, c = model.run_with_cache(row[None], names_filter=[moe(L, "topk_idx"), moe(L, "expert_out")])
        outs.append(c[moe(L, "expert_out")][c[moe(L, "topk_idx")] == e])
    torch.testing.assert_close(got, torch.cat(outs).mean(0), atol=1e-5, rtol=1e-5)


def test_mean_ablate_experts_replaces_selected_slots(model, ids, corrupt):
    L = model.config.moe_layers[0]
    means = iv.expert_mean_outputs(model, corrupt, {L: [4, 5]})
    names = [moe(L, "expert_out"), moe(L, "topk_idx")]
    _, got = model.run_with_cache(ids, names_filter=names, fwd_hooks=iv.mean_ablate_experts(model, means))
    _, ref = model.run_with_cache(ids, names_filter=names)
    idx, out = got[moe(L, "topk_idx")], got[moe(L, "expert_out")]
    for e in (4, 5):
        hit = idx == e
        assert bool(hit.any()) and torch.equal(out[hit], means[(L, e)].expand(int(hit.sum()), -1))
    other = (idx != 4) & (idx != 5)
    assert torch.equal(out[other], ref[moe(L, "expert_out")][other])
    with pytest.raises(ValueError, match="d_model"):
        iv.mean_ablate_experts(model, {(L, 4): torch.zeros(3)})


# ----------------------------------------------------------------------------- patching
def test_patch_clean_into_clean_changes_nothing(model, ids, clean):
    base, c = clean
    assert torch.equal(model.run_with_hooks(ids, fwd_hooks=iv.patch_from_cache(model, c, list(c.keys()))), base)


def test_patch_all_of_resid_pre_restores_clean_logits(model, corrupt, clean):
    base, c = clean
    patched = model.run_with_hooks(corrupt, fwd_hooks=iv.patch_from_cache(model, c, "blocks.0.hook_resid_pre"))
    assert torch.equal(patched, base)
    assert not torch.allclose(model(corrupt), base)


def test_patch_positions_respect_causality(model, corrupt, clean):
    base, c = clean
    corrupted = model(corrupt)
    p = 4
    name = "blocks.2.hook_resid_pre"
    patched = model.run_with_hooks(corrupt, fwd_hooks=iv.patch_from_cache(model, c, name, positions=[p]))
    # earlier positions see nothing new (not bitwise: each expert's matmul covers other rows now)
    torch.testing.assert_close(patched[:, :p], corrupted[:, :p], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(patched[:, p], corrupted[:, p])
    every = model.run_with_hooks(
        corrupt, fwd_hooks=iv.patch_from_cache(model, c, "blocks.2.hook_resid_pre", positions=range(POS))
    )
    assert torch.equal(every, base)


@pytest.mark.parametrize(("name", "index"), [("blocks.1.attn.hook_z", 2), ("blocks.1.moe.hook_topk_weights", 1)])
def test_patch_index_selects_head_or_slot(model, corrupt, clean, name, index):
    _, c = clean
    _, ref = model.run_with_cache(corrupt, names_filter=name)
    _, got = model.run_with_cache(
        corrupt, names_filter=name, fwd_hooks=iv.patch_from_cache(model, c, name, index=index)
    )
    assert torch.equal(got[name][:, :, index], c[name][:, :, index])
    others = [i for i in range(got[name].shape[2]) if i != index]
    assert torch.equal(got[name][:, :, others], ref[name][:, :, others])


def test_patch_names_and_errors(model, ids, clean):
    _, c = clean
    names = [n for n, _ in iv.patch_from_cache(model, c, ["blocks.*.moe.hook_topk_idx", "hook_embed"])]
    assert names == [moe(L, "topk_idx") for L in model.config.moe_layers] + ["hook_embed"]
    with pytest.raises(KeyError, match="hook_resid_pre"):
        iv.patch_from_cache(model, c, "blocks.0.hook_resid_pr")
    with pytest.raises(KeyError):
        iv.patch_from_cache(model, c, "blocks.*.hook_nothing")
    short = ids[:, :5]
    with pytest.raises(HookError, match=r"blocks\.1\.hook_attn_out"):
        model.run_with_hooks(short, fwd_hooks=iv.patch_from_cache(model, c, "blocks.1.hook_attn_out"))
    one = ids[:, :1]  # a single-position call is a decode step: the full-sequence cache does not apply
    assert torch.equal(
        model.run_with_hooks(one, fwd_hooks=iv.patch_from_cache(model, c, "blocks.1.hook_attn_out")), model(one)
    )


# ----------------------------------------------------------------------------- steering
def test_steering_adds_the_vector(model, ids, clean):
    _, c = clean
    last = model.config.num_hidden_layers - 1
    v, scale = torch.randn(model.config.hidden_size), 2.5
    names = [f"blocks.{last}.hook_resid_post", "ln_final.hook_normalized", "blocks.1.hook_resid_post"]
    hooks = iv.add_steering_vector(model, f"blocks.{last}.hook_resid_post", v, scale)
    _, got = model.run_with_cache(ids, names_filter=names, fwd_hooks=hooks)
    steered = c[f"blocks.{last}.hook_resid_post"] + scale * v
    torch.testing.assert_close(got[names[0]], steered)
    torch.testing.assert_close(got[names[1]], model.model.norm(steered))
    assert torch.equal(got["blocks.1.hook_resid_post"], c["blocks.1.hook_resid_post"])  # upstream untouched


def test_steering_positions_and_decode_rule(model, ids, clean):
    _, c = clean
    name = "blocks.1.hook_resid_mid"
    v = torch.randn(model.config.hidden_size)
    _, got = model.run_with_cache(
        ids, names_filter=name, fwd_hooks=iv.add_steering_vector(model, name, v, positions=[1, 3])
    )
    delta = got[name] - c[name]
    torch.testing.assert_close(delta[:, [1, 3]], v.expand(BATCH, 2, -1))
    assert torch.equal(delta[:, [0, 2, 4, 5, 6]], torch.zeros(BATCH, 5, v.shape[0]))
    one = ids[:, :1]
    assert torch.equal(
        model.run_with_hooks(one, fwd_hooks=iv.add_steering_vector(model, name, v, positions=[0])), model(one)
    )
    assert not torch.equal(
        model.run_with_hooks(one, fwd_hooks=iv.add_steering_vector(model, name, v, positions=[-1])), model(one)
    )
    with pytest.raises(HookError, match=name.replace(".", r"\.")):
        model.run_with_hooks(ids, fwd_hooks=iv.add_steering_vector(model, name, torch.ones(5)))


# ----------------------------------------------------------------------------- forced routing
def test_force_routing(model, ids):
    L, forced = model.config.moe_layers[1], [6, 3]
    _, got = model.run_with_cache(ids, fwd_hooks=iv.force_routing(model, L, forced))
    assert torch.equal(got[moe(L, "topk_idx")], torch.tensor(forced).expand(BATCH, POS, -1))
    chosen = got[moe(L, "router_probs")][..., forced]
    torch.testing.assert_close(got[moe(L, "topk_weights")], chosen / chosen.sum(-1, keepdim=True))
    _, got = model.run_with_cache(ids, fwd_hooks=iv.force_routing(model, L, forced, weights=[0.25, 0.75]))
    assert torch.equal(got[moe(L, "topk_weights")], torch.tensor([0.25, 0.75]).expand(BATCH, POS, -1))
    x = model.blocks[L].post_attention_layernorm(got[f"blocks.{L}.hook_resid_mid"])
    with torch.no_grad():
        torch.testing.assert_close(got[moe(L, "expert_out")][:, :, 0], run_expert(model, L, 6, x))
    with pytest.raises(ValueError, match="moe_k"):
        iv.force_routing(model, L, [1])
    with pytest.raises(ValueError, match="weights"):
        iv.force_routing(model, L, [1, 2], weights=[1.0])


def test_every_intervention_takes_the_model_first(model, clean):
    _, c = clean
    v = torch.zeros(model.config.hidden_size)
    calls = {
        "mean_ablate": lambda m: iv.mean_ablate(m, "blocks.0.hook_resid_pre", v),
        "add_steering_vector": lambda m: iv.add_steering_vector(m, "blocks.0.hook_resid_pre", v),
        "patch_from_cache": lambda m: iv.patch_from_cache(m, c, "blocks.0.hook_resid_pre"),
        "zero_ablate_experts": lambda m: iv.zero_ablate_experts(m, {1: [0]}),
        "reroute_ablate_experts": lambda m: iv.reroute_ablate_experts(m, {1: [0]}),
        "force_routing": lambda m: iv.force_routing(m, 1, list(range(model.config.moe_k))),
    }
    for name, call in calls.items():
        assert call(model), name
        with pytest.raises(TypeError, match="first argument must be the model"):
            call("blocks.0.hook_resid_pre")  # the name where the model belongs: named, not an AttributeError
    with pytest.raises(KeyError, match="hook_resid_pr"):  # an unknown hook name fails at the call
        iv.add_steering_vector(model, "blocks.0.hook_resid_pr", v)
