"""Several processes: tensor + expert parallel models (``tp_plan="auto"`` under torchrun) built on
``torch.distributed`` (device mesh, ``parallelize_module``, functional collectives), and data
parallel analyses.

Sits above ``io`` (it loads slices of checkpoints) and below ``generation`` and the analyses (which
use its token broadcast and dataset split). Names resolve lazily: the plan and its styles import
torch's DTensor machinery (seconds), which a single-process ``load_model`` never needs.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_model": "ernie_lab.distributed.load",
    "DataSplit": "ernie_lab.distributed.data",
    "data_split": "ernie_lab.distributed.data",
    "broadcast_from_first": "ernie_lab.distributed.group",
    "mesh": "ernie_lab.distributed.group",
    "spawn": "ernie_lab.distributed.group",
    "HookDivergenceError": "ernie_lab.distributed.hook_check",
    "PlanError": "ernie_lab.distributed.hook_check",
    "auto_plan": "ernie_lab.distributed.plan",
    "check_size": "ernie_lab.distributed.plan",
    "memory_split": "ernie_lab.distributed.plan",
    "rank_bytes": "ernie_lab.distributed.plan",
    "valid_sizes": "ernie_lab.distributed.plan",
    "ColwiseShard": "ernie_lab.distributed.styles",
    "ExpertParallel": "ernie_lab.distributed.styles",
    "GatherHooks": "ernie_lab.distributed.styles",
    "RowwiseShard": "ernie_lab.distributed.styles",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ernie_lab.distributed' has no attribute {name!r}")


def __dir__():
    return __all__
