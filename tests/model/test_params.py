"""count_params: meta-device counts against independent formulas, checkpoints and published sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import save_hf_checkpoint
from safetensors import safe_open

from ernie_lab.model.config import PRESETS, ErnieConfig
from ernie_lab.model.params import COMPONENTS, count_params, human


def formula(c: ErnieConfig) -> tuple[int, int]:
    """(total, active) written out from the architecture, independently of the module tree."""
    d, b = c.hidden_size, int(c.use_bias)
    q, kv = c.num_attention_heads * c.d_head, c.num_key_value_heads * c.d_head
    attention = d * q + 2 * d * kv + q * d + b * (q + 2 * kv + d)

    def swiglu(f: int) -> int:
        return 3 * d * f + b * (2 * f + d)

    n_moe = len(c.moe_layers)
    expert = 3 * d * c.moe_intermediate_size  # routed experts have no biases
    shared = swiglu(c.d_shared) if c.moe_num_shared_experts else 0
    total = (
        c.vocab_size * d  # embedding
        + (0 if c.tie_word_embeddings else c.vocab_size * d)
        + b * c.vocab_size  # LM head bias
        + c.num_hidden_layers * (attention + 2 * d)  # attention and the two norms of each block
        + d  # final norm
        + (c.num_hidden_layers - n_moe) * swiglu(c.intermediate_size)
        + n_moe * (c.moe_num_experts * expert + shared + c.moe_num_experts * (d + 1))  # + gate and bias
    )
    active = total - n_moe * (c.moe_num_experts - c.moe_k) * expert
    return total, active


VARIANTS = [
    dict(PRESETS["tiny"]),
    {**PRESETS["tiny"], "use_bias": True, "tie_word_embeddings": False},
    {**PRESETS["tiny"], "head_dim": 24, "moe_num_shared_experts": 0, "moe_layer_interval": 2, "num_hidden_layers": 5},
    {**PRESETS["tiny"], "moe_layer_start_index": 0, "moe_layer_end_index": 1, "moe_k": 1},
]


@pytest.mark.parametrize("config", [ErnieConfig(**v) for v in VARIANTS] + [ErnieConfig.preset(p) for p in PRESETS])
def test_counts_match_the_formula(config):
    counts = count_params(config)
    assert (counts["total"], counts["active"]) == formula(config)
    assert counts["total"] == sum(c["total"] for c in counts["components"].values())
    assert set(counts["components"]) == set(COMPONENTS)
    router = counts["components"]["router"]["total"]
    assert counts["bytes"] == {"bf16": 2 * (counts["total"] - router) + 4 * router, "fp32": 4 * counts["total"]}
    embed_and_head = counts["components"]["embed"]["total"] + counts["components"]["lm_head"]["total"]
    assert counts["active_non_embedding"] == counts["active"] - embed_and_head


def test_total_equals_the_elements_of_a_checkpoint(tmp_path):
    save_hf_checkpoint(tmp_path, tie_word_embeddings=False, use_bias=True, moe_num_shared_experts=1)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        stored = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())  # noqa: SIM118
    assert count_params(ErnieConfig.from_hf(tmp_path))["total"] == stored


@pytest.mark.parametrize(
    ("preset", "total", "active"),
    [("21b-a3b", 21e9, 3e9), ("300b-a47b", 300e9, 47e9)],  # the published "21B total / A3B active" names
)
def test_presets_give_the_published_sizes(preset, total, active):
    counts = count_params(ErnieConfig.preset(preset))
    assert counts["total"] == pytest.approx(total, rel=0.05)
    # the published active figure excludes the embedding (with it, 21B-A3B is 3.35B per token)
    assert counts["active_non_embedding"] == pytest.approx(active, rel=0.05)
    assert active <= counts["active"] <= 1.15 * active


def test_human():
    assert human(21_825_437_888) == "21.83B"
    assert human(999) == "999"
    assert human(1536, "B") == "1.50 KiB"
    assert human(3 * 2**40, "B") == "3.00 TiB"


@pytest.mark.parametrize("quantization", [None, "nf4", "int8"])
def test_stored_active_bytes_count_the_stored_tensors(quantization):
    """The bytes one token reads (the bench's bandwidth limit) follow the stored format: equal to the
    dense count in fp32, and to the quantized weights less the unselected share of the experts."""
    import ernie_lab as el
    from ernie_lab.model.params import stored_active_bytes, weight_bytes
    from ernie_lab.model.quant import quantize_model

    cfg = ErnieConfig.preset("tiny")
    torch.manual_seed(0)
    model = el.ErnieMoE(cfg).eval()
    if quantization is None:
        assert stored_active_bytes(model) == count_params(cfg)["active_bytes"]["fp32"]
        return
    quantize_model(model, quantization)
    stored = weight_bytes(cfg, quantization, torch.float32)
    unselected = stored["routed_experts"] * (1 - cfg.moe_k / cfg.moe_num_experts)
    assert stored_active_bytes(model) == pytest.approx(stored["total"] - unselected, abs=1)
    assert stored_active_bytes(model) < 0.6 * count_params(cfg)["active_bytes"]["fp32"]
