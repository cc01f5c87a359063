"""Decode steps replayed from one captured CUDA graph (``generate(..., compile=True)`` on CUDA).

At batch 1 a decode step of a MoE model is hundreds of small kernels; launching them one by one from
Python costs more than running them. The step is captured once with ``torch.cuda.CUDAGraph`` over a
static KV cache (:meth:`KVCache.make_static`: fixed shapes, the write position and rotary positions
as device tensors, routed experts gathered on the device, so nothing syncs with the host) and each
later step is one ``replay()``.

Hooks: a step runs eagerly (through the same static cache) whenever any hook point is active, so
hooks attached between two steps of a ``stream`` fire as usual.

Some models cannot be captured: :func:`graph_refusal` says why (offloaded or expert-parallel experts,
a tensor-parallel split, more than ``GATHER_MAX_SLOTS`` routed slots per step), and their decode steps
stay eager.
"""

from __future__ import annotations

import torch

from ernie_lab.model.kv_cache import KVCache
from ernie_lab.model.moe import GATHER_MAX_SLOTS


def compile_refusal(model) -> str | None:
    """Why ``model``'s decode step cannot be compiled (``torch.compile``) or captured at all, or None:
    modules whose experts need the host at every step say so in ``compile_refusal``; a tensor-parallel
    model's collectives are neither captured nor traced."""
    for module in model.modules():
        why = getattr(module, "compile_refusal", None)
        if why:
            return why
    if getattr(model, "tp_mesh", None) is not None:
        return "a tensor-parallel model's collectives are not compiled"
    return None


def graph_refusal(model, batch: int) -> str | None:
    """Why ``model``'s one-token step at ``batch`` rows cannot be one CUDA graph, or None.

    Capture records kernels only: any host sync (``.tolist()``, ``.item()``, ``nonzero``) inside the
    step fails the capture. The MoE block's graph-safe path gathers the selected experts' weights
    (no host sync), bounded to ``GATHER_MAX_SLOTS`` (token, expert) slots per layer so its copies stay
    small; see also :func:`compile_refusal`.
    """
    why = compile_refusal(model)
    if why:
        return why
    slots = batch * model.config.moe_k
    if model.config.moe_layers and slots > GATHER_MAX_SLOTS:
        return (
            f"batch {batch} x top-{model.config.moe_k} = {slots} expert slots per layer exceeds the "
            f"{GATHER_MAX_SLOTS} the graph-safe gathered path copies"
        )
    return None


class GraphedDecodeStep:
    """``step(ids [batch 1], cache) -> logits [batch 1 vocab]``: replays a CUDA graph of the model's
    one-token forward. Captured at the first call (after the prefill filled ``cache``), for one
    cache: a new generation makes a new step."""

    def __init__(self, model):
        self.model = model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ids: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if cache.fill is None:
            cache.make_static()
        if any(hp.active for hp in self.model.hook_dict.values()):
            return self.model.forward_unchecked(ids, None, cache)  # hooks see an eager step
        if self.graph is None:
            self._capture(ids, cache)
        self.ids.copy_(ids)
        self.graph.replay()
        cache.pos += 1  # host bookkeeping the graph does not run
        return self.logits

    def _capture(self, ids: torch.Tensor, cache: KVCache) -> None:
        """Warm up on a side stream (lazy caches, allocator), then capture one step. The warm-up's
        writes are undone: counters restored; its keys/values sit where this step writes anyway."""
        self.ids = ids.clone()
        saved = cache.pos, cache.next_position.clone(), cache.fill.clone()

        def restore() -> None:
            cache.pos = saved[0]
            cache.next_position.copy_(saved[1])
            cache.fill.copy_(saved[2])

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model.forward_unchecked(self.ids, None, cache)
                restore()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model.forward_unchecked(self.ids, None, cache)
        cache.pos = saved[0]  # capture ran the Python once; the device counters did not move
