"""ErnieConfig: the hyper-parameters of an ERNIE 4.5 MoE model.

Field names are the keys of the Hugging Face ``config.json`` so that a config round-trips
without a renaming table. Keys the hub files carry but the architecture ignores
(``moe_capacity``, ``moe_gate``, ``moe_use_aux_free``, ``use_rmsnorm``, ...) are kept read-only in
``extra``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the field and the rule."""


@dataclass(frozen=True, kw_only=True)
class ErnieConfig:
    vocab_size: int = 103424
    hidden_size: int = 2560  # d_model
    intermediate_size: int = 12288  # d_ff of the dense (non-MoE) SwiGLU layers
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int = 4  # GQA: each kv head serves heads // kv_heads query heads
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads (as transformers)
    hidden_act: str = "silu"  # the only activation ERNIE 4.5 uses
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0  # GLM-style interleaved RoPE base
    use_bias: bool = False  # biases on attention / dense / shared-expert projections and lm_head
    tie_word_embeddings: bool = True  # lm_head shares embed_tokens' weight
    moe_num_experts: int = 64  # routed experts per MoE layer
    moe_k: int = 6  # experts selected per token
    moe_num_shared_experts: int = 2  # folded into one SwiGLU of width moe_intermediate_size * this
    moe_intermediate_size: int = 1536  # d_expert
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1  # -1 means the last layer
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12  # clamp of the top-k weight sum before renormalising
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))
        if self.moe_layer_end_index == -1 and _is_int(self.num_hidden_layers):
            object.__setattr__(self, "moe_layer_end_index", self.num_hidden_layers - 1)
        self._validate()

    # ----------------------------------------------------------------- derived shapes
    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def d_shared(self) -> int:
        """Width of the single SwiGLU that holds all shared experts."""
        return self.moe_intermediate_size * self.moe_num_shared_experts

    def is_moe_layer(self, i: int) -> bool:
        """ERNIE 4.5 placement rule (transformers ``Ernie4_5_MoeDecoderLayer``)."""
        return self.moe_layer_start_index <= i <= self.moe_layer_end_index and (i + 1) % self.moe_layer_interval == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_hf(cls, src: str | Path | Mapping[str, Any]) -> ErnieConfig:
        """Build from a hub/transformers ``config.json`` (path to the file or its directory) or a dict.

        Accepts both the hub's original form (``rope_theta`` at top level) and transformers' re-saved
        form (``rope_parameters.rope_theta``, ``moe_layer_end_index`` made explicit). A file that is not
        UTF-8 JSON holding an object, a non-ERNIE-4.5-MoE ``model_type``/``architectures``, and every
        field of the wrong type or range raise :class:`ConfigError` naming the file and the field.
        """
        if isinstance(src, Mapping):
            return cls._from_dict(dict(src), "config")
        if not isinstance(src, str | Path):
            raise TypeError(f"ErnieConfig.from_hf takes a path to config.json, its folder or a dict, got {src!r}")
        path = Path(src)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ConfigError(f"{path} is not valid UTF-8 JSON: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object (key -> value), got {type(raw).__name__}")
        return cls._from_dict(raw, str(path))

    @classmethod
    def _from_dict(cls, raw: dict[str, Any], where: str) -> ErnieConfig:
        raw = dict(raw)
        _check_architecture(raw, where)
        rope_theta = _rope_theta(raw, where)
        if rope_theta is not None:
            raw["rope_theta"] = rope_theta
        if isinstance(raw.get("moe_num_experts"), list):
            raise ConfigError(
                f"{where}: moe_num_experts={raw['moe_num_experts']} is a list (multimodal ERNIE 4.5-VL); "
                "only the text MoE models are supported"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    @classmethod
    def preset(cls, name: str) -> ErnieConfig:
        """Released shapes (``"21b-a3b"``, ``"300b-a47b"``), ``"bench"`` (README: speed) and ``"tiny"``."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def replace(self, **changes: Any) -> ErnieConfig:
        """A copy with ``changes``; an end index that meant "last layer" keeps meaning it."""
        last = self.moe_layer_end_index == self.num_hidden_layers - 1
        if "num_hidden_layers" in changes and "moe_layer_end_index" not in changes and last:
            changes["moe_layer_end_index"] = -1
        return dataclasses.replace(self, **changes)

    def __reduce__(self):
        # ``extra`` is a read-only mappingproxy, which pickle/deepcopy cannot handle: rebuild from fields.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["extra"] = dict(self.extra)
        return (_rebuild, (fields,))

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` transformers writes for this model (extras kept)."""
        out = {"architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", **self.extra}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_theta") or (f.name == "head_dim" and self.head_dim is None):
                continue
            out[f.name] = getattr(self, f.name)
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        return out

    # ----------------------------------------------------------------- validation
    def _validate(self) -> None:
        def require(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name, low in _INT_FIELDS.items():
            value = getattr(self, name)
            require(_is_int(value) and value >= low, f"{name}={value!r} must be an integer >= {low}")
        for name, low in _FLOAT_FIELDS.items():
            value = getattr(self, name)
            ok = _is_number(value)
            require(ok and value > low, f"{name}={value!r} must be a number > {low:g}")
        init = self.initializer_range
        require(_is_number(init) and init >= 0, f"initializer_range={init!r} must be a number >= 0")
        for name in ("use_bias", "tie_word_embeddings"):
            value = getattr(self, name)
            require(isinstance(value, bool), f"{name}={value!r} must be true or false (a JSON boolean)")
        head_dim = self.head_dim
        require(head_dim is None or (_is_int(head_dim) and head_dim > 0), f"head_dim={head_dim!r} must be null or > 0")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            ok = all(i is None or (_is_int(i) and 0 <= i < self.vocab_size) for i in ids)
            require(ok, f"{name}={value!r} must be null or a token id in [0, vocab_size={self.vocab_size})")
        aux_free = self.extra.get("moe_use_aux_free")
        require(aux_free is None or isinstance(aux_free, bool), f"moe_use_aux_free={aux_free!r} must be true or false")
        require(
            self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
            f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size} "
            "(or set head_dim)",
        )
        require(self.d_head % 2 == 0, f"head dim {self.d_head} must be even for rotary embeddings")
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_key_value_heads={self.num_key_value_heads} must divide "
            f"num_attention_heads={self.num_attention_heads}",
        )
        require(
            self.moe_k <= self.moe_num_experts,
            f"moe_k={self.moe_k} cannot exceed moe_num_experts={self.moe_num_experts}",
        )
        require(self.hidden_act == "silu", f"hidden_act={self.hidden_act!r}: only 'silu' is supported")
        require(
            self.moe_layer_end_index < self.num_hidden_layers,
            f"moe_layer_end_index={self.moe_layer_end_index} must be < num_hidden_layers="
            f"{self.num_hidden_layers} (or -1)",
        )


