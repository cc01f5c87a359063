"""Several processes: tensor + expert parallel models (``tp_plan="auto"`` under torchrun) built on
``torch.distributed`` (device mesh, ``parallelize_module``, collectives), and data parallel analyses.

Sits above ``io`` (it loads slices of checkpoints) and below ``generation`` and the analyses (which
use its token broadcast and dataset split).
"""

from ernie_lab.distributed.data import DataSplit, data_split
from ernie_lab.distributed.group import broadcast_from_first, mesh, spawn
from ernie_lab.distributed.load import load_model
from ernie_lab.distributed.plan import auto_plan, check_size, rank_bytes, valid_sizes
from ernie_lab.distributed.styles import ColwiseShard, ExpertParallel, GatherHooks, RowwiseShard

__all__ = [
    "ColwiseShard",
    "DataSplit",
    "ExpertParallel",
    "GatherHooks",
    "RowwiseShard",
    "auto_plan",
    "broadcast_from_first",
    "check_size",
    "data_split",
    "load_model",
    "mesh",
    "rank_bytes",
    "spawn",
    "valid_sizes",
]
