"""Data parallel for dataset-wide analyses: each process takes a contiguous block of the sequences
and the per-process results are combined, in rank order, on every process.

Used when a process group is up (``torchrun``) and each process holds the whole model, or when an
analysis is asked to with ``data_parallel=True``. A tensor-parallel model already spreads one forward
pass over the processes, so its analyses run the whole dataset on every process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataSplit:
    """This process's share of a dataset (``rank`` of ``world``)."""

    rank: int
    world: int

    def part(self, n: int) -> slice:
        """The contiguous block of ``n`` items this process takes (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def gather(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def concat_lists(self, parts: dict[str, list[list]]) -> dict[str, list[list]]:
        """``{key: [list per layer]}`` from every process, each list concatenated in rank order."""
        every = self.gather(parts)
        return {k: [sum((p[k][i] for p in every), []) for i in range(len(v))] for k, v in parts.items()}

    def sum(self, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Element-wise sums over processes, added in rank order (the same bits on every process)."""
        every = self.gather(totals)
        return {k: sum((p[k] for p in every[1:]), every[0][k].clone()) for k in totals}


def data_split(model, data_parallel: bool | None = None) -> DataSplit | None:
    """The split an analysis of ``model`` should use, or None to run the whole dataset here.

    ``data_parallel``: None = split when a process group of several processes is up and ``model`` is
    not tensor-parallel; True = split (an error when that is impossible); False = never split.
    """
    up = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    sharded = getattr(model, "tp_mesh", None) is not None
    if data_parallel is None:
        data_parallel = up and not sharded
    if not data_parallel:
        return None
    if not up:
        raise ValueError("data_parallel=True needs a process group of several processes (start with torchrun)")
    if sharded:
        raise ValueError(
            "data_parallel=True with a tensor-parallel model: its processes share each forward pass; "
            "load it without tp_plan on every process to split the dataset instead"
        )
    return DataSplit(dist.get_rank(), dist.get_world_size())
