"""``ernie-lab info SRC``: config, dense/MoE layer map, total and active parameters, memory.

SRC is a preset (``21b-a3b``, ``300b-a47b``, ``bench``, ``tiny``), ``toy``, a local checkpoint
directory or a hub id (only its ``config.json`` is downloaded). Nothing is loaded into memory: counts
come from a model built on the meta device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ernie_lab.commands import SRC_HELP
from ernie_lab.io.sources import resolve_source
from ernie_lab.model.config import PRESETS, ConfigError, ErnieConfig
from ernie_lab.model.params import COMPONENTS, count_params, human


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info",
        help="show a model's config, layer map, parameter counts and memory",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("src", metavar="SRC", help=f"a preset ({', '.join(PRESETS)}) or {SRC_HELP}")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        config, origin, directory = load_config(args.src)
    except (FileNotFoundError, RuntimeError, ConfigError) as err:
        print(f"ernie-lab info: error: {err}", file=sys.stderr)
        return 1
    counts = count_params(config)
    if args.json:
        print(json.dumps(summary(config, counts, origin, directory), indent=2, default=str))
    else:
        print(render(config, counts, origin, directory))
    return 0


def load_config(src: str) -> tuple[ErnieConfig, str, Path | None]:
    """(config, where it came from, checkpoint directory or None for a preset)."""
    if src in PRESETS and not Path(src).exists():
        return ErnieConfig.preset(src), f"preset {src!r}", None
    directory = resolve_source(src, allow_patterns=["config.json"])
    return ErnieConfig.from_hf(directory), str(directory), directory


def layer_ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``; ``[]`` -> ``"none"``."""
    if not layers:
        return "none"
    spans, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None], strict=True):
        if cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(spans)


def layer_map(config: ErnieConfig) -> str:
    """One character per layer: ``D`` dense, ``M`` MoE (``DMMM...``)."""
    return "".join("M" if config.is_moe_layer(i) else "D" for i in range(config.num_hidden_layers))


def summary(config: ErnieConfig, counts: dict, origin: str, directory: Path | None) -> dict:
    moe = config.moe_layers
    dense = [i for i in range(config.num_hidden_layers) if i not in moe]
    return {
        "source": origin,
        "config": {**config.to_hf_dict(), "head_dim": config.d_head},
        "layers": {"map": layer_map(config), "dense": dense, "moe": moe},
        "params": counts,
        "checkpoint": checkpoint_summary(directory),
    }


def checkpoint_summary(directory: Path | None) -> dict | None:
    """Files and bytes of a local safetensors checkpoint (None when there is none)."""
    if directory is None:
        return None
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def render(config: ErnieConfig, counts: dict, origin: str, directory: Path | None) -> str:
    lines = [f"source      {origin}", "", "config"]
    fields = [f.name for f in dataclasses.fields(config) if f.name != "extra"]
    width = max(map(len, fields))
    for name in fields:
        value = getattr(config, name)
        if name == "head_dim" and value is None:
            value = f"None (-> {config.d_head})"
        lines.append(f"  {name:<{width}}  {value}")
    if config.extra:
        extra = ", ".join(f"{k}={v!r}" for k, v in sorted(config.extra.items()))
        lines.append(f"  {'(extra)':<{width}}  {extra}")
    moe = config.moe_layers
    dense = [i for i in range(config.num_hidden_layers) if i not in moe]
    lines += [
        "",
        f"layers      {config.num_hidden_layers}: {layer_map(config)}  (D dense, M MoE)",
        f"  dense     {layer_ranges(dense)}",
        f"  MoE       {layer_ranges(moe)}  ({config.moe_num_experts} experts, top-{config.moe_k}, "
        f"{config.moe_num_shared_experts} shared)",
        "",
        f"parameters  total {human(counts['total'])} ({counts['total']:,}), "
        f"active {human(counts['active'])} per token ({counts['active']:,}; "
        f"{human(counts['active_non_embedding'])} without embedding and LM head)",
        f"  {'component':<16}{'total':>12}{'active':>12}",
    ]
    for name in COMPONENTS:
        c = counts["components"][name]
        lines.append(f"  {name:<16}{human(c['total']):>12}{human(c['active']):>12}")
    b, a = counts["bytes"], counts["active_bytes"]
    lines += [
        "",
        f"memory      bf16 {human(b['bf16'], 'B')} (active {human(a['bf16'], 'B')}), "
        f"fp32 {human(b['fp32'], 'B')} (active {human(a['fp32'], 'B')}); router kept in fp32",
    ]
    ckpt = checkpoint_summary(directory)
    if ckpt is not None:
        lines.append(f"checkpoint  {ckpt['files']} safetensors file(s), {human(ckpt['bytes'], 'B')} on disk")
    return "\n".join(lines)
