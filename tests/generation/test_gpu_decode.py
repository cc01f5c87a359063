"""GPU checks (``pytest -m gpu``, or ``ernie-lab selftest --gpu``): skipped without CUDA.

bf16 parity with transformers on CUDA, the gathered-expert decode path against the sorted path,
CUDA-graph (compiled) decode against eager greedy tokens, and hooks forcing the eager step.
"""

from __future__ import annotations

import pytest
import torch
from conftest import save_hf_checkpoint

from ernie_lab.generation.generate import generate
from ernie_lab.io.weights import load_model

pytestmark = pytest.mark.gpu
STD = 0.4  # peaked logits: no near-tie flips a greedy token


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, fp32 transformers model on CUDA) of one tiny random checkpoint."""
    directory = tmp_path_factory.mktemp("gpu")
    return directory, save_hf_checkpoint(directory, std=STD).to("cuda")


@pytest.fixture(scope="module")
def cuda_pair(checkpoint):
    """(transformers model, our model) from the checkpoint, both bf16 on CUDA."""
    from transformers import Ernie4_5_MoeForCausalLM

    directory = checkpoint[0]
    hf = Ernie4_5_MoeForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to("cuda").eval()
    return hf, load_model(directory, dtype=torch.bfloat16, device="cuda")


def prompt(batch=1, pos=6, seed=0):
    ids = torch.randint(0, 128, (batch, pos), generator=torch.Generator().manual_seed(seed))
    return ids.to("cuda")


def test_bf16_on_cuda_is_as_close_to_fp32_as_transformers(checkpoint, cuda_pair):
    """The rule of tests/model/test_parity.py on CUDA: our bf16 error against the fp32 reference is of
    the size of transformers' own, and argmaxes agree wherever the fp32 top-2 margin is decisive."""
    hf32, (hf, ours) = checkpoint[1], cuda_pair
    ids = prompt(batch=4, pos=32, seed=3)
    with torch.inference_mode():
        ref = hf32(ids).logits
        a, b = ours(ids).float(), hf(ids).logits.float()
    err_ours, err_hf = (a - ref).abs().amax(-1), (b - ref).abs().amax(-1)
    assert err_ours.max() <= 2 * err_hf.max() + 1e-2
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (err_ours + err_hf)
    assert (a.argmax(-1) == b.argmax(-1))[clear].all()
    assert clear.sum() >= clear.numel() // 4  # enough decisive positions for the check to mean something


def test_gathered_expert_decode_equals_sorted_path(cuda_pair):
    from ernie_lab.model.moe import _gathered_experts, _mix

    moe = cuda_pair[1].blocks[1].mlp
    x = torch.randn(2, 1, moe.experts.down_proj.shape[2], device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        idx, weights = moe.route(x)
        weights = weights.to(x.dtype)
        gathered = _gathered_experts(moe.experts, x.view(2, -1), idx.view(2, -1))
        got = _mix(gathered.view(2, 1, *gathered.shape[1:]), weights)
        sorted_path = moe._routed_explicit(x, idx, weights)  # sorts by expert, per-expert matmuls
    torch.testing.assert_close(got, sorted_path, atol=2e-2, rtol=2e-2)


def test_cuda_graph_decode_equals_eager_greedy_tokens(cuda_pair):
    ours = cuda_pair[1]
    ids = prompt()
    eager = generate(ours, ids, max_new_tokens=8)
    assert torch.equal(generate(ours, ids, max_new_tokens=8, compile=True), eager)


def test_hooks_during_compiled_decode_force_the_eager_step(cuda_pair):
    ours = cuda_pair[1]
    ids = prompt()
    calls = []
    hooks = [("blocks.0.hook_resid_post", lambda x, hook: calls.append(x.shape[1]))]
    eager = generate(ours, ids, max_new_tokens=5, fwd_hooks=hooks)
    n_eager = len(calls)
    compiled = generate(ours, ids, max_new_tokens=5, fwd_hooks=hooks, compile=True)
    assert torch.equal(compiled, eager)
    assert len(calls) == 2 * n_eager == 2 * 5  # prefill + 4 decode steps, each time
