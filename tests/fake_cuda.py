"""A fake ``torch.cuda`` for CPU tests of CUDA-only code paths (graphs, streams).

:class:`FakeGraph` imitates what a CUDA graph does with the kernels of a capture: the ops run inside
``torch.cuda.graph(g)`` are recorded with the tensors they read and write (fixed addresses) and their
effects are undone, as a real capture runs no kernel; ``g.replay()`` runs the recorded ops again on the
same tensors. A host sync inside the capture (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``,
``unique``, ...) raises :class:`HostSyncInCapture`, as it fails a real capture. Streams are objects that
record the waits between them (:attr:`FakeCuda.events`).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ops that read device data on the host (or whose output shape depends on it)
HOST_SYNC_OPS = (
    "_local_scalar_dense",
    "nonzero",
    "nonzero_static",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "masked_select",
    "bincount",
    "repeat_interleave",
    "equal",
    "allclose",
)


class HostSyncInCapture(RuntimeError):
    """A host sync was reached while a CUDA graph was being captured."""


def _mutated(func, args, kwargs) -> list[torch.Tensor]:
    """The tensor arguments ``func`` writes to (its schema's ``Tensor(a!)`` arguments)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            out += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return out


def _storages(value) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)}


def _aliases_input(out, args, kwargs) -> bool:
    """Whether ``out`` shares memory with an argument (a view or an in-place result: nothing to copy
    on replay). Decided on the tensors, as ``to``/``reshape``/``contiguous`` alias only sometimes."""
    return bool(_storages(out) & _storages((args, kwargs)))


class _Capture(TorchDispatchMode):
    def __init__(self, graph: FakeGraph):
        super().__init__()
        self.graph = graph
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name.split("::")[-1] in HOST_SYNC_OPS:
            raise HostSyncInCapture(f"{func} reads device data on the host inside a CUDA graph capture")
        for t in _mutated(func, args, kwargs):
            self.saved.append((t, t.clone()))  # a capture runs no kernel: undone at its end
        out = func(*args, **kwargs)
        self.graph.ops.append((func, args, kwargs, out, _aliases_input(out, args, kwargs)))
        return out


class FakeGraph:
    """``torch.cuda.CUDAGraph`` on the CPU: see the module doc."""

    def __init__(self, *args, **kwargs):
        self.ops: list = []
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for func, args, kwargs, out, alias in self.ops:
            new = func(*args, **kwargs)
            if alias:
                continue  # a view or an in-place result: the same memory as at capture
            for old, value in zip(tree_flatten(out)[0], tree_flatten(new)[0], strict=True):
                if isinstance(old, torch.Tensor):
                    old.copy_(value)  # the graph's static output memory


class FakeStream:
    def __init__(self, fake: FakeCuda, name: str):
        self.fake, self.name, self.device = fake, name, torch.device("cuda", 0)

    def wait_stream(self, other: FakeStream) -> None:
        self.fake.events.append(("wait", self.name, other.name))

    def synchronize(self) -> None:
        self.fake.events.append(("synchronize", self.name))


class FakeCuda:
    """Patches ``torch.cuda``'s graph, stream and capture functions (with pytest's ``monkeypatch``)."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        self.capturing = False
        self.graphs: list[FakeGraph] = []
        self.default = FakeStream(self, "default")
        self.current = self.default
        self._n = 0
        fake = self

        def new_graph(*args, **kwargs):
            g = FakeGraph()
            fake.graphs.append(g)
            return g

        def new_stream(*args, **kwargs):
            fake._n += 1
            return FakeStream(fake, f"side{fake._n}")

        for name, value in {
            "CUDAGraph": new_graph,
            "graph": self.graph,
            "Stream": new_stream,
            "stream": self.stream,
            "current_stream": lambda device=None: fake.current,
            "is_current_stream_capturing": lambda: fake.capturing,
            "synchronize": lambda device=None: fake.events.append(("synchronize", "device")),
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)

    @contextlib.contextmanager
    def stream(self, stream: FakeStream):
        before, self.current = self.current, stream
        self.events.append(("enter", stream.name))
        try:
            yield
        finally:
            self.current = before
            self.events.append(("exit", stream.name))

    @contextlib.contextmanager
    def graph(self, graph: FakeGraph, pool=None, stream=None, **kwargs):
        mode = _Capture(graph)
        tolist = torch.Tensor.tolist

        def no_tolist(t):
            raise HostSyncInCapture(".tolist() reads device data on the host inside a CUDA graph capture")

        self.capturing = True
        torch.Tensor.tolist = no_tolist
        try:
            with mode:
                yield
        finally:
            torch.Tensor.tolist = tolist
            self.capturing = False
            for t, old in reversed(mode.saved):
                t.copy_(old)
