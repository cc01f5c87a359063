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
def cuda_pair(tmp_path_factory):
    """(transformers model, our model) from one tiny checkpoint, both bf16 on CUDA."""
    directory = tmp_path_factory.mktemp("gpu")
    hf = save_hf_checkpoint(directory, std=STD)
    return hf.to("cuda", torch.bfloat16), load_model(directory, dtype=torch.bfloat16, device="cuda")


def prompt(batch=1, pos=6, seed=0):
    ids = torch.randint(0, 128, (batch, pos), generator=torch.Generator().manual_seed(seed))
    return ids.to("cuda")


def test_bf16_logits_and_greedy_match_transformers_on_cuda(cuda_pair):
    hf, ours = cuda_pair
    ids = prompt(batch=2, pos=8)
    with torch.inference_mode():
        ref, got = hf(ids).logits.float(), ours(ids).float()
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() >= 0.95
    torch.testing.assert_close(got, ref, atol=0.1, rtol=0.05)


def test_gathered_expert_decode_equals_sorted_path(cuda_pair):
    from ernie_lab.model.moe import _gathered_experts, _mix

    moe = cuda_pair[1].blocks[1].mlp
    x = torch.randn(2, 1, moe.experts.down_proj.shape[1], device="cuda", dtype=torch.bfloat16)
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
