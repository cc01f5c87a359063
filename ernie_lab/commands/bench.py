"""``ernie-lab bench``: speed against transformers as a table (README, "How speed is measured")."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys

import torch

from ernie_lab.commands import DTYPE_CHOICES, machine_load


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
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    return parser


def run(args: argparse.Namespace) -> int:
    from ernie_lab.generation.bench import run_bench, run_real_shape
    from ernie_lab.io.weights import parse_dtype

    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if importlib.util.find_spec("transformers") is None:
        print(
            "ernie-lab bench: error: needs transformers, the reference it is timed against; "
            "install the extra: pip install 'ernie-lab[bench]' (or '.[bench]' in a clone)",
            file=sys.stderr,
        )
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.real_shape:
        device = "cuda" if args.device == "cpu" else args.device
        dtype = parse_dtype("bfloat16" if args.dtype == "float32" else args.dtype)
        table = run_real_shape(dtype=dtype, device=device, repeats=args.repeats, compile=args.compile)
        what = f"real shape 21b-a3b, {dtype}, {device}"
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
    shown["ours"] = shown["ours"].map(num)
    shown["transformers"] = shown["transformers"].map(num)
    shown["ratio"] = table["ratio"].map(lambda v: "-" if v is None or v != v else f"{v:.2f}x")
    return shown.to_string(index=False)
