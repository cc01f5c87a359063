"""ernie_lab: an interpretability workbench for ERNIE 4.5 MoE.

    import ernie_lab as el
    model = el.load_model("toy")
    logits, cache = model.run_with_cache(tokens)

Public names resolve lazily, so ``import ernie_lab`` stays cheap (no pandas/matplotlib until an
analysis is used).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ErnieConfig": "ernie_lab.config",
    "ConfigError": "ernie_lab.config",
    "ErnieMoE": "ernie_lab.model",
    "HookPoint": "ernie_lab.hook_points",
    "HookError": "ernie_lab.hook_points",
    "ActivationCache": "ernie_lab.hook_points",
    "KVCache": "ernie_lab.kv_cache",
    "load_model": "ernie_lab.weights",
    "save_model": "ernie_lab.weights",
    "CheckpointError": "ernie_lab.weights",
    "load_tokenizer": "ernie_lab.tokenizer",
    "chat": "ernie_lab.generate",
    "count_params": "ernie_lab.params",
}
_MODULES = ("interventions", "routing", "patching", "ablation", "report", "widgets", "toy")

__all__ = sorted(_EXPORTS) + list(_MODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"ernie_lab.{name}")
    raise AttributeError(f"module 'ernie_lab' has no attribute {name!r}")


def __dir__():
    return __all__
