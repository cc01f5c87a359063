"""Safetensors checkpoints in the Hugging Face hub layout: key mapping, reading, sharded writing.

The hub stores routed experts one by one (``mlp.experts.{e}.{gate,up,down}_proj.weight``, each
``[d_out d_in]``); the model stacks them pre-transposed, in the layout its grouped matmuls take
(``mlp.experts.gate_up_proj [expert d_model 2*d_expert]`` holds gate columns then up columns,
``mlp.experts.down_proj [expert d_expert d_model]``), so a hub key maps onto a transposed view. Every
other key is a module path of ErnieMoE.
A :class:`Slot` says where one hub tensor lives inside the model, so loading and saving share one map.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ernie_lab.model.placement import is_fp32_key

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_STACKED = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
# multi-token-prediction heads: "mtp_block.0...", "model.mtp_emb_norm.0.weight", ...
_MTP_KEY = re.compile(r"(^|\.)mtp")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """A checkpoint key is missing, unexpected or has the wrong shape, or a file is unreadable;
    the message names the key (with both shapes) or the file."""


@dataclass(frozen=True)
class Slot:
    """Where one hub tensor lives in the model: ``state[name][expert].t()[rows]`` (stacked experts, stored
    transposed) or ``state[name]``, of the hub's shape ``shape``."""

    name: str  # model state_dict key (parameter or buffer)
    expert: int | None  # index into a stacked expert tensor, or None
    rows: slice | None  # gate or up half of gate_up_proj (hub rows, model columns), or None
    shape: tuple[int, ...]

    @property
    def fp32(self) -> bool:
        """Router weight and correction bias: always stored and kept in fp32."""
        return is_fp32_key(self.name)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of the model tensor ``tensor`` (``state[name]``) this slot covers."""
        if self.expert is not None:
            tensor = tensor[self.expert].t()  # stacked experts are stored [d_in d_out]
        if self.rows is not None:
            tensor = tensor[self.rows]
        return tensor


@dataclass(frozen=True)
class Shard:
    """The part ``[start, stop)`` along ``dim`` of a full model tensor that this process holds
    (tensor or expert parallelism). For stacked experts ``dim`` is 0, the expert axis."""

    dim: int
    start: int
    stop: int

    def read(self, stored) -> torch.Tensor:
        """This part of a stored tensor, from a safetensors ``get_slice`` handle (reads only it)."""
        index = (slice(None),) * self.dim + (slice(self.start, self.stop),)
        return stored[index]


def is_mtp_key(key: str) -> bool:
    """Multi-token-prediction keys, which ERNIE 4.5 ships but inference (and transformers) ignores."""
    return bool(_MTP_KEY.search(key))


def hub_layout(model: nn.Module) -> dict[str, Slot]:
    """Hub key -> :class:`Slot` for every tensor of ``model`` (works on the meta device).

    With tied embeddings ``lm_head.weight`` is the embedding, so it has no key of its own (exactly what
    transformers writes); ``lm_head.bias`` (``use_bias``) still does.
    """
    cfg = model.config
    d_expert = cfg.moe_intermediate_size
    slots: dict[str, Slot] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        shape = tuple(tensor.shape)
        m = _STACKED.match(name)
        if m is None:
            slots[name] = Slot(name, None, None, shape)
            continue
        prefix = m.group("prefix")
        for e in range(shape[0]):
            if m.group("proj") == "down_proj":
                slots[f"{prefix}.{e}.down_proj.weight"] = Slot(name, e, None, (shape[2], shape[1]))
            else:
                half = (d_expert, shape[1])
                slots[f"{prefix}.{e}.gate_proj.weight"] = Slot(name, e, slice(0, d_expert), half)
                slots[f"{prefix}.{e}.up_proj.weight"] = Slot(name, e, slice(d_expert, 2 * d_expert), half)
    return slots


# ---------------------------------------------------------------------------------------- reading
@contextlib.contextmanager
def open_file(path: Path) -> Iterator:
    """``safe_open`` whose failures (truncated, corrupt, not safetensors) name the file."""
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as err:  # SafetensorError, OSError: both mean an unusable file
        raise CheckpointError(f"cannot read checkpoint file {path}: {err}") from err
    with handle as f:
        yield f


def check_link(path: Path) -> None:
    """CheckpointError when ``path`` is a symbolic link that does not resolve (a loop, or a target that
    is gone): ``exists()`` is False for both, which would read as "no such file"."""
    if not path.is_symlink() or path.exists():
        return
    try:
        path.resolve(strict=True)
        reason = "it does not resolve"
    except FileNotFoundError:
        reason = f"its target {path.readlink()} does not exist"
    except (RuntimeError, OSError):  # RuntimeError: Python < 3.13's "Symlink loop"; OSError: ELOOP
        reason = "it is a symlink loop"
    raise CheckpointError(f"{path} is a symbolic link that cannot be read: {reason}")


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Hub key -> the safetensors file holding it, from the shard index when present.

    Raises FileNotFoundError when the directory has no safetensors checkpoint and CheckpointError
    when the index is malformed or names a file that does not exist.
    """
    index, single = directory / INDEX_FILE, directory / SINGLE_FILE
    check_link(index)
    check_link(single)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:  # bad JSON or UTF-8, no weight_map, not an object
            raise CheckpointError(f"{index} is not a valid shard index ({type(err).__name__}: {err})") from err
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        files = {key: directory / rel for key, rel in weight_map.items()}
        for path in sorted(set(files.values())):
            if path.resolve().parent != directory.resolve():
                shard = str(path.relative_to(directory))
                raise CheckpointError(f"{index.name} names shard {shard!r}, which is not a file name in {directory}")
            check_link(path)
            if not path.is_file():
                raise CheckpointError(f"{index.name} names shard {path.name}, which does not exist in {directory}")
        return files
    if single.exists():
        with open_file(single) as f:
            return dict.fromkeys(f.keys(), single)
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pdparams"))
    hint = f" (found {others[:3]}: only safetensors checkpoints are supported)" if others else ""
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}")


