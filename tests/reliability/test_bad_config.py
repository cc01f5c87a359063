"""config.json, tokenizer files and shard indexes: every malformed input is a named error that
names the file or the field, never a raw traceback or a silently different model."""

from __future__ import annotations

import json

import pytest

from ernie_lab.io.checkpoint import INDEX_FILE, CheckpointError, checkpoint_files
from ernie_lab.io.tokenizer import load_tokenizer
from ernie_lab.model.config import PRESETS, ConfigError, ErnieConfig

BASE = {"model_type": "ernie4_5_moe", "architectures": ["Ernie4_5_MoeForCausalLM"], **PRESETS["tiny"]}


def test_rope_scaling_is_never_ignored_next_to_rope_parameters():
    """transformers applies rope_scaling over rope_parameters: a plain-RoPE model would differ."""
    from transformers import Ernie4_5_MoeConfig

    raw = {
        **BASE,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    reference = Ernie4_5_MoeConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    assert reference.rope_parameters["rope_type"] == "linear"  # what transformers would run
    with pytest.raises(ConfigError, match="rope_scaling.rope_type='linear'"):
        ErnieConfig.from_hf(raw)
    with pytest.raises(ConfigError, match="rope_parameters.rope_type='yarn'"):
        ErnieConfig.from_hf({**raw, "rope_parameters": {"rope_type": "yarn"}, "rope_scaling": {"rope_type": "default"}})
    with pytest.raises(ConfigError, match="RoPE base given differently"):
        ErnieConfig.from_hf({**BASE, "rope_theta": 1e4, "rope_scaling": {"rope_type": "default", "rope_theta": 5e5}})
    both = {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_scaling": {"rope_type": "default"}}
    assert ErnieConfig.from_hf({**BASE, **both}).rope_theta == 5e5


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{not json", "config.json is not valid UTF-8 JSON"),
        (b"\xff\xfe{}", "config.json is not valid UTF-8 JSON"),
        (b"[1, 2]", "config.json must hold a JSON object"),
    ],
)
def test_unreadable_config_json_names_the_file(tmp_path, content, match):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        ErnieConfig.from_hf(tmp_path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", "64"),  # a string where a number belongs
        ("num_hidden_layers", 0),
        ("moe_intermediate_size", -4),
        ("moe_num_shared_experts", 1.5),
        ("tie_word_embeddings", "false"),  # a boolean given as a string
        ("use_bias", 1),
        ("rms_norm_eps", "1e-5"),
        ("rope_theta", float("nan")),
        ("max_position_embeddings", True),
        ("eos_token_id", 512),  # ids must be in [0, vocab_size)
        ("pad_token_id", -1),
        ("eos_token_id", [2, "3"]),
        ("moe_use_aux_free", "no"),
    ],
)
def test_every_field_is_type_and_range_checked(tmp_path, field, value):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, field: value}))
    with pytest.raises(ConfigError, match=rf"config.json: {field}="):
        ErnieConfig.from_hf(tmp_path)


@pytest.mark.parametrize(
    "other", [{"model_type": "llama"}, {"model_type": None, "architectures": ["Qwen2ForCausalLM"]}]
)
def test_a_checkpoint_of_another_model_is_named_as_such(other):
    with pytest.raises(ConfigError, match="is not an ERNIE 4.5 MoE checkpoint"):
        ErnieConfig.from_hf({**BASE, **other})


@pytest.mark.parametrize(
    "index", [b"{", b"\xff", b"[]", b'{"weight_map": [1]}', b'{"weight_map": {"a": "../outside.safetensors"}}']
)
def test_a_bad_shard_index_names_the_file(tmp_path, index):
    (tmp_path / INDEX_FILE).write_bytes(index)
    with pytest.raises(CheckpointError, match=INDEX_FILE):
        checkpoint_files(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
@pytest.mark.parametrize("content", [b"{oops", b"\xff\xfe", b"[]"])
def test_bad_tokenizer_files_name_the_file(tmp_path, name, content):
    from ernie_lab.io.sources import toy_dir

    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / f).write_bytes((toy_dir() / f).read_bytes())
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=name):
        load_tokenizer(tmp_path)
