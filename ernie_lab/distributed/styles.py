"""Parallel styles: how one module of :class:`ErnieMoE` is split over the ranks of a 1-D device mesh.

Each style is a torch ``ParallelStyle``, applied by ``parallelize_module`` to the model on the meta
device before any weight is read. It shrinks the module's parameters to this rank's part and records
the part as a :class:`~ernie_lab.io.checkpoint.Shard` (so the loader reads only that part), and it
attaches what makes the module's result whole again: an all-reduce after a row-parallel projection
or after the routed experts, and on the module's hook points a ``wrap`` that gathers the activation
before the hooks run and slices their result back. The model code is unchanged and never learns
its rank.

Collectives are torch's functional ones (``_functional_collectives``, what DTensor runs on: they
leave their input alone and trace under ``torch.compile``), always on a contiguous copy: on gloo a
collective on a strided view (a transposed single-row matmul result) silently reduces the wrong
memory. The split model is for inference: its parameters are frozen and a collective on a tensor
that requires grad raises (their backward formulas assume a different loss per process, which would
scale our gradients).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

from ernie_lab.io.checkpoint import Shard
from ernie_lab.model.hook_points import HookPoint
from ernie_lab.model.layers import Linear, linear
from ernie_lab.model.moe import Experts

# a sharded module's parts: module.__dict__[SHARDS][parameter name] -> Shard
SHARDS = "_tp_shards"


NO_GRAD = (
    "gradients through a tensor-parallel model are not supported (each process computes the same "
    "loss, which torch's collective backward formulas do not assume): run gradient-based analyses such as "
    "attribution patching on a model loaded without tp_plan"
)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group`` (a new tensor; ``x`` is left alone). Forward only."""
    if x.requires_grad:
        raise NotImplementedError(NO_GRAD)
    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order. Forward only."""
    if x.requires_grad:
        raise NotImplementedError(NO_GRAD)
    return funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), dim, group))


def _shrink(module: nn.Module, name: str, dim: int, mesh: DeviceMesh) -> Shard:
    """Replace parameter ``name`` by this rank's equal part along ``dim`` (no data: meta device)."""
    full = getattr(module, name)
    if not full.is_meta:
        raise ValueError(
            f"parallel styles split a model built on the meta device (before its weights are read), but "
            f"{type(module).__name__}.{name} is on {full.device}: load with el.load_model(src, tp_plan=...)"
        )
    n, rank = mesh.size(), mesh.get_local_rank()
    if full.shape[dim] % n:
        raise ValueError(
            f"{type(module).__name__}.{name}: size {full.shape[dim]} along dim {dim} does not split in {n}"
        )
    step = full.shape[dim] // n
    shard = Shard(dim, rank * step, (rank + 1) * step)
    local = full.narrow(dim, shard.start, step)
    setattr(module, name, nn.Parameter(torch.empty_like(local, device=full.device), requires_grad=full.requires_grad))
    if name == "weight" and isinstance(module, nn.Linear):  # keep the Linear's sizes those of its part
        module.out_features, module.in_features = local.shape
    module.__dict__.setdefault(SHARDS, {})[name] = shard
    return shard


class ColwiseShard(ParallelStyle):
    """``Linear`` split by output features (rows of weight and bias): the input is whole on every
    rank, the output holds this rank's features (its heads, its d_ff slice); no communication."""

    sharded = ("weight", "bias")

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _shrink(module, "weight", 0, device_mesh)
        if module.bias is not None:
            _shrink(module, "bias", 0, device_mesh)
        return module


class RowParallelLinear(Linear):
    """A ``Linear`` holding some input features: partial products summed over ranks, then the bias."""

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(linear(x, self.weight), self.group)
        return out if self.bias is None else out + self.bias


class RowwiseShard(ParallelStyle):
    """``Linear`` split by input features (columns of weight; the bias stays whole): one all-reduce."""

    sharded = ("weight",)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _shrink(module, "weight", 1, device_mesh)
        module.__class__ = RowParallelLinear
        module.group = device_mesh.get_group()
        return module