# integer fields and their smallest valid value (moe_layer_end_index: -1 = last layer, made explicit
# in __post_init__, so >= 0 here)
_INT_FIELDS = {
    "vocab_size": 1,
    "hidden_size": 1,
    "intermediate_size": 1,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "max_position_embeddings": 1,
    "moe_num_experts": 1,
    "moe_k": 1,
    "moe_num_shared_experts": 0,
    "moe_intermediate_size": 1,
    "moe_layer_start_index": 0,
    "moe_layer_end_index": 0,
    "moe_layer_interval": 1,
}
# float fields and the bound they must exceed
_FLOAT_FIELDS = {"rms_norm_eps": 0.0, "rope_theta": 0.0, "moe_norm_min": 0.0}
# what transformers' Ernie4_5_MoeForCausalLM loads; other model types are different architectures
_MODEL_TYPE = "ernie4_5_moe"
_ARCHITECTURES = ("Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeModel")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_architecture(raw: dict[str, Any], where: str) -> None:
    """A config of another model (``model_type``/``architectures``) is named as such."""
    model_type = raw.get("model_type")
    architectures = raw.get("architectures")
    if model_type is not None and model_type != _MODEL_TYPE:
        raise ConfigError(
            f"{where}: model_type={model_type!r} is not an ERNIE 4.5 MoE checkpoint (model_type "
            f"{_MODEL_TYPE!r}, architectures {list(_ARCHITECTURES)}); ernie_lab loads only those"
        )
    if isinstance(architectures, list) and architectures and not set(architectures) & set(_ARCHITECTURES):
        raise ConfigError(
            f"{where}: architectures={architectures} is not an ERNIE 4.5 MoE checkpoint "
            f"(expected one of {list(_ARCHITECTURES)})"
        )


def _rope_theta(raw: dict[str, Any], where: str) -> Any:
    """The RoPE base from ``rope_theta``, ``rope_parameters`` and the legacy ``rope_scaling``.

    transformers applies ``rope_scaling`` when present and ``rope_parameters`` otherwise; ernie_lab
    implements only the plain (``default``) RoPE, so a scaling type other than ``default`` in
    *either* is an error (never silently ignored), and so is a disagreement between their thetas.
    """
    thetas: dict[str, Any] = {}
    if "rope_theta" in raw:
        thetas["rope_theta"] = raw.pop("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        rope = raw.pop(key, None)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            raise ConfigError(f"{where}: {key} must be an object such as {{'rope_type': 'default'}}, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"{where}: {key}.rope_type={rope_type!r} is not supported (only 'default', plain RoPE); "
                "transformers would apply it, so ignoring it would give different results"
            )
        if "rope_theta" in rope:
            thetas[f"{key}.rope_theta"] = rope["rope_theta"]
    if len({repr(v) if not isinstance(v, int | float) else float(v) for v in thetas.values()}) > 1:
        raise ConfigError(f"{where}: RoPE base given differently: {thetas}; keep one value")
    return next(iter(thetas.values()), None)


def _rebuild(fields: dict[str, Any]) -> ErnieConfig:
    return ErnieConfig(**fields)


_21B = dict(
    vocab_size=103424,
    hidden_size=2560,
    intermediate_size=12288,
    num_hidden_layers=28,
    num_attention_heads=20,
    num_key_value_heads=4,
    moe_num_experts=64,
    moe_k=6,
    moe_num_shared_experts=2,
    moe_intermediate_size=1536,
    moe_layer_start_index=1,
    tie_word_embeddings=True,
)
PRESETS: dict[str, dict[str, Any]] = {
    "21b-a3b": _21B,
    "300b-a47b": dict(
        vocab_size=103424,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=54,
        num_attention_heads=64,
        num_key_value_heads=8,
        moe_num_experts=64,
        moe_k=8,
        moe_num_shared_experts=0,
        moe_intermediate_size=3584,
        moe_layer_start_index=3,
        tie_word_embeddings=False,
    ),
    # the bench config: the 21B shape scaled to run on 2 CPU cores (~194M parameters).
    "bench": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        moe_num_experts=64,
        moe_k=6,
        moe_num_shared_experts=2,
        moe_intermediate_size=256,
        moe_layer_start_index=1,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_num_experts=8,
        moe_k=2,
        moe_num_shared_experts=2,
        moe_intermediate_size=32,
        moe_layer_start_index=1,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
}
