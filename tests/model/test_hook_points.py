"""Hook points: names, shapes, cache consistency, edits that propagate, exception safety, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.ernie import ErnieMoE
from ernie_lab.model.hook_points import HookError

# the README's hook table, written out independently of model.hook_shape
ATTN = {
    "hook_q": "batch pos head d_head",
    "hook_k": "batch pos kv_head d_head",
    "hook_v": "batch pos kv_head d_head",
    "hook_rot_q": "batch pos head d_head",
    "hook_rot_k": "batch pos kv_head d_head",
    "hook_attn_scores": "batch head pos kv_pos",
    "hook_pattern": "batch head pos kv_pos",
    "hook_z": "batch pos head d_head",
}
DENSE = {"hook_pre": "batch pos d_ff", "hook_post": "batch pos d_ff"}
MOE = {
    "hook_router_logits": "batch pos expert",
    "hook_router_probs": "batch pos expert",
    "hook_topk_idx": "batch pos topk",
    "hook_topk_weights": "batch pos topk",
    "hook_expert_post": "batch pos topk d_expert",
    "hook_expert_out": "batch pos topk d_model",
    "hook_routed_out": "batch pos d_model",
    "hook_shared_out": "batch pos d_model",
}
RESID = "batch pos d_model"
COSTLY = ("attn.hook_attn_scores", "attn.hook_pattern", "moe.hook_expert_post", "moe.hook_expert_out")
BATCH, POS = 2, 7


def design_names(cfg: ErnieConfig) -> dict[str, str]:
    """name -> axis words, in forward order."""
    out = {"hook_embed": RESID}
    for L in range(cfg.num_hidden_layers):
        out[f"blocks.{L}.hook_resid_pre"] = RESID
        out.update({f"blocks.{L}.attn.{n}": s for n, s in ATTN.items()})
        out[f"blocks.{L}.hook_attn_out"] = RESID
        out[f"blocks.{L}.hook_resid_mid"] = RESID
        if cfg.is_moe_layer(L):
            out.update({f"blocks.{L}.moe.{n}": s for n, s in MOE.items()})
        else:
            out.update({f"blocks.{L}.mlp.{n}": s for n, s in DENSE.items()})
        out[f"blocks.{L}.hook_mlp_out"] = RESID
        out[f"blocks.{L}.hook_resid_post"] = RESID
    out["ln_final.hook_normalized"] = RESID
    out["hook_logits"] = "batch pos vocab"
    return out


def axis_sizes(cfg: ErnieConfig) -> dict[str, int]:
    return dict(
        batch=BATCH,
        pos=POS,
        kv_pos=POS,
        d_model=cfg.hidden_size,
        head=cfg.num_attention_heads,
        kv_head=cfg.num_key_value_heads,
        d_head=cfg.d_head,
        expert=cfg.moe_num_experts,
        topk=cfg.moe_k,
        d_ff=cfg.intermediate_size,
        d_expert=cfg.moe_intermediate_size,
        vocab=cfg.vocab_size,
    )


@pytest.fixture(scope="module")
def model() -> ErnieMoE:
    return tiny_model(bias_std=0.1)


@pytest.fixture(scope="module")
def ids(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (BATCH, POS), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def full(model, ids):
    return model.run_with_cache(ids)


def clone(model: ErnieMoE) -> ErnieMoE:
    """A copy with its own weights (copy.deepcopy cannot copy ErnieConfig's read-only ``extra``)."""
    twin = ErnieMoE(model.config, init=False)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def moe_input(model, cache, L: int) -> torch.Tensor:
    return model.blocks[L].post_attention_layernorm(cache[f"blocks.{L}.hook_resid_mid"])


def run_expert(model, L: int, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of layer ``L`` written out from its stacked weights."""
    ex = model.blocks[L].mlp.experts
    gate, up = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ ex.down_proj[e]


# ----------------------------------------------------------------------------- names and shapes
def test_names_are_design_names_in_forward_order(model, ids):
    expected = design_names(model.config)
    assert model.hook_names() == list(expected)
    fired = []
    with model.hooks([(lambda n: True, lambda x, hook: fired.append(hook.name))]):
        model(ids)
    assert fired == list(expected)
    assert model.hook_dict["blocks.2.moe.hook_topk_idx"].layer == 2
    assert model.hook_dict["hook_embed"].layer is None


def test_shapes_match_design_and_hook_shape(model, ids, full):
    _, cache = full
    sizes = axis_sizes(model.config)
    assert list(cache) == model.hook_names()
    for name, axes in design_names(model.config).items():
        shape = tuple(sizes[a] for a in axes.split())
        assert tuple(cache[name].shape) == shape, name
        assert model.hook_shape(name, BATCH, POS) == (shape, cache[name].dtype), name
    assert cache["blocks.1.moe.hook_topk_idx"].dtype == torch.int64
    assert cache["blocks.1.moe.hook_router_logits"].dtype == torch.float32


@pytest.mark.parametrize("names", [None, "blocks.*.moe.*", ["hook_logits", "blocks.0.attn.hook_pattern"]])
def test_cache_size_equals_cache_bytes(model, ids, names):
    _, cache = model.run_with_cache(ids, names_filter=names)
    assert model.cache_size(ids, names) == cache.nbytes > 0


def test_cache_size_in_bf16_keeps_fp32_router(model, ids):
    half = clone(model).to(torch.bfloat16)
    _, cache = half.run_with_cache(ids)
    assert cache["blocks.1.hook_resid_post"].dtype == torch.bfloat16
    assert cache["blocks.1.moe.hook_router_probs"].dtype == torch.float32
    assert half.cache_size(ids) == cache.nbytes


def test_stack_over_moe_layers(model, full):
    _, cache = full
    stacked = cache.stack("moe.hook_router_probs")
    moe_layers = model.config.moe_layers
    assert stacked.shape == (len(moe_layers), BATCH, POS, model.config.moe_num_experts)
    assert cache.layers("moe.hook_router_probs") == moe_layers
    for i, L in enumerate(moe_layers):
        assert torch.equal(stacked[i], cache[f"blocks.{L}.moe.hook_router_probs"])
    assert cache.stack("hook_resid_pre").shape[0] == model.config.num_hidden_layers
    with pytest.raises(KeyError):
        cache.stack("moe.hook_nothing")


# ----------------------------------------------------------------------------- internal consistency
def test_residual_and_moe_sums(model, full):
    _, c = full
    for L in range(model.config.num_hidden_layers):
        b = f"blocks.{L}."
        torch.testing.assert_close(c[b + "hook_resid_mid"], c[b + "hook_resid_pre"] + c[b + "hook_attn_out"])
        torch.testing.assert_close(c[b + "hook_resid_post"], c[b + "hook_resid_mid"] + c[b + "hook_mlp_out"])
    for L in model.config.moe_layers:
        m = f"blocks.{L}.moe."
        mixed = (c[m + "hook_topk_weights"][..., None] * c[m + "hook_expert_out"]).sum(-2)
        torch.testing.assert_close(c[m + "hook_routed_out"], mixed, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c[f"blocks.{L}.hook_mlp_out"], c[m + "hook_routed_out"] + c[m + "hook_shared_out"])


def test_router_selection_and_weights(model, full):
    _, c = full
    for L in model.config.moe_layers:
        m = f"blocks.{L}.moe."
        probs, idx, w = c[m + "hook_router_probs"], c[m + "hook_topk_idx"], c[m + "hook_topk_weights"]
        torch.testing.assert_close(probs, c[m + "hook_router_logits"].softmax(-1))
        torch.testing.assert_close(w.sum(-1), torch.ones(BATCH, POS))
        bias = model.blocks[L].mlp.moe_statics.e_score_correction_bias.squeeze(0)
        biased = (probs + bias).topk(model.config.moe_k, dim=-1).indices
        assert torch.equal(idx.sort(-1).values, biased.sort(-1).values)
        chosen = probs.gather(-1, idx)
        torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True))


def test_expert_outputs_are_the_selected_experts(model, full):
    _, c = full
    L = model.config.moe_layers[0]
    x = moe_input(model, c, L)
    idx, out = c[f"blocks.{L}.moe.hook_topk_idx"], c[f"blocks.{L}.moe.hook_expert_out"]
    for b in range(BATCH):
        for p in range(POS):
            for j in range(model.config.moe_k):
                torch.testing.assert_close(out[b, p, j], run_expert(model, L, int(idx[b, p, j]), x[b, p]))


def test_attention_pattern_and_z(model, full):
    _, c = full
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for L in range(model.config.num_hidden_layers):
        a = f"blocks.{L}.attn."
        pattern = c[a + "hook_pattern"]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        future = torch.ones(POS, POS, dtype=torch.bool).triu(1)
        assert bool((pattern[..., future] == 0).all())
        torch.testing.assert_close(pattern, c[a + "hook_attn_scores"].softmax(-1))
        v = c[a + "hook_v"].repeat_interleave(group, dim=2)  # [batch kv_pos head d_head]
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        torch.testing.assert_close(c[a + "hook_z"], z, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- identity hooks, paths
def test_identity_hooks_everywhere_change_nothing(model, ids):
    base = model(ids)
    cheap = [n for n in model.hook_names() if not n.endswith(COSTLY)]
    assert torch.equal(model.run_with_hooks(ids, fwd_hooks=[(n, lambda x, hook: x) for n in cheap]), base)
    everything = model.run_with_hooks(ids, fwd_hooks=[(lambda n: True, lambda x, hook: x.clone())])
    torch.testing.assert_close(everything, base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("suffix", COSTLY)
def test_costly_point_takes_explicit_path_with_same_logits(model, ids, suffix):
    base = model(ids)
    calls = []
    got = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.*.{suffix}", lambda x, hook: calls.append(hook.name))])
    torch.testing.assert_close(got, base, atol=1e-5, rtol=1e-5)
    assert len(calls) == len(model.config.moe_layers if "moe" in suffix else range(model.config.num_hidden_layers))


def test_unhooked_and_cheap_hooks_take_fast_path(model, ids, monkeypatch):
    from ernie_lab.model.layers import Attention
    from ernie_lab.model.moe import MoE

    def refuse(*args, **kwargs):
        raise AssertionError("explicit path taken")

    monkeypatch.setattr(MoE, "_routed_explicit", refuse)
    monkeypatch.setattr(Attention, "_explicit", refuse)
    model(ids)
    cheap = [n for n in model.hook_names() if not n.endswith(COSTLY)]
    model.run_with_cache(ids, names_filter=cheap)
    with pytest.raises(AssertionError, match="explicit path"):
        model.run_with_cache(ids, names_filter="blocks.1.moe.hook_expert_out")


# ----------------------------------------------------------------------------- edits propagate
def test_zero_weight_equals_zero_expert_out(model, ids, full):
    _, c = full
    L, slot = model.config.moe_layers[0], 1
    mask = torch.zeros(BATCH, POS, model.config.moe_k, dtype=torch.bool)
    mask[0, 2:, slot] = True
    mask[1, :3, 0] = True
    by_weight = model.run_with_hooks(
        ids, fwd_hooks=[(f"blocks.{L}.moe.hook_topk_weights", lambda w, hook: w.masked_fill(mask, 0.0))]
    )
    by_output = model.run_with_hooks(
        ids, fwd_hooks=[(f"blocks.{L}.moe.hook_expert_out", lambda o, hook: o.masked_fill(mask[..., None], 0.0))]
    )
    torch.testing.assert_close(by_weight, by_output, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(by_weight, c["hook_logits"], atol=1e-3)


def test_unselected_expert_is_irrelevant(model, ids, full):
    _, c = full
    L = model.config.moe_layers[-1]
    selected = set(c[f"blocks.{L}.moe.hook_topk_idx"].flatten().tolist())
    unused = [e for e in range(model.config.moe_num_experts) if e not in selected]
    assert unused, "test input selects every expert; use a shorter one"
    e = unused[0]
    seen = {}

    def zero_e(out, hook):  # zero the expert's output slots wherever it is selected (nowhere)
        return out.masked_fill((seen["idx"] == e)[..., None], 0.0)

    zeroed = model.run_with_hooks(
        ids,
        fwd_hooks=[
            (f"blocks.{L}.moe.hook_topk_idx", lambda idx, hook: seen.update(idx=idx)),
            (f"blocks.{L}.moe.hook_expert_out", zero_e),
        ],
    )
    # same (explicit) expert path without the edit: bitwise equal
    explicit = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{L}.moe.hook_expert_out", lambda o, hook: o)])
    assert torch.equal(zeroed, explicit)
    broken = clone(model)
    with torch.no_grad():
        broken.blocks[L].mlp.experts.down_proj[e].fill_(1e3)
        broken.blocks[L].mlp.experts.gate_up_proj[e].normal_()
    assert torch.equal(broken(ids), model(ids))  # fast path: its weights are never read


def test_editing_topk_idx_reroutes(model, ids):
    L, E = model.config.moe_layers[0], model.config.moe_num_experts
    shifted = lambda idx, hook: (idx + 3) % E
    _, c = model.run_with_cache(ids, fwd_hooks=[(f"blocks.{L}.moe.hook_topk_idx", shifted)])
    _, clean = model.run_with_cache(ids, names_filter=f"blocks.{L}.moe.hook_topk_idx")
    idx = c[f"blocks.{L}.moe.hook_topk_idx"]
    assert torch.equal(idx, (clean[f"blocks.{L}.moe.hook_topk_idx"] + 3) % E)
    x = moe_input(model, c, L)
    out = c[f"blocks.{L}.moe.hook_expert_out"]
    for b, p, j in [(0, 0, 0), (0, 4, 1), (1, 6, 0), (1, 3, 1)]:
        torch.testing.assert_close(out[b, p, j], run_expert(model, L, int(idx[b, p, j]), x[b, p]))
    chosen = c[f"blocks.{L}.moe.hook_router_probs"].gather(-1, idx)  # weights re-gathered for new experts
    torch.testing.assert_close(c[f"blocks.{L}.moe.hook_topk_weights"], chosen / chosen.sum(-1, keepdim=True))


@pytest.mark.parametrize("bad", [-1, 99])  # the tiny preset has fewer than 99 experts
def test_rerouting_to_a_missing_expert_names_it(model, ids, bad):
    L, E = model.config.moe_layers[0], model.config.moe_num_experts
    name = f"blocks.{L}.moe.hook_topk_idx"
    with pytest.raises(ValueError, match=rf"{name}: expert id {bad} is outside \[0, {E}\)"):
        model.run_with_hooks(ids, fwd_hooks=[(name, lambda idx, hook: torch.full_like(idx, bad))])


def test_editing_topk_weights_remixes(model, ids):
    L = model.config.moe_layers[0]
    new = torch.tensor([0.9, -0.4])
    _, c = model.run_with_cache(
        ids, fwd_hooks=[(f"blocks.{L}.moe.hook_topk_weights", lambda w, hook: new.expand_as(w).clone())]
    )
    m = f"blocks.{L}.moe."
    assert torch.equal(c[m + "hook_topk_weights"], new.expand(BATCH, POS, 2))
    torch.testing.assert_close(c[m + "hook_routed_out"], torch.einsum("bpkd,k->bpd", c[m + "hook_expert_out"], new))


@pytest.mark.parametrize("point", ["hook_router_logits", "hook_router_probs"])
def test_editing_router_changes_selection(model, ids, point):
    L, target = model.config.moe_layers[0], 5

    def favour(x, hook):
        x = x.clone()
        x[..., target] = x.max() + 10.0
        return x

    _, c = model.run_with_cache(ids, fwd_hooks=[(f"blocks.{L}.moe.{point}", favour)])
    assert bool((c[f"blocks.{L}.moe.hook_topk_idx"][..., 0] == target).all())


# ----------------------------------------------------------------------------- registry behaviour
def attached(model) -> int:
    return sum(len(hp.fwd) + len(hp.bwd) for hp in model.hook_dict.values())


def test_raising_hook_leaves_nothing_attached(model, ids):
    def boom(x, hook):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        model.run_with_hooks(ids, fwd_hooks=[("hook_embed", lambda x, hook: None), ("blocks.1.hook_mlp_out", boom)])
    assert attached(model) == 0
    with pytest.raises(KeyError), model.hooks([("hook_embed", boom), ("blocks.1.hook_nope", boom)]):
        pass
    assert attached(model) == 0


def test_nested_hooks_and_handles(model, ids):
    seen = []
    with model.hooks([("hook_embed", lambda x, hook: seen.append("outer"))]):
        with model.hooks([("hook_embed", lambda x, hook: seen.append("inner"))]):
            model(ids)
        model(ids)
    assert seen == ["outer", "inner", "outer"] and attached(model) == 0
    handle = model.add_hook("blocks.*.hook_resid_pre", lambda x, hook: seen.append(hook.name))
    assert attached(model) == model.config.num_hidden_layers
    handle.remove()
    handle.remove()  # idempotent
    assert attached(model) == 0
    model.add_hook("hook_embed", lambda x, hook: None)
    model.add_hook("hook_logits", lambda g, hook: None, dir="bwd")
    model.reset_hooks()
    assert attached(model) == 0
    with pytest.raises(ValueError):
        model.add_hook("hook_embed", lambda x, hook: None, dir="sideways")


def test_unknown_name_lists_close_matches(model):
    with pytest.raises(KeyError, match=r"blocks\.1\.moe\.hook_topk_idx"):
        model.add_hook("blocks.1.moe.hook_topk_ids", lambda x, hook: None)
    with pytest.raises(KeyError, match="no hook point matches"):
        model.resolve_names("blocks.*.moe.hook_nothing")
    assert attached(model) == 0


@pytest.mark.parametrize(
    "bad",
    [
        lambda x, hook: x[..., :-1],
        lambda x, hook: x.double(),
        lambda x, hook: x.float(),  # topk_idx must stay int64
        lambda x, hook: "not a tensor",
    ],
)
def test_bad_hook_output_is_a_hook_error_naming_the_point(model, ids, bad):
    name = "blocks.2.moe.hook_topk_idx"
    with pytest.raises(HookError, match=name.replace(".", r"\.")):
        model.run_with_hooks(ids, fwd_hooks=[(name, bad)])
    assert attached(model) == 0


def test_names_filter_variants(model, ids):
    moe_probs = [f"blocks.{L}.moe.hook_router_probs" for L in model.config.moe_layers]
    cases = {
        "hook_embed": ["hook_embed"],
        "blocks.*.moe.hook_router_probs": moe_probs,
        (moe_probs[1], "hook_embed"): ["hook_embed", moe_probs[1]],  # forward order, not list order
    }
    for spec, expected in cases.items():
        _, cache = model.run_with_cache(ids, names_filter=list(spec) if isinstance(spec, tuple) else spec)
        assert list(cache) == expected
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"))
    assert list(cache) == [f"blocks.{L}.attn.hook_z" for L in range(model.config.num_hidden_layers)]


def test_run_with_cache_device_and_dtype(model, ids, full):
    _, c32 = full
    _, c64 = model.run_with_cache(ids, device="cpu", dtype=torch.float64)
    assert c64["blocks.1.hook_resid_post"].dtype == torch.float64
    assert c64["blocks.1.moe.hook_topk_idx"].dtype == torch.int64  # indices are never cast
    torch.testing.assert_close(c64["hook_logits"], c32["hook_logits"].double())
    half = c32.to(dtype=torch.float16)
    assert half["hook_embed"].dtype == torch.float16 and half["blocks.2.moe.hook_topk_idx"].dtype == torch.int64


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("via", ["context", "run_with_hooks"])
def test_backward_hook_gets_autograd_gradient(model, ids, via):
    name = "blocks.1.hook_resid_mid"
    kept, grads = {}, []

    def keep(x, hook):
        x.retain_grad()
        kept["x"] = x

    fwd, bwd = [(name, keep)], [(name, lambda g, hook: grads.append(g.clone()))]
    if via == "context":
        with model.hooks(fwd, bwd):
            model(ids)[:, -1].logsumexp(-1).sum().backward()
    else:
        model.run_with_hooks(ids, fwd_hooks=fwd, bwd_hooks=bwd)[:, -1].logsumexp(-1).sum().backward()
    model.zero_grad()
    assert len(grads) == 1 and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], kept["x"].grad)
    assert attached(model) == 0


def test_backward_hook_can_replace_gradient(model, ids):
    kept = {}

    def keep(x, hook):
        x.retain_grad()
        kept["x"] = x

    with model.hooks(
        fwd_hooks=[("hook_embed", keep)],
        bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook: torch.zeros_like(g))],
    ):
        model(ids).sum().backward()
    model.zero_grad()
    assert torch.equal(kept["x"].grad, torch.zeros_like(kept["x"]))


# ----------------------------------------------------------------------------- padding
def test_left_padding_with_hooks(model, ids):
    pad = 3
    padded = ids.clone()
    padded[0, :pad] = 0
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    names = ["blocks.2.hook_resid_post", "blocks.1.moe.hook_topk_idx", "blocks.0.attn.hook_pattern"]
    logits, c = model.run_with_cache(padded, names_filter=names, attention_mask=mask)
    _, alone = model.run_with_cache(ids[:1, pad:], names_filter=names)
    for n in names[:2]:
        torch.testing.assert_close(c[n][0, pad:], alone[n][0], atol=1e-5, rtol=1e-5)
    pattern = c["blocks.0.attn.hook_pattern"]
    assert bool((pattern[0, :, pad:, :pad] == 0).all())  # real queries ignore padding keys
    torch.testing.assert_close(pattern[0, :, pad:, pad:], alone["blocks.0.attn.hook_pattern"][0])
    explicit = model.run_with_hooks(
        padded, fwd_hooks=[("blocks.*.moe.hook_expert_out", lambda o, hook: o)], attention_mask=mask
    )
    torch.testing.assert_close(explicit, model(padded, attention_mask=mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, model(padded, attention_mask=mask), atol=1e-5, rtol=1e-5)
