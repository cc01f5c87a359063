"""An activation cache on disk: one safetensors file plus a JSON sidecar.

``cache.safetensors`` holds the tensors; ``cache.json`` (the same path with suffix ``.json``) names
every entry with its dtype and shape, readable without torch. Both carry one random ``save_id``
(the sidecar in JSON, the tensors in the safetensors metadata), so a sidecar from another save is
detected on load.

Writes are atomic per file, as in :mod:`ernie_lab.io.atomic` (which this wing cannot import: io
imports the model): each file is written under a temporary name in the destination folder, flushed
to disk and renamed over its final name. The tensors are renamed first, the sidecar last; a reader
that finds a pair from two different saves (a crash between the renames) gets
:class:`CacheFileError`, never mixed data.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "ernie_lab.ActivationCache"
VERSION = 1


class CacheExistsError(FileExistsError):
    """The destination of ``cache.save`` exists and ``overwrite`` was not set."""


class CacheFileError(ValueError):
    """A saved cache that cannot be read: missing, unreadable or mismatched files (the message names them)."""


def cache_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(tensors file, sidecar)`` for ``path``: the sidecar is ``path`` with suffix ``.json``."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"a cache path must be a str or a path, got {type(path).__name__}")
    tensors = Path(path).expanduser()
    if tensors.suffix == ".json":
        raise ValueError(f"{tensors}: name the tensors file (e.g. cache.safetensors), not the JSON sidecar")
    return tensors, tensors.with_suffix(".json")


def save_tensors(store: dict[str, torch.Tensor], path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write ``store`` to ``path`` and its sidecar (see the module docstring)."""
    tensors_path, sidecar_path = cache_paths(path)
    existing = [str(p) for p in (tensors_path, sidecar_path) if p.exists()]
    if existing and not overwrite:
        raise CacheExistsError(f"{' and '.join(existing)} already exist; pass overwrite=True to replace them")
    if tensors_path.is_dir():
        raise IsADirectoryError(f"{tensors_path} is a folder; give a file name such as cache.safetensors")
    save_id = uuid.uuid4().hex
    tensors, seen = {}, set()
    for name, t in store.items():
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (views of one activation): copy those
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    sidecar = {
        "format": FORMAT,
        "version": VERSION,
        "save_id": save_id,
        "tensors_file": tensors_path.name,
        "entries": [
            {"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for n, t in tensors.items()
        ],
    }
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_tensors, tmp_sidecar = _temp(tensors_path), _temp(sidecar_path)
    try:
        save_file(tensors, str(tmp_tensors), metadata={"format": FORMAT, "save_id": save_id})
        with open(tmp_sidecar, "w", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=1)
            f.write("\n")
        for tmp in (tmp_tensors, tmp_sidecar):
            _fsync(tmp)
        os.replace(tmp_tensors, tensors_path)
        os.replace(tmp_sidecar, sidecar_path)
    finally:
        for tmp in (tmp_tensors, tmp_sidecar):
            tmp.unlink(missing_ok=True)


def load_tensors(path: str | os.PathLike, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_tensors` wrote, in the saved order, checked against the sidecar."""
    tensors_path, sidecar_path = cache_paths(path)
    for p in (tensors_path, sidecar_path):
        if not p.is_file():
            raise CacheFileError(f"{p} does not exist: a saved cache is {tensors_path.name} plus {sidecar_path.name}")
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        entries = {e["name"]: e for e in sidecar["entries"]}
        save_id = sidecar["save_id"]
    except (ValueError, KeyError, TypeError) as err:
        raise CacheFileError(f"{sidecar_path} is not an ernie_lab cache sidecar: {err!r}") from err
    if sidecar.get("format") != FORMAT:
        raise CacheFileError(f"{sidecar_path}: format {sidecar.get('format')!r}, expected {FORMAT!r}")
    store = {}
    try:
        with safe_open(str(tensors_path), framework="pt", device=str(device or "cpu")) as f:
            if (f.metadata() or {}).get("save_id") != save_id:
                raise CacheFileError(
                    f"{tensors_path} and {sidecar_path} come from different saves (save_id differs); "
                    "save the cache again"
                )
            if set(f.keys()) != set(entries):
                missing = sorted(set(entries) ^ set(f.keys()))
                raise CacheFileError(f"{tensors_path} and {sidecar_path} disagree on the entries {missing[:5]}")
            for name, entry in entries.items():
                store[name] = f.get_tensor(name)
                got = (str(store[name].dtype).removeprefix("torch."), list(store[name].shape))
                if got != (entry["dtype"], entry["shape"]):
                    raise CacheFileError(f"{name}: {tensors_path} holds {got}, the sidecar says {entry}")
    except OSError as err:
        raise CacheFileError(f"cannot read {tensors_path}: {err}") from err
    except Exception as err:  # the Rust reader raises its own errors on a damaged file
        if isinstance(err, CacheFileError):
            raise
        raise CacheFileError(f"{tensors_path} is not a readable safetensors file: {err}") from err
    return store


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
