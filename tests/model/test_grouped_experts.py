"""Several tokens run their routed experts through grouped matmuls (one per projection); one token runs
one ``mm`` per selected expert and projection. Both give the same experts, hooks see the same values,
and the stored weights are what runs (in-place edits show through, gradients still flow)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from ernie_lab import ErnieConfig, ErnieMoE

L = 1  # the tiny preset's first MoE layer


def one_at_a_time(moe, x: torch.Tensor) -> torch.Tensor:
    """The MoE block on each token alone (the one-token path), stacked back to ``[batch pos d_model]``."""
    rows = [moe(x[b : b + 1, p : p + 1]) for b in range(x.shape[0]) for p in range(x.shape[1])]
    return torch.cat(rows).view(x.shape)


def odd_width_model() -> ErnieMoE:
    """Expert width 6: rows of 24 bytes, which the grouped kernel refuses (it needs 16-byte multiples)."""
    torch.manual_seed(0)
    return ErnieMoE(ErnieConfig.preset("tiny").replace(moe_intermediate_size=6, initializer_range=0.2)).eval()


@pytest.mark.parametrize("make", [tiny_model, odd_width_model], ids=["grouped", "loop-fallback"])
def test_several_tokens_equal_each_token_alone(make):
    model = make()
    moe = model.blocks[L].mlp
    x = torch.randn(3, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        together, alone = moe(x), one_at_a_time(moe, x)
    assert together.abs().max() > 0
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)  # fp32 round-off of another row count


def test_hooked_and_plain_paths_agree_bit_for_bit():
    """Hooks on the per-expert points take the explicit path; it uses the same kernels as the fast one."""
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    seen = []
    hooks = [(f"blocks.{L}.moe.hook_expert_post", lambda t, hook: seen.append(t.shape) and None)]
    with torch.inference_mode():
        plain = model(ids)
        hooked = model.run_with_hooks(ids, fwd_hooks=hooks)
    assert seen == [torch.Size([2, 7, model.config.moe_k, model.config.moe_intermediate_size])]
    assert torch.equal(plain, hooked)


def test_an_in_place_edit_of_the_stored_weights_shows_through():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    name = f"blocks.{L}.moe.hook_routed_out"
    with torch.inference_mode():
        _, before = model.run_with_cache(ids, names_filter=[name])
    assert before[name].abs().max() > 0
    with torch.no_grad():
        model.blocks[L].mlp.experts.down_proj.zero_()
    with torch.inference_mode():
        _, after = model.run_with_cache(ids, names_filter=[name])
    assert torch.equal(after[name], torch.zeros_like(after[name]))


def test_training_forward_equals_inference_and_reaches_the_expert_weights():
    """With gradients the experts loop (the CPU grouped kernel has no working backward): same numbers."""
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        inference = model(ids)
    training = model(ids)
    torch.testing.assert_close(training.detach(), inference, rtol=1e-5, atol=1e-6)
    training.logsumexp(-1).sum().backward()
    experts = model.blocks[L].mlp.experts
    assert experts.gate_up_proj.grad.abs().sum() > 0 and experts.down_proj.grad.abs().sum() > 0
