"""Load ERNIE 4.5 MoE checkpoints in the Hugging Face layout (single file or sharded safetensors).

Hub keys map one-to-one onto module paths, except routed experts, which the hub stores per expert
(``mlp.experts.{e}.{gate,up,down}_proj.weight``) and we stack (``mlp.experts.gate_up_proj[e]`` holds
gate rows then up rows; ``mlp.experts.down_proj[e]``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ernie_lab.config import ErnieConfig
from ernie_lab.model import ErnieMoE
from ernie_lab.sources import resolve_source

_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


class CheckpointError(ValueError):
    """A checkpoint key is missing, unexpected or has the wrong shape; the message names it."""


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (via the shard index when present)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def internal_target(key: str, d_expert: int) -> tuple[str, int | None, slice | None]:
    """Where hub ``key`` lands: (parameter name, expert index or None, row slice or None)."""
    m = _EXPERT_KEY.match(key)
    if not m:
        return key, None, None
    prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
    if proj == "down":
        return f"{prefix}.down_proj", e, None
    rows = slice(0, d_expert) if proj == "gate" else slice(d_expert, 2 * d_expert)
    return f"{prefix}.gate_up_proj", e, rows


def load_model(src: str | Path, dtype: torch.dtype | None = None, device: str | None = None) -> ErnieMoE:
    """Load ``src`` ("toy", a local Hugging Face-layout directory or a hub id) into an ErnieMoE."""
    directory = resolve_source(src)
    config = ErnieConfig.from_hf(directory)
    model = ErnieMoE(config, init=False)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    with torch.no_grad():
        for path in checkpoint_files(directory):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key.startswith("mtp"):
                        continue
                    name, e, rows = internal_target(key, config.moe_intermediate_size)
                    if name not in params:
                        raise CheckpointError(f"unexpected key {key!r} in {path.name}")
                    target = params[name]
                    if e is not None:
                        target = target[e]
                    if rows is not None:
                        target = target[rows]
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise CheckpointError(
                            f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(target.shape)}"
                        )
                    target.copy_(tensor)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()
