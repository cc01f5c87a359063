"""Expert offload: a pool smaller than the experts a batch uses gives the plain model's logits, hooks
and greedy tokens; hit/miss counts follow a hand-computed LRU trace."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from conftest import save_hf_checkpoint

import ernie_lab as el
from ernie_lab.model.offload import OffloadedExperts

N_EXPERT, SLOTS = 8, 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("offload") / "ckpt"
    save_hf_checkpoint(directory, moe_num_experts=N_EXPERT, moe_k=2)
    return directory


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(1))


def lru_trace(calls: list[list[int]], slots: int) -> tuple[int, int]:
    """(hits, misses) of an LRU pool of ``slots`` entries, starting empty, asked for each call's
    experts in ascending id order (a multi-token forward computes its experts in that order)."""
    pool: OrderedDict[int, None] = OrderedDict()
    hits = misses = 0
    for experts in calls:
        for e in sorted(set(experts)):
            if e in pool:
                hits += 1
                pool.move_to_end(e)
                continue
            misses += 1
            if len(pool) == slots:
                pool.popitem(last=False)
            pool[e] = None
    return hits, misses


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_offload_equals_the_resident_model(ckpt, ids, quantization):
    plain = el.load_model(ckpt, quantization=quantization)
    off = el.load_model(ckpt, quantization=quantization, offload="experts", expert_slots=SLOTS)
    assert isinstance(off.blocks[1].mlp.experts, OffloadedExperts)
    used = plain.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_topk_idx"))[1]
    assert all(used[k].unique().numel() > SLOTS for k in used)  # the pool cannot hold a batch's experts
    assert torch.equal(off(ids), plain(ids))
    logits_plain, cache_plain = plain.run_with_cache(ids)  # every hook active: the explicit path
    logits_off, cache_off = off.run_with_cache(ids)
    assert torch.equal(logits_off, logits_plain)
    assert list(cache_off.keys()) == list(cache_plain.keys())
    assert all(torch.equal(cache_off[k], cache_plain[k]) for k in cache_plain)
    prompt = ids[:1, :4]
    assert torch.equal(off.generate(prompt, max_new_tokens=6), plain.generate(prompt, max_new_tokens=6))


def test_hits_and_misses_follow_an_lru_trace(ckpt, ids):
    model = el.load_model(ckpt, offload="experts", expert_slots=SLOTS)
    routed: dict[str, list[list[int]]] = {}

    def record(value, hook):
        routed.setdefault(hook.name, []).append(value.flatten().tolist())

    twin = ids[:1, :1].repeat(2, 1)  # two one-token rows: k experts, a multi-token forward
    batches = [ids, twin, twin, ids[1:, 3:], twin]
    with model.hooks(fwd_hooks=[(lambda n: n.endswith("hook_topk_idx"), record)]):
        for batch in batches:
            model(batch)
    stats = model.offload_stats()
    ex = model.blocks[1].mlp.experts
    per_expert = sum(getattr(ex, name)[0].numel() * getattr(ex, name).element_size() for name in ex.names)
    for layer in model.config.moe_layers:
        hits, misses = lru_trace(routed[f"blocks.{layer}.moe.hook_topk_idx"], SLOTS)
        got = stats["layers"][layer]
        assert (got["hits"], got["misses"]) == (hits, misses)
        assert got["bytes_copied"] == misses * per_expert
    assert stats["hits"] == sum(s["hits"] for s in stats["layers"].values()) and stats["hits"] > 0


def test_offloaded_model_saves_and_moves(ckpt, ids, tmp_path):
    model = el.load_model(ckpt, offload="experts", expert_slots=2)
    reloaded = el.load_model(el.save_model(model, tmp_path / "saved"))
    assert torch.equal(reloaded(ids), model(ids))
    model.to(torch.bfloat16)
    ex = model.blocks[1].mlp.experts
    assert ex.gate_up_proj.device.type == "cpu" and ex.gate_up_proj.dtype == torch.bfloat16
    assert torch.equal(model(ids), reloaded.to(torch.bfloat16)(ids))


def test_bad_offload_arguments(ckpt):
    with pytest.raises(ValueError, match="'experts'"):
        el.load_model(ckpt, offload="disk", expert_slots=2)
    with pytest.raises(ValueError, match="positive int"):
        el.load_model(ckpt, offload="experts")
    with pytest.raises(ValueError, match="exceeds the 8 experts"):
        el.load_model(ckpt, offload="experts", expert_slots=9)
    with pytest.raises(ValueError, match="only used with offload"):
        el.load_model(ckpt, expert_slots=2)
    with pytest.raises(ValueError, match="no offloaded experts"):
        el.load_model(ckpt).offload_stats()


def test_gathered_decode_path_with_offloaded_experts(ckpt):
    """The accelerator decode path (weights gathered per slot) through a pool smaller than the
    experts asked for: same weights as the resident experts, any pool size."""
    from ernie_lab.model.moe import _gathered_experts

    plain = el.load_model(ckpt, quantization="int8").blocks[1].mlp.experts
    off = el.load_model(ckpt, quantization="int8", offload="experts", expert_slots=2).blocks[1].mlp.experts
    idx = torch.tensor([[5, 1], [7, 5], [0, 2]])
    for a, b in zip(off.gather(idx, torch.float32), plain.gather(idx, torch.float32), strict=True):
        assert torch.equal(a, b)
    xs = torch.randn(3, plain.shapes["down_proj"][0])
    assert torch.equal(_gathered_experts(off, xs, idx), _gathered_experts(plain, xs, idx))
    assert off.stats()["misses"] >= 5


def test_compile_with_offloaded_experts_decodes_eagerly(ckpt, caplog):
    """Which experts to fetch is decided on the host per step, which torch.compile cannot hold (it
    failed inside inductor): ``compile=True`` runs eager steps, says why, and gives eager's tokens."""
    import logging

    model = el.load_model(ckpt, offload="experts", expert_slots=SLOTS)
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING):
        out = model.generate(prompt, max_new_tokens=6, compile=True)
    assert "offloaded experts" in caplog.text
    assert torch.equal(out, el.load_model(ckpt).generate(prompt, max_new_tokens=6))
