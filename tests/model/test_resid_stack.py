"""Residual-stream methods of ActivationCache: known answers against the model's own forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from ernie_lab import ActivationCache
from ernie_lab.model.resid_stack import MissingModelError

BATCH, POS = 2, 7


@pytest.fixture(scope="module")
def model():
    m = tiny_model(bias_std=0.1)
    with torch.no_grad():  # norm weights away from 1, so a missing norm weight shows
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    return m


@pytest.fixture(scope="module")
def run(model):
    ids = torch.randint(0, model.config.vocab_size, (BATCH, POS), generator=torch.Generator().manual_seed(3))
    logits, cache = model.run_with_cache(ids)
    return ids, logits, cache


def last(model) -> int:
    return model.config.num_hidden_layers - 1


def test_accumulated_resid_final_norm_unembed_is_the_logits(model, run):
    _, logits, cache = run
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    n = model.config.num_hidden_layers
    assert labels == [f"{i}_pre" for i in range(n)] + ["final_post"]
    assert stack.shape == (n + 1, BATCH, POS, model.config.hidden_size)
    torch.testing.assert_close(stack[-1] @ model.W_U, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(stack[-1], cache["ln_final.hook_normalized"], rtol=0, atol=1e-6)


def test_accumulated_resid_rows_are_the_cached_residuals(model, run):
    _, _, cache = run
    stack, labels = cache.accumulated_resid(layer=2, incl_mid=True, mlp_input=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid"]
    for row, label in zip(stack, labels, strict=True):
        layer, kind = label.split("_")
        assert torch.equal(row, cache[f"blocks.{layer}.hook_resid_{kind}"])
    at_last = cache.accumulated_resid(pos_slice=-1)
    assert at_last.shape == (model.config.num_hidden_layers + 1, BATCH, model.config.hidden_size)
    assert torch.equal(at_last[-1], cache[f"blocks.{last(model)}.hook_resid_post"][:, -1])


def test_logit_lens_rows_normalise_each_row_by_its_own_scale(model, run):
    _, _, cache = run
    lens = cache.accumulated_resid(apply_ln=True)
    norm = model.model.norm
    for row, raw in zip(lens, cache.accumulated_resid(), strict=True):
        torch.testing.assert_close(row, norm(raw), rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_expert", [False, True])
def test_decompose_resid_sums_to_the_residual(model, run, per_expert):
    _, _, cache = run
    n = model.config.num_hidden_layers
    for layer in range(n + 1):
        target = cache[f"blocks.{layer}.hook_resid_pre"] if layer < n else cache[f"blocks.{n - 1}.hook_resid_post"]
        parts = cache.decompose_resid(layer, per_expert=per_expert)
        torch.testing.assert_close(parts.sum(0), target, atol=1e-5, rtol=0)
    for layer in range(n):
        mid = cache.decompose_resid(layer, mlp_input=True, per_expert=per_expert).sum(0)
        torch.testing.assert_close(mid, cache[f"blocks.{layer}.hook_resid_mid"], atol=1e-5, rtol=0)


def test_decompose_resid_labels_split_moe_layers(model, run):
    _, _, cache = run
    cfg = model.config
    _, labels = cache.decompose_resid(return_labels=True)
    expected = ["embed"]
    for L in range(cfg.num_hidden_layers):
        expected.append(f"{L}_attn_out")
        expected += [f"{L}_shared_out", f"{L}_routed_out"] if cfg.is_moe_layer(L) else [f"{L}_mlp_out"]
    assert labels == expected
    stack, labels = cache.decompose_resid(per_expert=True, return_labels=True)
    L = cfg.moe_layers[0]
    experts = [i for i, lab in enumerate(labels) if lab.startswith(f"{L}_E")]
    assert len(experts) == cfg.moe_num_experts
    # an expert no token chose contributes exactly zero; the chosen ones sum to routed_out
    chosen = set(cache[f"blocks.{L}.moe.hook_topk_idx"].flatten().tolist())
    for e, i in enumerate(experts):
        assert bool(stack[i].any()) == (e in chosen)
    torch.testing.assert_close(stack[experts].sum(0), cache[f"blocks.{L}.moe.hook_routed_out"], atol=1e-6, rtol=0)
    attn = cache.decompose_resid(mode="attn", incl_embeds=False)
    assert attn.shape[0] == cfg.num_hidden_layers


def test_apply_ln_to_stack_is_linear_with_the_cached_scale(model, run):
    _, _, cache = run
    parts = cache.apply_ln_to_stack(cache.decompose_resid())
    torch.testing.assert_close(parts.sum(0), cache["ln_final.hook_normalized"], atol=1e-5, rtol=0)
    L = 1
    block = model.blocks[L]
    pre = cache.apply_ln_to_stack(cache.decompose_resid(L), layer=L).sum(0)
    torch.testing.assert_close(pre, block.input_layernorm(cache[f"blocks.{L}.hook_resid_pre"]), atol=1e-5, rtol=0)
    mid = cache.apply_ln_to_stack(cache.decompose_resid(L, mlp_input=True), layer=L, mlp_input=True).sum(0)
    want = block.post_attention_layernorm(cache[f"blocks.{L}.hook_resid_mid"])
    torch.testing.assert_close(mid, want, atol=1e-5, rtol=0)
    one = cache.apply_ln_to_stack(cache.decompose_resid(pos_slice=[2, 4]), pos_slice=[2, 4]).sum(0)
    torch.testing.assert_close(one, cache["ln_final.hook_normalized"][:, [2, 4]], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pos_slice"):
        cache.apply_ln_to_stack(cache.decompose_resid(pos_slice=[2, 4]))


def test_logit_attrs_sum_to_the_logits(model, run):
    ids, logits, cache = run
    stack = cache.decompose_resid()
    attrs = cache.logit_attrs(stack, ids)  # [component batch pos]: each position's own input token
    assert attrs.shape == (stack.shape[0], BATCH, POS)
    torch.testing.assert_close(attrs.sum(0), logits.gather(-1, ids[..., None])[..., 0], atol=1e-5, rtol=0)
    right, wrong = ids[:, 0], ids[:, 1]  # one token per batch row, at every position
    diff = cache.logit_attrs(stack, right, incorrect_tokens=wrong).sum(0)
    want = logits.gather(-1, right[:, None, None].expand(BATCH, POS, 1)) - logits.gather(
        -1, wrong[:, None, None].expand(BATCH, POS, 1)
    )
    torch.testing.assert_close(diff, want[..., 0], atol=1e-5, rtol=0)
    single = cache.logit_attrs(stack[:, :, -1], 5, pos_slice=-1).sum(0)
    torch.testing.assert_close(single, logits[:, -1, 5], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(stack, right, incorrect_tokens=ids)


def test_cache_without_model_names_the_fix(run):
    _, _, cache = run
    bare = ActivationCache(dict(cache.items()))
    assert torch.equal(bare.accumulated_resid(), cache.accumulated_resid())  # no weights needed
    with pytest.raises(MissingModelError, match="ActivationCache.load"):
        bare.accumulated_resid(apply_ln=True)
    with pytest.raises(MissingModelError, match="logit_attrs"):
        bare.logit_attrs(bare.decompose_resid(), 3)


@pytest.mark.parametrize("layer", [-2, 99, 1.0, True])
def test_bad_layer_is_a_named_error(run, layer):
    with pytest.raises(ValueError, match="layer must be an int"):
        run[2].accumulated_resid(layer=layer)
