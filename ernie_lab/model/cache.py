"""ActivationCache: activations by hook name, as ``run_with_cache`` returns them.

A cache made by ``model.run_with_cache`` knows its model (``cache.model``), which the residual-stream
methods of :class:`ernie_lab.model.resid_stack.ResidStack` need (norm weights and eps, ``W_U``, the
tokenizer for string tokens). Gradients cached with ``run_with_cache(..., incl_bwd=True)`` sit next
to the activations under ``<name>_grad`` (TransformerLens' names).

``cache.save(path)`` writes the tensors to one safetensors file and a JSON sidecar (names, dtypes,
shapes) next to it; ``ActivationCache.load(path, model=None)`` reads them back bit for bit. See
:mod:`ernie_lab.model.cache_files`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from typing import Any

import torch

from ernie_lab.model.cache_files import load_tensors, save_tensors
from ernie_lab.model.resid_stack import ResidStack


class ActivationCache(ResidStack):
    """Activations by hook name: ``cache[name]``, ``keys()``, ``stack()``, ``to()``, ``nbytes``, the
    residual-stream methods (``accumulated_resid``, ``decompose_resid``, ``apply_ln_to_stack``,
    ``logit_attrs``), ``save(path)`` / ``ActivationCache.load(path)``.

    ``model``: the model that produced the activations (set by ``run_with_cache``); None for a cache
    built by hand or loaded without one: the methods that need weights then say so.
    """

    def __init__(self, store: dict[str, torch.Tensor], model: Any = None):
        self._store = store
        self.model = model

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._store:
            close = difflib.get_close_matches(name, self._store, n=5, cutoff=0.6)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise KeyError(f"{name!r} is not in this cache ({len(self._store)} entries){hint}")
        return self._store[name]

    def __contains__(self, name: str) -> bool:
        return name in self._store

    def __len__(self) -> int:
        return len(self._store)

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def keys(self):
        return self._store.keys()

    def items(self):
        return self._store.items()

    def layers(self, suffix: str) -> list[int]:
        """Layers holding ``blocks.{L}.{suffix}``, ascending."""
        found = []
        for name in self._store:
            head, _, rest = name.partition(".")
            layer, _, tail = rest.partition(".")
            if head == "blocks" and tail == suffix:
                found.append(int(layer))
        return sorted(found)

    def stack(self, suffix: str) -> torch.Tensor:
        """Stack ``blocks.{L}.{suffix}`` over the layers that have it: ``[layer ...]``.

        For MoE points only MoE layers are stacked; ``cache.layers(suffix)`` says which.
        """
        layers = self.layers(suffix)
        if not layers:
            raise KeyError(f"no entry blocks.*.{suffix} in this cache")
        return torch.stack([self._store[f"blocks.{L}.{suffix}"] for L in layers])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A new cache with every tensor moved/cast (integer tensors keep their dtype)."""
        out = {}
        for k, v in self._store.items():
            out[k] = v.to(device=device, dtype=dtype if dtype and v.is_floating_point() else None)
        return ActivationCache(out, self.model)

    def cpu(self) -> ActivationCache:
        return self.to("cpu")

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._store.values())

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the cache to ``path`` (safetensors) and ``path`` with suffix ``.json`` (the sidecar:
        names, dtypes, shapes). Both files are written to temporary names and renamed into place, so
        a reader never sees a half-written file. An existing file raises
        :class:`~ernie_lab.model.cache_files.CacheExistsError` unless ``overwrite=True``. The model
        is not saved: pass it to :meth:`load` for the methods that need weights."""
        save_tensors(self._store, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None, device: torch.device | str | None = None):
        """The cache :meth:`save` wrote to ``path``, bit for bit (on ``device``, default CPU);
        ``model`` becomes ``cache.model``. A sidecar that does not match the tensors raises
        :class:`~ernie_lab.model.cache_files.CacheFileError`."""
        return cls(load_tensors(path, device=device), model)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self._store)} entries, {self.nbytes / 2**20:.1f} MiB)"
