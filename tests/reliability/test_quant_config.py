"""A ``BitsAndBytesConfig`` is honoured or refused, field by field, never accepted and ignored:
``llm_int8_skip_modules`` keeps the matched modules (experts included) in full precision; double
quantisation, a non-default int8 threshold, fp32 CPU offload, fp16 master weights and other storage
types are refused by name before any tensor is read."""

from __future__ import annotations

import pytest
import torch

import ernie_lab as el
from ernie_lab.model.layers import Linear
from ernie_lab.model.moe import Experts
from ernie_lab.model.quant import QuantExperts, QuantLinear
from tests.conftest import save_hf_checkpoint

transformers = pytest.importorskip("transformers")
BitsAndBytesConfig = transformers.BitsAndBytesConfig


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("q") / "ckpt"
    save_hf_checkpoint(directory, vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=64)
    return directory


@pytest.fixture(scope="module")
def full(ckpt):
    return el.load_model(ckpt, dtype="float32")


@pytest.mark.parametrize(
    "field",
    [
        {"bnb_4bit_use_double_quant": True},
        {"llm_int8_threshold": 3.0},
        {"llm_int8_enable_fp32_cpu_offload": True},
        {"llm_int8_has_fp16_weight": True},
        {"bnb_4bit_quant_storage": torch.bfloat16},
    ],
)
def test_unsupported_fields_are_refused_by_name(ckpt, field):
    name = next(iter(field))
    for load in ({"load_in_4bit": True}, {"load_in_8bit": True}):
        with pytest.raises(ValueError, match=rf"BitsAndBytesConfig\.{name}=.* is not supported"):
            el.load_model(ckpt, quantization_config=BitsAndBytesConfig(**load, **field))


def _dense_equal(model, full, path: str) -> bool:
    a, b = model.get_submodule(path).state_dict(), full.get_submodule(path).state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_skip_modules_keep_attention_or_experts_in_full_precision(ckpt, full):
    moe = full.config.moe_layers[0]
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["self_attn"])
    model = el.load_model(ckpt, dtype="float32", quantization_config=config)
    for L in range(full.config.num_hidden_layers):
        assert type(model.blocks[L].self_attn.q_proj) is Linear
        assert _dense_equal(model, full, f"model.layers.{L}.self_attn")
    assert isinstance(model.blocks[moe].mlp.experts, QuantExperts)

    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["mlp.experts"])
    model = el.load_model(ckpt, dtype="float32", quantization_config=config)
    assert type(model.blocks[moe].mlp.experts) is Experts
    assert _dense_equal(model, full, f"model.layers.{moe}.mlp.experts")
    assert isinstance(model.blocks[moe].self_attn.q_proj, QuantLinear)
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.isfinite(model(ids)).all()

    glob = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=[f"model.layers.{moe}.*"])
    model = el.load_model(ckpt, dtype="float32", quantization_config=glob)
    assert type(model.blocks[moe].mlp.experts) is Experts and type(model.blocks[0].self_attn.q_proj) is QuantLinear

    regex = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=[r"model\.layers\.[01]\.self_attn"])
    model = el.load_model(ckpt, dtype="float32", quantization_config=regex)  # transformers' regex form
    assert [type(b.self_attn.q_proj) is Linear for b in model.blocks] == [
        L in (0, 1) for L in range(full.config.num_hidden_layers)
    ]


def test_skip_patterns_must_match_a_module(ckpt):
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["self_atn"])
    with pytest.raises(ValueError, match=r"llm_int8_skip_modules \['self_atn'\] match no module"):
        el.load_model(ckpt, quantization_config=config)
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head"])  # transformers' usual list
    assert isinstance(el.load_model(ckpt, quantization_config=config).blocks[0].self_attn.q_proj, QuantLinear)
