"""``model.forward_from(layer, resid, ids)``: the later blocks alone give the full run's logits."""

from __future__ import annotations

import pytest
import torch

from ernie_lab import ErnieConfig, ErnieMoE


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ErnieMoE(ErnieConfig.preset("tiny").replace(initializer_range=0.2)).eval()


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_later_blocks_alone_match_the_full_run(model, layer):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    name = f"blocks.{layer}.hook_resid_pre"
    logits, cache = model.run_with_cache(ids, names_filter=name, attention_mask=mask)
    again = model.forward_from(layer, cache[name], ids, mask)
    assert torch.equal(again, logits)
    seen = []
    with model.hooks([("blocks.0.hook_resid_pre", lambda x, hook: seen.append(0))]):
        model.forward_from(layer, cache[name], ids, mask)
    assert bool(seen) == (layer == 0)  # earlier hook points do not fire


def test_bad_layer_or_shape(model):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="layer"):
        model.forward_from(9, torch.zeros(1, 4, model.config.hidden_size), ids)
    with pytest.raises(ValueError, match="resid"):
        model.forward_from(1, torch.zeros(1, 5, model.config.hidden_size), ids)
