"""``ernie-lab report [SPEC] --out DIR [--quick]``: run the analyses of a YAML/TOML spec and write a
self-contained report folder (index.html, figures/, tables/, manifest.json).

Without SPEC the packaged default spec runs: a tour of every analysis on the embedded toy model.
``--quick`` applies the spec's ``quick`` overrides (smaller datasets, fewer layers).
"""

from __future__ import annotations

import argparse

from ernie_lab.commands import add_threads_option, apply_threads, check_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="run analyses from a spec file and write an HTML/PNG/CSV report folder",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("spec", metavar="SPEC", nargs="?", default=None, help="YAML or TOML spec (default: the tour)")
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder to write (replaced atomically)")
    parser.add_argument("--quick", action="store_true", help="apply the spec's quick overrides for a fast run")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR even when it is not an earlier report (files lost)"
    )
    parser.add_argument(
        "--trust-recipes",
        action="store_true",
        help="let the spec run recipes given as paths to .py files (Python code; bundled names need no trust)",
    )
    add_threads_option(parser, overrides="the spec's threads key")
    return parser


def run(args: argparse.Namespace) -> int:
    from ernie_lab.report.runner import run_report
    from ernie_lab.report.spec import load_spec

    check_args(args, at_least={"threads": 1})
    threads = args.threads
    # the spec is only parsed here: resolving it (and checking its recipes) happens once, in run_report
    raw = load_spec(args.spec)
    quick = raw.get("quick") if args.quick and isinstance(raw.get("quick"), dict) else {}
    if threads is None and quick.get("threads", raw.get("threads")) is None:
        threads = apply_threads(None, "report")  # 1 on a busy machine, else None (torch's default)
    elif threads is not None:
        apply_threads(threads, "report")
    out = run_report(
        args.spec,
        args.out,
        quick=args.quick,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        trust_recipes=args.trust_recipes,
        threads=threads,
    )
    print(f"report written to {out / 'index.html'}")
    return 0