def _gathered(x: torch.Tensor, point: HookPoint, dim: int, group, rank: int) -> torch.Tensor:
    """Hook wrap for an activation split along ``dim``: hooks see it whole, this rank keeps its part.
    Nothing happens (no collective) while the point has no hook."""
    if not point.active:
        return x
    whole = point.run(all_gather(x, dim, group))
    return whole.narrow(dim, rank * x.shape[dim], x.shape[dim])


class GatherHooks(ParallelStyle):
    """Hook points of a module whose activations are split over ranks, with the split axis of each
    (``{"hook_q": 2, ...}``): gathered whole before the hooks, the hooks' result sliced back."""

    sharded = ()

    def __init__(self, dims: dict[str, int]):
        self.dims = dims

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group, rank = device_mesh.get_group(), device_mesh.get_local_rank()
        for name, dim in self.dims.items():
            getattr(module, name).wrap = partial(_gathered, dim=dim, group=group, rank=rank)
        return module


class ExpertShardExperts(Experts):
    """Whole experts ``[first, first + n_local)`` of the stack. ``post``/``down`` take global expert
    ids; an expert held by another rank gives zeros, so its slots add nothing here."""

    first = 0
    expert_subset = True  # the MoE block's gathered decode path needs every expert
    # read by generate(compile=True): without the gathered path each step reads expert ids on the host
    compile_refusal = "expert-parallel experts read the selected expert ids on the host"

    def _mine(self, e: int) -> bool:
        return self.first <= e < self.first + self.gate_up_proj.shape[0]

    def post(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if not self._mine(e):
            return x.new_zeros(x.shape[0], self.gate_up_proj.shape[2] // 2)
        return super().post(e - self.first, x)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        if not self._mine(e):
            return h.new_zeros(h.shape[0], self.down_proj.shape[2])
        return super().down(e - self.first, h)


class _Slots:
    """Per MoE layer: the latest routing, to tell this rank's slots from the others'."""

    def __init__(self, first: int, stop: int, group):
        self.first, self.stop, self.group = first, stop, group
        self.idx: torch.Tensor | None = None

    def record(self, idx: torch.Tensor, point: HookPoint) -> torch.Tensor:
        self.idx = point.run(idx)  # the (possibly re-routed) experts that will run
        return self.idx

    def assemble(self, x: torch.Tensor, point: HookPoint) -> torch.Tensor:
        """Per-slot activation ``[batch pos topk f]``: each slot comes whole from the rank owning its
        expert (the others hold zeros there); after the hooks this rank keeps its own slots."""
        if not point.active:
            return x
        whole = point.run(all_reduce(x, self.group))
        mine = (self.idx >= self.first) & (self.idx < self.stop)
        return torch.where(mine[..., None], whole, 0)

    def reduce(self, x: torch.Tensor, point: HookPoint) -> torch.Tensor:
        """Routed output: the sum of every rank's experts, before any hook sees it."""
        return point.run(all_reduce(x, self.group))


class ExpertParallel(ParallelStyle):
    """A MoE block with whole routed experts per rank (``moe_num_experts / N`` each). Every rank
    routes all tokens (the router is replicated), runs its own experts, and one all-reduce per layer
    sums the routed outputs (transformers' ``AllReduceEP``). Shared experts are split separately."""

    sharded = ("experts.gate_up_proj", "experts.down_proj")

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        experts = module.experts
        shard = _shrink(experts, "gate_up_proj", 0, device_mesh)
        _shrink(experts, "down_proj", 0, device_mesh)
        experts.__class__ = ExpertShardExperts
        experts.first = shard.start
        slots = _Slots(shard.start, shard.stop, device_mesh.get_group())
        module.hook_topk_idx.wrap = slots.record
        module.hook_expert_post.wrap = slots.assemble
        module.hook_expert_out.wrap = slots.assemble
        module.hook_routed_out.wrap = slots.reduce
        return module


def collect_shards(model: nn.Module) -> dict[str, Shard]:
    """State name -> :class:`Shard` for every parameter a style shrank."""
    return {
        f"{path}.{name}" if path else name: shard
        for path, module in model.named_modules()
        for name, shard in module.__dict__.get(SHARDS, {}).items()
    }
