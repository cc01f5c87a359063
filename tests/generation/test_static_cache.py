"""The static KV cache (fixed-shape decode steps, what the CUDA-graph step replays) equals the
growing one: same logits to fp32 round-off, same greedy tokens, padding included."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from ernie_lab.model.kv_cache import KVCache


def decode(model, ids, mask, steps: int, static: bool):
    cache = KVCache.for_model(model, ids.shape[0], ids.shape[1] + steps + 3)
    with torch.inference_mode():
        logits = model.forward_unchecked(ids, mask, cache)[:, -1]
        if static:
            cache.make_static()
        out = [logits]
        for _ in range(steps):
            logits = model.forward_unchecked(logits.argmax(-1).view(-1, 1), None, cache)[:, -1]
            out.append(logits)
    return torch.stack(out, 1), cache


@pytest.mark.parametrize("padded", [False, True])
def test_static_steps_equal_growing_steps(padded):
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    growing, _ = decode(model, ids, mask, 6, static=False)
    static, cache = decode(model, ids, mask, 6, static=True)
    torch.testing.assert_close(static, growing, atol=1e-5, rtol=1e-5)
    assert torch.equal(static.argmax(-1), growing.argmax(-1))
    assert cache.pos == 12 and cache.fill.tolist() == [12]


def test_static_cache_needs_one_device():
    model = tiny_model()
    n = model.config.num_hidden_layers
    cache = KVCache.allocate(model.config, 1, 8, device=["cpu"] * (n - 1) + ["meta"], home="cpu")
    with pytest.raises(ValueError, match="every layer on one device"):
        cache.make_static()
