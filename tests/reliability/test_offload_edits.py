"""Offloaded experts follow every edit of the host experts: in-place writes (with or without inference
mode, one expert's slice), ``load_state_dict`` and replaced tensors reach experts already sitting in
device slots, so the offloaded model equals the resident one after the same edits."""

from __future__ import annotations

import pytest
import torch
from conftest import save_hf_checkpoint

import ernie_lab as el

N_EXPERT, SLOTS = 8, 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("offload_edits") / "ckpt"
    save_hf_checkpoint(directory, moe_num_experts=N_EXPERT, moe_k=2)
    return directory


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_slots_follow_edits_of_the_host_experts(ckpt, ids, quantization, tmp_path):
    """In-place edits of ``mlp.experts.*`` (grad-free, under inference mode, one expert's slice),
    ``load_state_dict`` and a replaced tensor all reach experts already sitting in device slots."""
    plain = el.load_model(ckpt, quantization=quantization)
    off = el.load_model(ckpt, quantization=quantization, offload="experts", expert_slots=SLOTS)
    names = off.blocks[1].mlp.experts.names

    def edit_both(fn):
        for model in (plain, off):
            model(ids)  # fills the slots of the offloaded model with the weights before the edit
            fn(model)
        assert torch.equal(off(ids), plain(ids))

    def scale(model):
        with torch.no_grad():
            for L in model.config.moe_layers:
                getattr(model.blocks[L].mlp.experts, names[-1]).mul_(2)

    def zero_expert(model):  # every expert a one-token prompt uses, one slice each
        used = model.run_with_cache(ids[:1, :1], names_filter=lambda n: n.endswith("hook_topk_idx"))[1]
        with torch.inference_mode():
            for name, experts in used.items():
                layer = int(name.split(".")[1])
                stack = getattr(model.blocks[layer].mlp.experts, names[0])
                for e in experts.flatten().tolist():
                    stack[e].zero_()

    def replace(model):
        ex = model.blocks[1].mlp.experts
        old = getattr(ex, names[-1])
        new = old.detach().neg()
        setattr(ex, names[-1], torch.nn.Parameter(new, requires_grad=False) if old.requires_grad else new)

    other = tmp_path / "other"
    save_hf_checkpoint(other, seed=1, moe_num_experts=N_EXPERT, moe_k=2)
    state = el.load_model(other, quantization=quantization).state_dict()
    for fn in (scale, zero_expert, replace, lambda m: m.load_state_dict(state)):
        edit_both(fn)
    prompt = ids[:1, :4]
    assert torch.equal(off.generate(prompt, max_new_tokens=6), plain.generate(prompt, max_new_tokens=6))
