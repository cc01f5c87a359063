"""The ``ernie-lab`` subcommands, one module each (``add_parser`` + ``run``), and the options they share."""

from __future__ import annotations

import argparse
import os
import sys

from ernie_lab.io.sources import SRC_FORMS

DTYPE_CHOICES = ("bfloat16", "float16", "float32")  # --dtype values; ernie_lab.io.weights.parse_dtype reads them
SRC_HELP = SRC_FORMS  # what SRC may be, in --help and in error messages alike


def add_threads_option(parser: argparse.ArgumentParser, overrides: str = "") -> None:
    """``--threads N`` for a command that computes (see :func:`apply_threads`)."""
    also = f"; overrides {overrides}" if overrides else ""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=f"torch CPU threads (default: torch's, or 1 when other processes keep the cores busy){also}",
    )


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given(args: argparse.Namespace, dest: str) -> bool:
    value = getattr(args, dest, None)
    return value is not None and value is not False  # 0 is given (``0 in (None, False)`` is True)


def check_args(
    args: argparse.Namespace,
    at_least: dict[str, int] | None = None,
    requires: dict[str, str] | None = None,
    excludes: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Option values a command cannot use, as one-line ValueErrors before any work (the CLI prints
    them and exits 2): ``at_least`` {dest: minimum} for integer options given; ``requires`` {dest:
    other}: an option that only modifies ``other`` (without it, it would be dropped); ``excludes``
    {dest: (others, ...)}: options ``dest`` ignores, refused together with it."""
    for dest, other in (requires or {}).items():
        if _given(args, dest) and not _given(args, other):
            raise ValueError(f"{_flag(dest)} needs {_flag(other)} (it modifies that option; alone it would be ignored)")
    for dest, others in (excludes or {}).items():
        clash = [_flag(o) for o in others if _given(args, dest) and _given(args, o)]
        if clash:
            raise ValueError(f"{_flag(dest)} does not combine with {', '.join(clash)} (they would be ignored)")
    for dest, low in (at_least or {}).items():
        value = getattr(args, dest, None)
        if value is not None and value < low:
            raise ValueError(f"{_flag(dest)} must be >= {low}, got {value}")


def machine_load() -> tuple[float, int]:
    """(1-minute load average, CPU cores); the load is 0.0 where the OS does not report one."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return load, os.cpu_count() or 1


def apply_threads(requested: int | None, command: str) -> int | None:
    """Set torch's CPU threads for a command; returns the count set, or None when torch's stays.

    ``requested`` (``--threads``) wins. Otherwise, when the load average exceeds half the cores, one
    thread is used and one line on stderr says so: a multi-threaded kernel waits for its slowest
    thread, and with the cores shared that can be a whole scheduler slice per call (2 threads ran
    the analyses 9-18x slower than 1 on a busy 2-core machine).
    """
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        torch.set_num_threads(requested)
        return requested
    load, cores = machine_load()
    if load > 0.5 * cores and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        print(
            f"ernie-lab {command}: warning: load average {load:.1f} on {cores} cores, using 1 torch thread "
            "(other processes compete for the cores); --threads N chooses",
            file=sys.stderr,
        )
        return 1
    return None
