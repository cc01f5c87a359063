"""``ernie-lab info SRC``: config, dense/MoE layer map, total and active parameters, memory.

SRC is a preset (``21b-a3b``, ``300b-a47b``, ``bench``, ``tiny``), ``toy``, a local checkpoint
directory or a hub id (only its ``config.json`` is downloaded). Nothing is loaded into memory: counts
come from a model built on the meta device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ernie_lab.commands import SRC_HELP
from ernie_lab.io.sources import resolve_source
from ernie_lab.model.config import PRESETS, ErnieConfig
from ernie_lab.model.params import COMPONENTS, count_params, human, weight_bytes
from ernie_lab.model.quant import FORMATS


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info",
        help="show a model's config, layer map, parameter counts and memory",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("src", metavar="SRC", help=f"a preset ({', '.join(PRESETS)}) or {SRC_HELP}")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--quantization", choices=FORMATS, default=None, help="also show the weights' memory quantized this way"
    )
    parser.add_argument(
        "--expert-slots",
        type=int,
        default=None,
        metavar="K",
        help="also show the device memory with offload='experts' and K expert slots per layer",
    )
    parser.add_argument(
        "--tp", type=int, default=None, metavar="N", help="also show the weights per GPU under tp_plan='auto' on N GPUs"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    config, origin, directory = load_config(args.src)
    if args.expert_slots is not None and not 1 <= args.expert_slots <= config.moe_num_experts:
        raise ValueError(f"--expert-slots must be in 1..{config.moe_num_experts}, got {args.expert_slots}")
    counts = count_params(config)
    memory = weight_bytes(config, args.quantization, expert_slots=args.expert_slots)
    parallel = tensor_parallel(config, args.tp) if args.tp is not None else None
    if args.json:
        extra = {"memory": memory, "tensor_parallel": parallel}
        print(json.dumps({**summary(config, counts, origin, directory), **extra}, indent=2, default=str))
    else:
        print(render(config, counts, origin, directory))
        if args.quantization or args.expert_slots:
            print(memory_line(memory, args.quantization, args.expert_slots))
        if parallel is not None:
            print(render_parallel(parallel))
    return 0


def memory_line(memory: dict[str, int], quantization: str | None, expert_slots: int | None) -> str:
    """The weights' memory as loaded with ``quantization`` (bf16 for the rest) and expert offload."""
    line = (
        f"loaded      {quantization or 'bf16'}: {human(memory['total'], 'B')} of weights "
        f"(routed experts {human(memory['routed_experts'], 'B')})"
    )
    if expert_slots:
        line += f"; offload with {expert_slots} expert slots per layer: {human(memory['device'], 'B')} on the device"
    return line


def tensor_parallel(config: ErnieConfig, n: int) -> dict:
    """Bytes per GPU (bf16 weights, fp32 router) under ``tp_plan="auto"`` on ``n`` GPUs."""
    # the plan imports torch's DTensor machinery (seconds): only --tp pays for it
    from ernie_lab.distributed.plan import memory_split, valid_sizes

    if n < 1:
        raise ValueError(f"--tp must be >= 1, got {n}")
    split, replicated = memory_split(config, n, torch.bfloat16)
    return {
        "gpus": n,
        "per_gpu_bytes": split + replicated,
        "replicated_bytes": replicated,
        "valid": valid_sizes(config),
    }


def render_parallel(p: dict) -> str:
    return (
        f"tensor parallel  tp_plan='auto' on {p['gpus']} GPUs: {human(p['per_gpu_bytes'], 'B')} of bf16 weights "
        f"per GPU, of which {human(p['replicated_bytes'], 'B')} replicated (embedding, LM head, norms, "
        f"routers); plus KV cache and activations. Valid GPU counts: {p['valid']}"
    )


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
