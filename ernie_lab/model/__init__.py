"""The model: config, layers, the MoE block, ErnieMoE, hook points and caches, KV cache, parameter
counts and device placement. Imports nothing from the other wings (``ErnieMoE.generate`` delegates
to ``ernie_lab.generation`` at call time, as transformers' ``GenerationMixin`` does)."""

from ernie_lab.model.checks import ArgumentError, ArgumentRangeError, ArgumentTypeError, NonFiniteError
from ernie_lab.model.config import PRESETS, ConfigError, ErnieConfig
from ernie_lab.model.ernie import ErnieMoE
from ernie_lab.model.hook_points import ActivationCache, HookError, HookPoint
from ernie_lab.model.kv_cache import CacheError, KVCache
from ernie_lab.model.params import count_params

__all__ = [
    "ArgumentError",
    "ArgumentRangeError",
    "ArgumentTypeError",
    "NonFiniteError",
    "PRESETS",
    "ConfigError",
    "ErnieConfig",
    "ErnieMoE",
    "ActivationCache",
    "HookError",
    "HookPoint",
    "CacheError",
    "KVCache",
    "count_params",
]
