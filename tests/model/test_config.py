"""ErnieConfig: both config.json forms, the MoE placement rule against transformers, validation, presets."""

from __future__ import annotations

import json

import pytest
import torch

from ernie_lab.model.config import PRESETS, ConfigError, ErnieConfig

# The hub's original config.json form of ERNIE-4.5-21B-A3B-PT (public facts): rope_theta at top level,
# no moe_layer_end_index, and keys transformers ignores.
HUB_21B = {
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "max_position_embeddings": 131072,
    "model_type": "ernie4_5_moe",
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-05,
    "use_cache": False,
    "vocab_size": 103424,
    "rope_theta": 500000,
    "use_rmsnorm": True,
    "tie_word_embeddings": True,
    "use_bias": False,
    "moe_num_experts": 64,
    "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1,
    "moe_intermediate_size": 1536,
    "moe_capacity": [64, 64, 64],
    "moe_gate": "topk",
    "moe_k": 6,
    "moe_layer_interval": 1,
    "moe_use_aux_free": True,
    "num_nextn_predict_layers": 1,
    "dtype": "bfloat16",
}
HUB_EXTRAS = ("moe_capacity", "moe_gate", "moe_use_aux_free", "use_rmsnorm", "num_nextn_predict_layers", "dtype")


def test_from_hf_hub_original_dict():
    cfg = ErnieConfig.from_hf(HUB_21B)
    assert cfg == ErnieConfig.preset("21b-a3b")
    assert cfg.rope_theta == 500000.0
    assert cfg.moe_layer_end_index == 27  # absent -> last layer
    for key in HUB_EXTRAS:
        assert cfg.extra[key] == HUB_21B[key]
    with pytest.raises(TypeError):  # extras are read-only
        cfg.extra["moe_gate"] = "other"


def test_from_hf_file_and_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_21B))
    assert ErnieConfig.from_hf(tmp_path / "config.json") == ErnieConfig.from_hf(tmp_path)
    assert ErnieConfig.from_hf(str(tmp_path)).extra["moe_capacity"] == [64, 64, 64]
    with pytest.raises(FileNotFoundError, match="config.json"):
        ErnieConfig.from_hf(tmp_path / "missing")


def test_from_hf_transformers_resaved_form(tmp_path):
    """transformers moves rope_theta into rope_parameters and writes moe_layer_end_index explicitly."""
    from transformers import Ernie4_5_MoeConfig

    hf = Ernie4_5_MoeConfig(**{**{k: v for k, v in HUB_21B.items() if k not in HUB_EXTRAS}, "rope_theta": 10000.0})
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_theta" not in raw  # the form under test
    cfg = ErnieConfig.from_hf(tmp_path)
    assert cfg.rope_theta == 10000.0
    assert cfg.moe_layer_end_index == 27
    assert cfg == ErnieConfig.preset("21b-a3b").replace(rope_theta=10000.0)


def test_to_hf_dict_round_trip_and_transformers_accepts_it():
    from transformers import Ernie4_5_MoeConfig

    cfg = ErnieConfig.from_hf(HUB_21B).replace(head_dim=96, use_bias=True)
    out = cfg.to_hf_dict()
    back = ErnieConfig.from_hf(out)
    assert back == cfg and dict(back.extra) == {**cfg.extra, **{k: out[k] for k in ("architectures", "model_type")}}
    hf = Ernie4_5_MoeConfig(**out)
    assert (hf.head_dim, hf.use_bias, hf.moe_k, hf.moe_layer_end_index) == (96, True, 6, 27)
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta


LAYER_RULES = [  # (layers, start, end, interval)
    (6, 1, -1, 1),
    (6, 0, -1, 1),
    (6, 0, -1, 2),
    (7, 1, 5, 2),
    (8, 3, -1, 3),
    (5, 2, 2, 1),
    (6, 4, 3, 1),  # empty range: all dense
]


@pytest.mark.parametrize(("layers", "start", "end", "interval"), LAYER_RULES)
def test_is_moe_layer_matches_transformers(layers, start, end, interval):
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

    shape = dict(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        moe_num_experts=2,
        moe_k=1,
        moe_intermediate_size=4,
        num_hidden_layers=layers,
        moe_layer_start_index=start,
        moe_layer_end_index=end,
        moe_layer_interval=interval,
    )
    with torch.device("meta"):
        hf = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**shape))
    theirs = [i for i, layer in enumerate(hf.model.layers) if isinstance(layer.mlp, Ernie4_5_MoeSparseMoeBlock)]
    ours = ErnieConfig(**shape)
    assert ours.moe_layers == theirs
    assert [ours.is_moe_layer(i) for i in range(layers)] == [i in theirs for i in range(layers)]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(hidden_size=30, num_attention_heads=4), "num_attention_heads"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(moe_num_experts=4, moe_k=5), "moe_k"),
        (dict(moe_layer_end_index=3), "moe_layer_end_index"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(head_dim=7), "head dim"),
    ],
)
def test_validation_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        ErnieConfig(**{**PRESETS["tiny"], **changes})


def test_head_dim_explicit_lifts_the_divisibility_rule():
    cfg = ErnieConfig(**{**PRESETS["tiny"], "hidden_size": 30, "num_attention_heads": 4, "head_dim": 8})
    assert cfg.d_head == 8


def test_list_valued_moe_num_experts_is_a_clear_error():
    with pytest.raises(ConfigError, match="moe_num_experts"):
        ErnieConfig.from_hf({**HUB_21B, "moe_num_experts": [64, 64]})


def test_unsupported_rope_type_is_a_clear_error():
    with pytest.raises(ConfigError, match="rope_type"):
        ErnieConfig.from_hf({**HUB_21B, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})


def test_presets():
    big = ErnieConfig.preset("21b-a3b")
    assert (big.hidden_size, big.num_hidden_layers, big.moe_num_experts, big.moe_k) == (2560, 28, 64, 6)
    assert big.moe_layers == list(range(1, 28)) and big.d_head == 128 and big.tie_word_embeddings
    huge = ErnieConfig.preset("300b-a47b")
    assert (huge.hidden_size, huge.num_hidden_layers, huge.moe_k, huge.moe_num_shared_experts) == (8192, 54, 8, 0)
    assert huge.moe_layers == list(range(3, 54)) and not huge.tie_word_embeddings
    bench = ErnieConfig.preset("bench")
    assert bench.moe_layers == list(range(1, 8)) and bench.num_key_value_heads == 2
    for name in PRESETS:
        cfg = ErnieConfig.preset(name)
        assert ErnieConfig.from_hf(cfg.to_hf_dict()) == cfg
    with pytest.raises(KeyError, match="unknown preset"):
        ErnieConfig.preset("7b")
