"""Cached transposed weight views: never stale, never holding replaced data, never under autograd."""

from __future__ import annotations

import torch
from conftest import tiny_model

from ernie_lab.model.weight_views import _VIEWS, expert_slices, transposed


def test_views_follow_in_place_edits_and_replaced_data():
    """Edited weights give the numbers of the uncached autograd path (plain ``weight.t()``)."""
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    attn, experts = model.blocks[1].self_attn, model.blocks[1].mlp.experts
    with torch.inference_mode():
        base = model(ids)
    with torch.no_grad():
        attn.q_proj.weight.mul_(3.0)
        experts.gate_up_proj.mul_(-1.0)
    with torch.inference_mode():
        edited = model(ids)  # cached views
    assert not torch.equal(edited, base)
    assert torch.equal(edited, model(ids).detach())  # grad enabled: uncached
    attn.q_proj.weight.data = attn.q_proj.weight.data * 0.5
    with torch.inference_mode():
        replaced = model(ids)
    assert torch.equal(replaced, model(ids).detach())


def test_views_are_views_and_autograd_gets_the_parameter():
    model = tiny_model()
    w = model.lm_head.weight
    with torch.no_grad():
        t = transposed(w)
        stacked = model.blocks[1].mlp.experts.gate_up_proj
        last = expert_slices(stacked)[-1]
    assert t.data_ptr() == w.data_ptr() and t.shape == w.shape[::-1] and not t.requires_grad
    assert last.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    assert torch.equal(last, stacked[-1]) and last.shape == stacked.shape[1:]
    assert transposed(w).requires_grad  # grad enabled: w.t(), so gradients reach the parameter
    model(torch.tensor([[1, 2]])).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_moving_or_casting_the_model_drops_the_old_views():
    model = tiny_model()
    with torch.inference_mode():
        model(torch.tensor([[1, 2]]))
    params = list(model.parameters())
    assert any(p in _VIEWS for p in params)
    model.double()
    assert not any(p in _VIEWS for p in params)
    with torch.inference_mode():
        out = model(torch.tensor([[1, 2]]))
    assert out.dtype == torch.float64
    assert torch.allclose(out, model(torch.tensor([[1, 2]])).detach())
