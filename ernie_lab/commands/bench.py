"""``ernie-lab bench``: speed against transformers as a table (README, "How speed is measured")."""

from __future__ import annotations

import argparse
import importlib.util
import platform
from pathlib import Path

import torch

from ernie_lab.commands import DTYPE_CHOICES, check_args, machine_load
from ernie_lab.model.placement import check_device


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="speed against transformers on one random checkpoint (prefill, decode, hooks, cache, load)",
        description="Save a random checkpoint of the config with transformers, load it into ernie_lab and "
        "transformers, and print each figure as ours / transformers / ratio (ratio > 1: ernie_lab is "
        "better). Figures are medians of interleaved repeats after a warm-up.",
    )
    parser.add_argument("--config", default="bench", help="preset to build (default: bench)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny config and workloads (a smoke test)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our decode step")
    parser.add_argument(
        "--real-shape",
        action="store_true",
        help="GPU only: ERNIE-4.5-21B-A3B's shape with random weights (ours only; default dtype bfloat16)",
    )
    parser.add_argument(
        "--quantization",
        choices=("nf4", "fp4", "int8"),
        default=None,
        help="compare this quantization with full precision (ours only; --config toy: the trained toy model)",
    )
    parser.add_argument(
        "--offload", choices=("experts",), default=None, help="compare expert offload (with --expert-slots)"
    )
    parser.add_argument(
        "--expert-slots", type=int, default=None, metavar="K", help="device slots per layer with --offload (default 4)"
    )
    parser.add_argument(
        "--tp",
        type=int,
        default=None,
        metavar="N",
        help="instead: tp_plan='auto' on N CPU processes (gloo) against one process (forward times, bytes held)",
    )
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    return parser


def run(args: argparse.Namespace) -> int:
    from ernie_lab.bench.bench import run_bench
    from ernie_lab.bench.real_shape import run_real_shape
    from ernie_lab.io.weights import parse_dtype

    check_args(
        args,
        at_least={"repeats": 1, "threads": 1, "expert_slots": 1, "tp": 1},
        requires={"expert_slots": "offload"},
        excludes={"tp": ("quantization", "offload", "real_shape", "compile")},
    )
    if args.compile and (args.quantization or args.offload) and not args.real_shape:
        raise ValueError("--compile applies to the plain and --real-shape benches, not to --quantization/--offload")
    if args.offload and args.expert_slots is None:
        args.expert_slots = 4
    if args.tp is not None:  # before any timing: the one-process model is measured first
        from ernie_lab.distributed.plan import check_size
        from ernie_lab.model.config import ErnieConfig

        check_size(ErnieConfig.preset("tiny" if args.quick else args.config), args.tp)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu or cuda, got {args.device!r}") from None
    check_device(torch.device("cuda") if args.real_shape and device.type == "cpu" else device)
    if args.csv and not Path(args.csv).resolve().parent.is_dir():
        raise FileNotFoundError(f"--csv {args.csv}: the folder {Path(args.csv).resolve().parent} does not exist")
    if importlib.util.find_spec("transformers") is None and not (args.quantization or args.offload or args.tp):
        raise ImportError(
            "needs transformers, the reference it is timed against; "
            "install the extra: pip install 'ernie-lab[bench]' (or '.[bench]' in a clone)"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.tp is not None:
        return run_tp(args)
    if (args.quantization or args.offload) and not args.real_shape:
        table = _variant_table(args)
        slots = f", offload {args.expert_slots} slots" if args.offload else ""
        config = "tiny (quick)" if args.quick else args.config
        what = f"config {config}, {args.quantization or 'full precision'}{slots} vs full precision, {args.device}"
    elif args.real_shape:
        device = "cuda" if args.device == "cpu" else args.device
        dtype = parse_dtype("bfloat16" if args.dtype == "float32" else args.dtype)
        slots = args.expert_slots if args.offload else None
        table = run_real_shape(
            dtype=dtype,
            device=device,
            repeats=args.repeats,
            compile=args.compile,
            quantization=args.quantization,
            expert_slots=slots,
        )
        variant = (f", {args.quantization}" if args.quantization else "") + (
            f", offload {slots} slots" if slots else ""
        )
        what = f"real shape 21b-a3b, {dtype}{variant}, {device}"
    else:
        table = run_bench(
            config=args.config,
            dtype=parse_dtype(args.dtype),
            device=args.device,
            repeats=args.repeats,
            quick=args.quick,
            compile=args.compile,
        )
        what = f"config {'tiny (quick)' if args.quick else args.config}, {args.dtype}, {args.device}"
    print(header(what))
    print(format_table(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


def _variant_table(args: argparse.Namespace):
    """Full precision vs ``--quantization`` / ``--offload experts`` (routing agreement from the
    routing wing, which the bench wing cannot import)."""
    from ernie_lab.bench.bench_quant import run_variant_bench
    from ernie_lab.io.weights import parse_dtype
    from ernie_lab.routing import collect_routing, routing_agreement

    def overlap(full, variant, ids) -> float:
        runs = [collect_routing(m, ids.cpu(), progress=False) for m in (full, variant)]
        return float(routing_agreement(*runs)["overlap"].mean())

    return run_variant_bench(
        config=args.config,
        dtype=parse_dtype(args.dtype),
        device=args.device,
        repeats=args.repeats,
        quick=args.quick,
        quantization=args.quantization,
        expert_slots=args.expert_slots if args.offload else None,
        routing_overlap=overlap,
    )


def run_tp(args: argparse.Namespace) -> int:
    """``--tp N``: tp_plan='auto' on N CPU processes against one process (bench/tp_bench.py)."""
    from ernie_lab.bench.tp_bench import run_tp_bench

    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    table = run_tp_bench(config=args.config, n=args.tp, repeats=args.repeats, quick=args.quick)
    config = "tiny (quick)" if args.quick else args.config
    print(header(f"config {config}, float32, cpu, tp_plan='auto' on {args.tp} processes (gloo, 1 thread each)"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


def header(what: str) -> str:
    """One line naming the setup, with a warning when other processes compete for the cores."""
    import transformers

    line = (
        f"ernie-lab bench: {what}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    load, cores = machine_load()
    if load > 0.5 * cores:
        # a multi-threaded region waits for its slowest thread; with the cores shared it can wait a
        # whole scheduler slice, so timings collapse on both sides (ratios stay roughly meaningful)
        hint = " (try --threads 1)" if torch.get_num_threads() > 1 else ""
        line += f"\nwarning: load average {load:.1f} on {cores} cores: other processes compete, timings are noisy{hint}"
    return line


def format_table(table) -> str:
    """The table with numbers rounded for reading (3 significant digits, ratios as 1.23x)."""

    def num(v) -> str:
        if v is None or v != v:  # None or NaN
            return "-"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"

    shown = table.copy()
    for column in shown.columns.difference(["figure", "ratio", "unit", "note"]):
        shown[column] = shown[column].map(num)
    shown["ratio"] = table["ratio"].map(lambda v: "-" if v is None or v != v else f"{v:.2f}x")
    return shown.to_string(index=False)
