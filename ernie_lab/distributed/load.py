"""``el.load_model``: one process, or tensor + expert parallel over the processes of a torchrun."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from ernie_lab.distributed.group import mesh, mesh_device
from ernie_lab.io import weights
from ernie_lab.io.tokenizer import load_tokenizer
from ernie_lab.model.ernie import ErnieMoE


def load_model(
    src: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    *,
    tp_plan: str | dict[str, Any] | None = None,
    check_hooks: bool = True,
    **kwargs,
) -> ErnieMoE:
    """Load ``src`` (see :func:`ernie_lab.io.load_model` for ``src``, ``dtype``, ``device``).

    tp_plan: None (this process holds the whole model), ``"auto"`` (the plan of
        :func:`ernie_lab.distributed.auto_plan`) or an explicit ``{module path: ParallelStyle}``
        (torch's ``parallelize_module`` plan format, with the styles of ``distributed/styles.py``). With
        a plan, run under ``torchrun --nproc_per_node N``: the default process group is joined if
        needed (nccl on CUDA, gloo on the CPU), the model is built on the meta device and split by the
        plan, and each process reads only its slices of the checkpoint onto its device (its GPU, or
        the CPU under gloo). Hooks, caches and analyses then see whole tensors on every process, and
        hook functions must be deterministic (give the same result on every process).
        ``model.tp_mesh`` is the device mesh (None without a plan). The split model is for forward
        passes: its parameters are frozen, and gradients through it (attribution patching) raise.
        Every entry of a dict plan must match a module (``PlanError`` naming it, before any read).
    check_hooks: with a plan, compare each hook's result across the processes after every forward
        call with hooks attached (a checksum, all-reduced) and raise ``HookDivergenceError`` naming
        the first point that differs; ``model.tp_check_hooks`` switches it later.

    ``model.tokenizer`` is ``el.load_tokenizer(src)``, loaded on first use (a folder without
    tokenizer files raises then, not here).
    """
    if not isinstance(check_hooks, bool):
        raise TypeError(f"check_hooks must be True or False, got {check_hooks!r}")
    if tp_plan is None:
        return _with_tokenizer(weights.load_model(src, dtype, device, **kwargs), src)
    if not (tp_plan == "auto" or isinstance(tp_plan, dict)):
        raise ValueError(f"tp_plan must be None, 'auto' or a dict {{module path: ParallelStyle}}, got {tp_plan!r}")
    if device is None and str(kwargs.get("device_map")) == "auto":
        kwargs.pop("device_map")  # the model card's device_map="auto" with tp_plan: each process its own device
    if device is not None and str(device) == "auto":
        raise ValueError("device='auto' spreads layers over devices; with tp_plan each process uses its own device")
    # the DTensor machinery takes seconds to import: only a split model pays for it
    from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

    from ernie_lab.distributed.hook_check import check_plan, install_hook_check
    from ernie_lab.distributed.plan import auto_plan
    from ernie_lab.distributed.styles import collect_shards

    device_mesh = mesh(device)

    def shard(model: ErnieMoE):
        plan = auto_plan(model.config, device_mesh.size()) if tp_plan == "auto" else tp_plan
        check_plan(model, plan, ParallelStyle)
        parallelize_module(model, device_mesh, plan)
        return collect_shards(model)

    model = weights.load_model(src, dtype, device or mesh_device(device_mesh), shard=shard, **kwargs)
    model.tp_mesh = device_mesh
    install_hook_check(model, device_mesh.get_group(), check_hooks)
    return _with_tokenizer(model.requires_grad_(False), src)  # forward only: see styles.NO_GRAD


def _with_tokenizer(model: ErnieMoE, src: str | Path) -> ErnieMoE:
    """``model.tokenizer`` loads ``src``'s tokenizer on first use (``to_tokens``, ``to_str_tokens``...)."""
    model.set_tokenizer_source(functools.partial(load_tokenizer, src))
    return model
