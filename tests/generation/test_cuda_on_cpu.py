"""CUDA-only logic proven on the CPU, before it meets a GPU.

(a) The CUDA-graph decode step runs under a fake ``torch.cuda`` (``tests/fake_cuda.py``: a capture
records ops and undoes them, a replay reruns them on the same tensors) and gives eager's greedy tokens:
fp32, padded batches, hooks attached mid-stream. (b) One graph-path decode step per model variant runs
on the meta device, where any host sync (``.item()``, ``.tolist()``, ``nonzero``, ``unique``) fails;
variants that cannot be captured must be refused. (c) Offloaded experts copy into their slots on a side
stream that waits for the compute stream and is waited for. (d) int8 quantization calls no CUDA kernel
with a dtype it rejects.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from conftest import save_hf_checkpoint
from fake_cuda import FakeCuda, HostSyncInCapture

import ernie_lab as el
from ernie_lab.generation.cuda_graph import graph_refusal
from ernie_lab.model import moe
from ernie_lab.model.kv_cache import KVCache
from ernie_lab.model.offload import offload_experts
from ernie_lab.model.quant import int8_rows, quantize_model, quantize_modules

gen = importlib.import_module("ernie_lab.generation.generate")  # the module (the package exports the function)
STD = 0.4  # peaked logits: no near-tie flips a greedy token between the two expert paths


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cuda_on_cpu") / "ckpt"
    save_hf_checkpoint(directory, std=STD, moe_num_experts=8, moe_k=2)
    return directory


@pytest.fixture
def fake_cuda(monkeypatch):
    """A fake torch.cuda, our model treated as on one CUDA device (graph step, gathered experts)."""
    fake = FakeCuda(monkeypatch)
    monkeypatch.setattr(gen, "_on_one_cuda_device", lambda model: True)
    monkeypatch.setattr(moe, "on_accelerator", lambda x: True)
    return fake


def prompts(batch: int, pos: int = 5, seed: int = 0):
    ids = torch.randint(0, 128, (batch, pos), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0  # rows after the first left-padded
    return ids, mask


# ------------------------------------------------------------------------------ (a) graph decode
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_decode_equals_eager(ckpt, fake_cuda, batch):
    model = el.load_model(ckpt)
    ids, mask = prompts(batch)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    graphed = model.generate(ids, attention_mask=mask, max_new_tokens=8, compile=True)
    assert torch.equal(graphed, eager)
    assert len(fake_cuda.graphs) == 1 and fake_cuda.graphs[0].replays == 7  # every decode step


def test_hooks_attached_mid_stream_see_eager_steps(ckpt, fake_cuda):
    model = el.load_model(ckpt)
    ids, mask = prompts(2, seed=1)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    seen = []
    steps = model.stream(ids, attention_mask=mask, max_new_tokens=8, compile=True)
    out = [next(steps), next(steps), next(steps)]  # graphed steps
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: seen.append(x.shape))]):
        out += [next(steps), next(steps)]  # eager steps, through the same static cache
    out += list(steps)  # graphed again
    assert torch.equal(torch.cat([ids, torch.stack(out, 1)], 1), eager)
    assert seen == [(2, 1, model.config.hidden_size)] * 2
    assert fake_cuda.graphs[0].replays == 7 - 2


def test_fake_capture_catches_a_host_sync(fake_cuda):
    """The fake capture itself: a step that reads a device value on the host fails, as on CUDA."""
    x = torch.arange(4.0)
    for sync in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0]), lambda: x.nonzero()):
        with pytest.raises(HostSyncInCapture), torch.cuda.graph(torch.cuda.CUDAGraph()):
            sync()


# ------------------------------------------------------------------ (b) meta-device decode steps
def _meta_model(variant: str):
    cfg = el.ErnieConfig.preset("tiny")
    if variant == "offload":  # host copies need data: a CPU model (refused before any step)
        return offload_experts(el.ErnieMoE(cfg).eval(), 2)
    with torch.device("meta"):
        model = el.ErnieMoE(cfg, init=False).eval()
        if variant in ("nf4", "int8"):
            quantize_modules(model, variant, torch.float32)
    if variant == "expert-parallel":
        from ernie_lab.distributed.styles import ExpertShardExperts

        for L in cfg.moe_layers:
            model.blocks[L].mlp.experts.__class__ = ExpertShardExperts
    return model


@pytest.mark.parametrize("variant", ["dense", "nf4", "int8", "offload", "expert-parallel"])
@pytest.mark.parametrize("batch", [1, 2, 16])
def test_meta_decode_step_has_no_host_sync(variant, batch, monkeypatch):
    """A step the graph path would capture runs on the meta device (no data: any host sync raises);
    a variant or batch that cannot be captured is refused instead."""
    model = _meta_model(variant)
    why = graph_refusal(model, batch)
    if variant in ("offload", "expert-parallel") or batch * model.config.moe_k > moe.GATHER_MAX_SLOTS:
        assert why, f"{variant} at batch {batch} must be refused"
        return
    assert why is None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cache = KVCache.for_model(model, batch, 12)
    cache.pos = 4
    cache.make_static()
    with torch.inference_mode():
        logits = model.forward_unchecked(torch.zeros(batch, 1, dtype=torch.long, device="meta"), None, cache)
    assert logits.shape == (batch, 1, model.config.vocab_size)


def test_refused_variants_decode_eagerly_with_a_warning(ckpt, fake_cuda, caplog):
    model = el.load_model(ckpt, offload="experts", expert_slots=2)
    ids, mask = prompts(2)
    with caplog.at_level(logging.WARNING):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, compile=True)
    assert "offloaded experts" in caplog.text and not fake_cuda.graphs
    assert torch.equal(out, el.load_model(ckpt).generate(ids, attention_mask=mask, max_new_tokens=4))


# ------------------------------------------------------------------------ (c) offload copy-in
def test_offload_copy_in_orders_its_side_stream(ckpt, fake_cuda, monkeypatch):
    """Each refill runs on the side stream, after the compute stream's queued reads of the slot, and
    the compute stream waits for it before using the slot."""
    from ernie_lab.model.offload import OffloadedExperts

    monkeypatch.setattr(OffloadedExperts, "_side_stream_for", lambda self, device: torch.cuda.Stream())
    plain = el.load_model(ckpt)
    model = el.load_model(ckpt, offload="experts", expert_slots=2)
    ids, _ = prompts(2)
    assert torch.equal(model(ids), plain(ids))
    misses = model.offload_stats()["misses"]
    refills = [fake_cuda.events[i - 1 : i + 3] for i, e in enumerate(fake_cuda.events) if e[0] == "enter"]
    assert len(refills) == misses > 0
    for wait, enter, exit_, back in refills:
        side = enter[1]
        assert wait == ("wait", side, "default") and exit_ == ("exit", side) and back == ("wait", "default", side)


# ---------------------------------------------------------------------------- (d) int8 kernels
def test_int8_codes_match_bitsandbytes_and_need_no_fp16_kernel(monkeypatch):
    """int8 codes equal bitsandbytes' ``int8_vectorwise_quant`` (its CPU kernel, fp32 input); quantizing
    a model calls no bitsandbytes int8 kernel with a dtype its CUDA kernel rejects (fp16 only)."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0)) * 3
    q, absmax = int8_rows(w)
    ref_q, ref_absmax, _ = bnb.int8_vectorwise_quant(w.clone())
    assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)
    real = bnb.int8_vectorwise_quant

    def cuda_rule(A, threshold=0.0):
        if A.dtype != torch.float16:
            raise ValueError(f"A must be float16, got {A.dtype}")  # bitsandbytes' CUDA kernel
        return real(A, threshold)

    monkeypatch.setattr(bnb, "int8_vectorwise_quant", cuda_rule)
    torch.manual_seed(0)
    model = el.ErnieMoE(el.ErnieConfig.preset("tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    ref = model(ids)
    quant = quantize_model(model, "int8")
    assert (quant(ids) - ref).abs().max() < 0.1 * ref.abs().max()


def test_accelerator_path_needs_no_cuda_build(ckpt, monkeypatch):
    """More routed slots than the gathered path takes, on an accelerator that is not CUDA (here the
    CPU treated as one, on a torch build without CUDA): no CUDA call, the resident model's logits."""
    model = el.load_model(ckpt)
    ids, mask = prompts(3, pos=8)
    ref = model(ids, attention_mask=mask)
    monkeypatch.setattr(moe, "on_accelerator", lambda x: True)
    torch.testing.assert_close(model(ids, attention_mask=mask), ref)
