"""Expert offload: routed experts in host memory, a fixed pool of K device slots with LRU eviction.

An :class:`OffloadedExperts` replaces a layer's experts module (dense :class:`~ernie_lab.model.moe.Experts`
or quantized :class:`~ernie_lab.model.quant.QuantExperts`) at the same path. It keeps the stacked
tensors ``[expert ...]`` in host memory (pinned when CUDA exists) under their usual names, so
``state_dict`` and ``save_model`` see the whole model, and a pool of ``K`` slots ``[K ...]`` on the
compute device. The wrapped module computes on the pool (its tensors *are* the slots), so an
offloaded model runs exactly the arithmetic of the resident one.

Residency: each expert computation first asks for its expert (``post``). A resident expert is a
hit (and becomes most recently used); otherwise it is a miss: the least recently used slot is
refilled from host memory (on a side CUDA stream where one exists). ``down`` for the expert just
used is free; only when the hooked path has evicted it in between is it fetched (and counted) again.
On the CPU "device" and host are the same memory, but pool, LRU and statistics work the same.

Edits: the host tensors are the model's weights (``state_dict``, ``load_state_dict``, in-place edits of
``mlp.experts.*`` all reach them). Each call first compares every host tensor's version counter
(``tensor._version``, bumped by every in-place write, ``load_state_dict``'s copies included) and
storage with what the slots were filled from; on any change all slots of the layer are emptied, so the
next use refills them from the edited weights (counted as misses).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

OFFLOAD_MODES = ("experts",)


def check_offload(offload: str | None, expert_slots: int | None, n_expert: int | None = None) -> None:
    """Validate ``offload`` / ``expert_slots`` before anything is loaded (named errors)."""
    if offload is None:
        if expert_slots is not None:
            raise ValueError("expert_slots is only used with offload='experts'")
        return
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload={offload!r}: use one of {OFFLOAD_MODES} or None")
    if isinstance(expert_slots, bool) or not isinstance(expert_slots, int) or expert_slots < 1:
        raise ValueError(
            f"offload='experts' needs expert_slots, a positive int (device slots per layer), got {expert_slots!r}"
        )
    if n_expert is not None and expert_slots > n_expert:
        raise ValueError(f"expert_slots={expert_slots} exceeds the {n_expert} experts of a layer")


class OffloadedExperts(nn.Module):
    """Routed experts in host memory computed through ``slots`` device slots (see module doc)."""

    # read by generate(compile=True): which experts to fetch is decided on the host per step,
    # which neither a CUDA graph nor torch.compile can hold
    compile_refusal = "offloaded experts are fetched into their slots by host-side logic at every step"

    def __init__(self, inner: nn.Module, slots: int, device: torch.device | str):
        super().__init__()
        device = torch.device(device)
        self.n_slots = slots
        self.names = [n for n, _ in inner.named_parameters()] + [n for n, _ in inner.named_buffers()]
        self.__dict__["inner"] = inner  # not a submodule: its tensors are re-pointed at the slots
        pin = torch.cuda.is_available()
        for name in self.names:
            host = _trackable(getattr(inner, name).detach().to("cpu"))
            self.register_buffer(name, host.pin_memory() if pin else host)
            pool = torch.empty(slots, *host.shape[1:], dtype=host.dtype, device=device)
            self.register_buffer(f"slots_{name}", pool, persistent=False)
        self._lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self._filled_from: tuple = ()  # the host tensors' (version, storage) the slots were filled from
        self.reset_stats()
        self._point_inner()

    # ------------------------------------------------------------------ the Experts interface
    def post(self, e: int, x: torch.Tensor) -> torch.Tensor:
        self._follow_host()
        return self.inner.post(self._acquire(e), x)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        self._follow_host()  # a hook between post and down may have edited the weights
        slot = self._lru.get(e)
        if slot is None:
            slot = self._acquire(e)
        return self.inner.down(slot, h)

    def gather(self, idx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of the experts ``idx``, copied out of the slots one expert at a time (so any
        number of distinct experts works with any pool size)."""
        self._follow_host()
        ids = idx.unique().tolist()
        weights = [self.inner.gather(torch.tensor([self._acquire(e)], device=idx.device), dtype) for e in ids]
        where = torch.searchsorted(torch.tensor(ids, device=idx.device), idx)
        return tuple(torch.cat([w[i] for w in weights])[where] for i in range(2))

    # ------------------------------------------------------------------ slots
    def _follow_host(self) -> None:
        """Empty the slots when a host tensor was written or replaced since they were filled."""
        now = tuple((t._version, t.data_ptr()) for t in (self._buffers[n] for n in self.names))
        if now != self._filled_from:
            self._lru.clear()
            self._filled_from = now

    def _acquire(self, e: int) -> int:
        """The slot holding expert ``e``, filling the least recently used one on a miss."""
        slot = self._lru.get(e)
        if slot is not None:
            self._lru.move_to_end(e)
            self.hits += 1
            return slot
        self.misses += 1
        slot = len(self._lru) if len(self._lru) < self.n_slots else self._lru.popitem(last=False)[1]
        self._copy_in(e, slot)
        self._lru[e] = slot
        return slot

    def _copy_in(self, e: int, slot: int) -> None:
        pools = [getattr(self, f"slots_{n}") for n in self.names]
        hosts = [getattr(self, n)[e] for n in self.names]
        device = pools[0].device
        stream = self._side_stream_for(device)
        if stream is not None:
            current = torch.cuda.current_stream(device)
            stream.wait_stream(current)  # kernels still reading the evicted expert come first
            with torch.cuda.stream(stream):
                for pool, host in zip(pools, hosts):
                    pool[slot].copy_(host, non_blocking=True)
            current.wait_stream(stream)
        else:
            for pool, host in zip(pools, hosts):
                pool[slot].copy_(host)
        self.bytes_copied += sum(h.numel() * h.element_size() for h in hosts)

    def _side_stream_for(self, device: torch.device):
        """The side CUDA stream copies to ``device`` run on (made once), or None off CUDA."""
        if device.type != "cuda":
            return None
        stream = self.__dict__.get("_stream")
        if stream is None or stream.device != device:
            stream = self.__dict__["_stream"] = torch.cuda.Stream(device)
        return stream

    def _point_inner(self) -> None:
        """Make the wrapped module's stacked tensors the slot pools (after construction and moves)."""
        for name in self.names:
            pool = getattr(self, f"slots_{name}")
            if name in self.inner._parameters:
                self.inner._parameters[name] = nn.Parameter(pool, requires_grad=False)
            else:
                self.inner._buffers[name] = pool

    def _apply(self, fn, recurse=True):
        """Device moves apply to the slots only; the host store stays on the CPU (a whole model's
        experts never land on the device) and follows dtype changes of dense experts. Quantized
        storage (codes, fp32 scales) never changes dtype."""
        hosts = {n: self._buffers.pop(n) for n in self.names}
        pools = {n: self._buffers[f"slots_{n}"] for n in self.names}
        super()._apply(fn, recurse)
        quantized = hasattr(self.inner, "codec")
        pin = torch.cuda.is_available()
        for name, host in hosts.items():
            pool = self._buffers[f"slots_{name}"]
            if quantized and pool.dtype != pools[name].dtype:
                pool = self._buffers[f"slots_{name}"] = torch.empty_like(pools[name], device=pool.device)
            if host.dtype != pool.dtype:
                host = _trackable(host.to(pool.dtype))
                host = host.pin_memory() if pin else host
            self._buffers[name] = host
        if quantized:
            self.inner.compute_dtype = fn(torch.empty(0, dtype=self.inner.compute_dtype)).dtype
        self._point_inner()
        self._lru.clear()  # the slots' contents are gone after a move or dtype change
        return self

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        self.hits = self.misses = self.bytes_copied = 0

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "bytes_copied": self.bytes_copied}

    def extra_repr(self) -> str:
        return (
            f"slots={self.n_slots}, experts={getattr(self, self.names[0]).shape[0]}, inner={type(self.inner).__name__}"
        )


