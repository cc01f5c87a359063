"""Caches on disk (safetensors + JSON sidecar) and gradients cached by run_with_cache(incl_bwd=True)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from ernie_lab import ActivationCache, CacheExistsError, CacheFileError


@pytest.fixture(scope="module")
def model():
    return tiny_model(bias_std=0.1)


@pytest.fixture(scope="module")
def ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool((a.contiguous().view(torch.uint8) == b.contiguous().view(torch.uint8)).all())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_save_load_round_trips_bit_for_bit(model, ids, tmp_path, dtype):
    _, cache = model.run_with_cache(ids, dtype=dtype)
    path = tmp_path / "run.safetensors"
    cache.save(path)
    loaded = ActivationCache.load(path, model=model)
    assert list(loaded) == list(cache)
    assert all(same_bits(loaded[n], cache[n]) for n in cache)
    assert loaded["blocks.1.moe.hook_topk_idx"].dtype == torch.int64
    assert loaded.model is model
    torch.testing.assert_close(loaded.accumulated_resid(apply_ln=True), cache.accumulated_resid(apply_ln=True))
    sidecar = json.loads((tmp_path / "run.json").read_text())
    entries = {e["name"]: e for e in sidecar["entries"]}
    assert set(entries) == set(cache)
    for name, t in cache.items():
        assert entries[name]["shape"] == list(t.shape)
        assert entries[name]["dtype"] == str(t.dtype).removeprefix("torch.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.safetensors"]  # no temp files left


def test_save_refuses_to_overwrite(model, ids, tmp_path):
    _, cache = model.run_with_cache(ids, names_filter="blocks.0.*")
    path = tmp_path / "c.safetensors"
    cache.save(path)
    before = path.read_bytes()
    _, other = model.run_with_cache(ids, names_filter="blocks.1.*")
    with pytest.raises(CacheExistsError, match="overwrite=True"):
        other.save(path)
    assert path.read_bytes() == before
    other.save(path, overwrite=True)
    assert list(ActivationCache.load(path)) == list(other)


def test_mismatched_or_missing_files_are_named(model, ids, tmp_path):
    _, a = model.run_with_cache(ids, names_filter="hook_embed")
    _, b = model.run_with_cache(ids, names_filter="hook_logits")
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    (tmp_path / "a.json").write_bytes((tmp_path / "b.json").read_bytes())  # a sidecar from another save
    with pytest.raises(CacheFileError, match="different saves"):
        ActivationCache.load(tmp_path / "a.safetensors")
    (tmp_path / "b.json").unlink()
    with pytest.raises(CacheFileError, match="b.json does not exist"):
        ActivationCache.load(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="not the JSON sidecar"):
        a.save(tmp_path / "a.json")


def test_views_of_one_activation_save_separately(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    cache = ActivationCache({"x": base[:, :2], "y": base[:, 2:], "z": base})
    cache.save(tmp_path / "v.safetensors")
    loaded = ActivationCache.load(tmp_path / "v.safetensors")
    assert all(torch.equal(loaded[n], cache[n]) for n in cache)


def test_incl_bwd_caches_gradients_equal_to_autograd(model, ids):
    names = ["blocks.1.hook_resid_mid", "blocks.0.attn.hook_pattern", "blocks.2.moe.hook_topk_weights"]

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 7].sum()

    params_before = [p.grad for p in model.parameters()]
    logits, cache = model.run_with_cache(ids, names_filter=names, incl_bwd=True, metric=metric)
    assert all(p.grad is None for p in model.parameters()) and all(g is None for g in params_before)
    assert not logits.requires_grad
    assert set(cache) == set(names) | {f"{n}_grad" for n in names}

    # the reference: retain_grad on the same activations, backward by hand
    kept = {}

    def keep(x, hook):
        x.retain_grad()
        kept[hook.name] = x

    with model.hooks([(n, keep) for n in names]):
        ids_leaf = model.W_E.detach()[ids].requires_grad_(True)
        with model.hooks([("hook_embed", lambda x, hook: ids_leaf)]):
            metric(model(ids)).backward()
    model.zero_grad(set_to_none=True)
    for n in names:
        torch.testing.assert_close(cache[f"{n}_grad"], kept[n].grad, rtol=1e-5, atol=1e-7)
        assert cache[f"{n}_grad"].abs().sum() > 0
        torch.testing.assert_close(cache[n], kept[n].detach())


def test_incl_bwd_default_metric_is_next_token_loss(model, ids):
    _, cache = model.run_with_cache(ids, names_filter="hook_logits", incl_bwd=True)
    logits = cache["hook_logits"].clone().requires_grad_(True)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    torch.testing.assert_close(cache["hook_logits_grad"], logits.grad)
    with pytest.raises(ValueError, match="incl_bwd=True"):
        model.run_with_cache(ids, metric=lambda x: x.sum())
    with pytest.raises(ValueError, match="scalar"):
        model.run_with_cache(ids, incl_bwd=True, metric=lambda x: x)
