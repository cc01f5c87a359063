"""Shared fixtures: tiny random ERNIE 4.5 MoE checkpoints written by transformers itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, where CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_HF = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_intermediate_size=16,
    moe_k=2,
    moe_num_experts=6,
    moe_num_shared_experts=2,
    moe_layer_start_index=1,
    max_position_embeddings=256,
)


def build_hf_model(std: float = 0.2, seed: int = 0, **overrides):
    """A transformers ``Ernie4_5_MoeForCausalLM`` with every parameter randomised.

    Norm weights, the correction bias and biases are randomised too, so a bug that ignores any of
    them shows up as a logits mismatch.
    """
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Ernie4_5_MoeConfig(**{**TINY_HF, **overrides})
    model = Ernie4_5_MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.05)
    return model


def save_hf_checkpoint(directory: Path, std: float = 0.2, seed: int = 0, **overrides):
    """Build a random transformers model, ``save_pretrained`` it to ``directory``; return the model."""
    model = build_hf_model(std=std, seed=seed, **overrides)
    model.save_pretrained(directory)
    return model


def tiny_model(bias_std: float = 0.1):
    """Our ``tiny`` preset, seed 0, peaked logits (init range 0.2), in eval mode; with ``bias_std``
    a random correction bias, so biased selection differs from the unbiased top-k."""
    from ernie_lab import ErnieConfig, ErnieMoE

    torch.manual_seed(0)
    model = ErnieMoE(ErnieConfig.preset("tiny").replace(initializer_range=0.2)).eval()
    with torch.no_grad():
        for L in model.config.moe_layers if bias_std else ():
            model.blocks[L].mlp.moe_statics.e_score_correction_bias.normal_(0.0, bias_std)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """(directory, transformers model) of a default tiny checkpoint."""
    model = save_hf_checkpoint(tmp_path / "ckpt")
    return tmp_path / "ckpt", model
