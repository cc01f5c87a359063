"""Divergence check of hook results under a split model, and the check that a ``tp_plan`` names modules.

Under ``tp_plan`` every process runs the hooks on whole activations and keeps its part of the result,
so a hook whose result differs between processes (an unseeded random edit, rank-dependent state)
silently mixes different models. Each replaced activation is reduced to a checksum on its device
(no host sync): the sum and a position-weighted sum of its finite values and a weighted count of its
non-finite ones. After each forward call with hooks attached, two small all-reduces (the number of
checksums, then their max and min) compare them across processes; every process raises the same
:class:`HookDivergenceError` naming the first point that differs. ``model.tp_check_hooks = False``
(or ``load_model(..., check_hooks=False)``) turns it off.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.distributed as dist
from torch import nn


class HookDivergenceError(RuntimeError):
    """A hook returned different results on different processes of a split model."""


class PlanError(ValueError):
    """A ``tp_plan`` entry that matches no module of the model (or is not a parallel style)."""


def check_plan(model: nn.Module, plan: dict, style_type: type) -> None:
    """Every ``{module path pattern: style}`` entry must match a module (per dotted atom, as
    ``parallelize_module`` matches) and hold a ``ParallelStyle``; else :class:`PlanError` naming it,
    before anything is read (torch would only warn and leave the model unsplit on every process)."""
    paths = [p.split(".") for p, _ in model.named_modules() if p]
    for pattern, style in plan.items():
        if not isinstance(pattern, str):
            raise PlanError(f"tp_plan keys must be module path patterns (str), got {pattern!r}")
        atoms = pattern.split(".")
        if not any(len(p) == len(atoms) and all(map(fnmatch.fnmatchcase, p, atoms)) for p in paths):
            near = sorted({".".join(p[: len(atoms)]) for p in paths if len(p) >= len(atoms)})[:3]
            raise PlanError(f"tp_plan entry {pattern!r} matches no module of the model (module paths look like {near})")
        if not isinstance(style, style_type):
            raise PlanError(f"tp_plan[{pattern!r}] must be a ParallelStyle, got {type(style).__name__}")


def _checksum(x: torch.Tensor) -> torch.Tensor:
    """Three float64 numbers on ``x``'s device: the sum of its finite values, their sum weighted by row
    (rows = all axes but the last), and the row-weighted count of non-finite values. One copy of ``x``
    in its own dtype; the sums accumulate in float64."""
    rows = x.detach().reshape(-1, x.shape[-1]) if x.ndim else x.detach().reshape(1, 1)
    finite = torch.isfinite(rows)
    row_sums = torch.where(finite, rows, 0).sum(-1, dtype=torch.float64)
    weight = torch.arange(rows.shape[0], device=rows.device, dtype=torch.float64) % 1021 + 1
    bad = (~finite).sum(-1, dtype=torch.float64)
    return torch.stack([row_sums.sum(), (row_sums * weight).sum(), (bad * weight).sum()])


def install_hook_check(model: nn.Module, group, enabled: bool = True) -> None:
    """Check every hook result of ``model`` across the processes of ``group`` (module docstring)."""
    model.tp_check_hooks = enabled
    seen: list[tuple[str, torch.Tensor]] = []

    def record(x: torch.Tensor, point) -> None:
        if model.tp_check_hooks:
            seen.append((point.name, _checksum(x)))

    def clear(module, args) -> None:
        seen.clear()

    def verify(module, args, output) -> None:
        results = list(seen)
        seen.clear()
        if not model.tp_check_hooks or not any(p.fwd for p in model.hook_dict.values()):
            return
        device = output.device if isinstance(output, torch.Tensor) else torch.device("cpu")
        count = torch.tensor([len(results), -len(results)], dtype=torch.float64, device=device)
        dist.all_reduce(count, dist.ReduceOp.MAX, group=group)
        if count[0] != -count[1]:
            raise HookDivergenceError(
                f"hooks replaced {int(-count[1])} to {int(count[0])} activations on different processes: a hook "
                "returns a tensor on some processes and None on others; hook functions must behave the same "
                "on every process (model.tp_check_hooks = False to skip this check)"
            )
        if not results:
            return
        sums = torch.stack([s.to(device) for _, s in results])
        both = torch.cat([sums, -sums])
        dist.all_reduce(both, dist.ReduceOp.MAX, group=group)
        differs = (both[: len(sums)] != -both[len(sums) :]).any(-1)
        if bool(differs.any()):
            name = results[int(torch.nonzero(differs)[0, 0])][0]
            raise HookDivergenceError(
                f"the hook result at {name} differs between processes: hook functions must give the same "
                "result on every process (seed random edits, no rank-dependent state); "
                "model.tp_check_hooks = False (or load_model(..., check_hooks=False)) skips this check"
            )

    for point in model.hook_dict.values():
        point.check = record
    model.register_forward_pre_hook(clear)
    model.register_forward_hook(verify)
