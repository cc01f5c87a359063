"""ernie_lab: an interpretability workbench for ERNIE 4.5 MoE.

    import ernie_lab as el
    model = el.load_model("toy")
    logits, cache = model.run_with_cache(tokens)

The package is a set of wings, each a subpackage (``model``, ``io``, ``generation``, ``routing``,
``patching``, ``ablation``, ``lens``, ``experts``, ``distributed``, ``report``, ``toy``, ``commands``); see the
README's "Architecture".
Public names resolve lazily, so ``import ernie_lab`` stays cheap (no pandas/matplotlib until an
analysis is used).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ErnieConfig": "ernie_lab.model",
    "ConfigError": "ernie_lab.model",
    "ArgumentError": "ernie_lab.model",
    "ArgumentRangeError": "ernie_lab.model",
    "ArgumentTypeError": "ernie_lab.model",
    "NonFiniteError": "ernie_lab.model",
    "ErnieMoE": "ernie_lab.model",
    "HookPoint": "ernie_lab.model",
    "HookError": "ernie_lab.model",
    "ActivationCache": "ernie_lab.model",
    "CacheExistsError": "ernie_lab.model",
    "CacheFileError": "ernie_lab.model",
    "KVCache": "ernie_lab.model",
    "count_params": "ernie_lab.model",
    "load_model": "ernie_lab.distributed",
    "save_model": "ernie_lab.io",
    "CheckpointError": "ernie_lab.io",
    "load_tokenizer": "ernie_lab.io",
    "chat": "ernie_lab.generation",
}
# wings and top-level modules, loaded on first attribute access
_MODULES = (
    "model",
    "io",
    "distributed",
    "generation",
    "interventions",
    "routing",
    "patching",
    "ablation",
    "lens",
    "experts",
    "report",
    "widgets",
    "plots",
    "toy",
)

__all__ = sorted(_EXPORTS) + list(_MODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"ernie_lab.{name}")
    raise AttributeError(f"module 'ernie_lab' has no attribute {name!r}")


def __dir__():
    return __all__