def _trackable(host: torch.Tensor) -> torch.Tensor:
    """``host``, as a normal tensor: an inference tensor (made under ``torch.inference_mode``) has no
    version counter, so in-place edits of it could not be seen by the slots."""
    if not host.is_inference():
        return host
    with torch.inference_mode(False):
        return host.clone()


def offload_experts(model: nn.Module, expert_slots: int, device: torch.device | str | None = None) -> nn.Module:
    """Replace, in place, every MoE layer's experts with :class:`OffloadedExperts` (``expert_slots``
    device slots each, on ``device``: default where the layer's router weight lives)."""
    check_offload("experts", expert_slots, model.config.moe_num_experts)
    for block in model.blocks:
        moe = block.mlp
        if not hasattr(moe, "experts") or isinstance(moe.experts, OffloadedExperts):
            continue
        target = device if device is not None else moe.gate.weight.device
        moe.experts = OffloadedExperts(moe.experts, expert_slots, target)
    return model


def offload_stats(model: nn.Module) -> dict:
    """Hits, misses and bytes copied summed over the layers, plus ``slots`` and per-layer detail."""
    layers = {i: b.mlp.experts.stats() for i, b in enumerate(model.blocks) if _offloaded(b)}
    if not layers:
        raise ValueError("this model has no offloaded experts; load it with offload='experts', expert_slots=K")
    total = {k: sum(s[k] for s in layers.values()) for k in ("hits", "misses", "bytes_copied")}
    return {**total, "layers": layers}


def device_bytes(model: nn.Module) -> int:
    """``model.get_memory_footprint()`` less the host copies of offloaded experts: the weights that
    sit on the compute device."""
    host = 0
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            host += sum(getattr(m, n).numel() * getattr(m, n).element_size() for n in m.names)
    return model.get_memory_footprint() - host


def reset_offload_stats(model: nn.Module) -> None:
    for block in model.blocks:
        if _offloaded(block):
            block.mlp.experts.reset_stats()


def _offloaded(block: nn.Module) -> bool:
    return isinstance(getattr(block.mlp, "experts", None), OffloadedExperts)
