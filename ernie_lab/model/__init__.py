"""The model: config, layers, the MoE block, ErnieMoE, hook points and caches, KV cache, parameter
counts and device placement. Imports nothing from the other wings (``ErnieMoE.generate`` delegates
to ``ernie_lab.generation`` at call time, as transformers' ``GenerationMixin`` does)."""

from ernie_lab.model.cache import ActivationCache
from ernie_lab.model.cache_files import CacheExistsError, CacheFileError
from ernie_lab.model.checks import ArgumentError, ArgumentRangeError, ArgumentTypeError, NonFiniteError
from ernie_lab.model.config import PRESETS, ConfigError, ErnieConfig
from ernie_lab.model.ernie import ErnieMoE
from ernie_lab.model.hook_points import HookError, HookPoint
from ernie_lab.model.kv_cache import CacheError, KVCache
from ernie_lab.model.params import count_params
from ernie_lab.model.resid_stack import MissingModelError
from ernie_lab.model.shortcuts import MissingTokenizerError

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
    "CacheExistsError",
    "CacheFileError",
    "MissingModelError",
    "MissingTokenizerError",
    "HookError",
    "HookPoint",
    "CacheError",
    "KVCache",
    "count_params",
]