def by_file(files: dict[str, Path], keys: list[str]) -> dict[Path, list[str]]:
    """Group ``keys`` by the file that holds them (files in name order, keys in given order)."""
    groups: dict[Path, list[str]] = {}
    for key in keys:
        groups.setdefault(files[key], []).append(key)
    return dict(sorted(groups.items()))


def tensor_dtype(files: dict[str, Path], key: str) -> torch.dtype:
    """The stored dtype of ``key`` (read from the file header only)."""
    with open_file(files[key]) as f:
        code = f.get_slice(key).get_dtype()
    if code not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{key} in {files[key].name} has dtype {code}; expected a float dtype")
    return _SAFETENSORS_DTYPES[code]


class TensorReader:
    """Reads stored tensors of one safetensors file with plain ``readinto`` calls, straight into the
    destination memory when dtype and device allow. Unlike ``safe_open``'s memory map, the file's
    pages never count towards the process's resident memory, so loading peaks near 1x the model.

    Use after :func:`open_file` has validated the file (header and data coverage).
    """

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        size = int.from_bytes(self._file.read(8), "little")
        self.header = json.loads(self._file.read(size))
        self._data_start = 8 + size

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def read_into(self, key: str, dest: torch.Tensor) -> None:
        """Copy stored tensor ``key`` into ``dest`` (same shape; any dtype and device)."""
        entry = self.header[key]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{key} in {self.path.name} has dtype {entry['dtype']}; expected a float dtype")
        direct = dest.device.type == "cpu" and dest.dtype == dtype and dest.is_contiguous()
        buffer = dest if direct else torch.empty(entry["shape"], dtype=dtype)
        begin, end = entry["data_offsets"]
        if buffer.numel():
            self._file.seek(self._data_start + begin)
            got = self._file.readinto(buffer.view(-1).view(torch.uint8).numpy())
            if got != end - begin:
                raise CheckpointError(f"{self.path}: {key} is cut short ({got} of {end - begin} bytes)")
        if not direct:
            dest.copy_(buffer)


# ---------------------------------------------------------------------------------------- writing
def parse_size(size: int | str) -> int:
    """Bytes from ``1_000_000``, ``"500MB"`` (10^6), ``"2GiB"`` (2^30), ``"20KB"``..."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if m is None:
            raise ValueError(f"max_shard_size={size!r}: expected bytes as an int or a string like '5GB' or '500MiB'")
        unit = (m.group(2) or "B").upper()
        scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
        value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return value


def plan_shards(sizes: dict[str, int], max_shard_size: int | None) -> list[list[str]]:
    """Split keys (in order) into shards of at most ``max_shard_size`` bytes; a tensor larger than the
    limit gets a shard of its own (it cannot be split)."""
    if max_shard_size is None:
        return [list(sizes)]
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes.items():
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


def write_checkpoint(
    tensors: dict[str, tuple[torch.Size, torch.dtype]],
    materialise,
    directory: Path,
    max_shard_size: int | None,
    progress=None,
) -> list[Path]:
    """Write ``tensors`` (hub key -> (shape, dtype)) into ``directory`` as safetensors.

    ``materialise(key)`` returns the contiguous CPU tensor of one key; it is called shard by shard so
    host memory holds at most one shard. One shard -> ``model.safetensors``; several ->
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (transformers' naming).
    """
    sizes = {k: shape.numel() * dtype.itemsize for k, (shape, dtype) in tensors.items()}
    shards = plan_shards(sizes, max_shard_size)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for keys, name in zip(shards, names, strict=True):
        save_file({k: materialise(k) for k in keys}, str(directory / name), metadata={"format": "pt"})
        if progress is not None:
            progress.update(len(keys))
    if n > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {k: name for keys, name in zip(shards, names, strict=True) for k in keys},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [directory / name for name in names]
