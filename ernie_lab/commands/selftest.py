"""``ernie-lab selftest``: the project's own checks from an installed checkout, one command.

Without flags: the CPU checks of the decode path (operator budget, generation). With ``--gpu``, on
a machine with a CUDA GPU: the tests marked ``gpu`` (bf16 parity with transformers on CUDA,
gathered-expert decode, CUDA-graph decode, hooks forcing eager steps), then the real-shape bench
(ERNIE-4.5-21B-A3B's shape, random bf16 weights). Without CUDA ``--gpu`` says so and runs nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from ernie_lab.commands import check_args

CPU_TESTS = ["tests/bench/test_op_count.py", "tests/generation/test_generate.py"]
GPU_TESTS = ["tests/generation/test_gpu_decode.py"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "selftest",
        help="run the project's decode checks (--gpu: the CUDA tests and the real-shape bench)",
        description="Run the project's own tests for the decode path from a source checkout. With --gpu "
        "(a CUDA GPU needed): the GPU-marked tests, then `bench --real-shape`; under 8 minutes on one GPU.",
    )
    parser.add_argument("--gpu", action="store_true", help="the CUDA checks and the real-shape bench")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the real-shape bench (default 3)")
    return parser


def run(args: argparse.Namespace) -> int:
    check_args(args, at_least={"repeats": 1})
    if args.gpu and not torch.cuda.is_available():
        print("selftest --gpu: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing run")
        return 0
    root = Path(__file__).resolve().parents[2]
    if not (root / "tests" / "conftest.py").is_file():
        raise FileNotFoundError(
            f"selftest needs the source checkout's tests/ folder next to the package; not in {root}"
        )
    tests = GPU_TESTS + ["-m", "gpu"] if args.gpu else CPU_TESTS
    code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=root).returncode
    if code != 0 or not args.gpu:
        return code
    from ernie_lab.bench.real_shape import run_real_shape
    from ernie_lab.commands.bench import format_table, header

    table = run_real_shape(device="cuda", repeats=args.repeats, compile=True)
    print(header(f"real shape 21b-a3b, {torch.bfloat16}, cuda, compiled decode (CUDA graphs)"))
    print(format_table(table))
    return 0
