"""``ernie-lab`` command line. Each sub-command lives in ``ernie_lab/commands/<name>.py`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``; modules are discovered, not listed here."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import ernie_lab.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernie-lab", description="ERNIE 4.5 MoE interpretability workbench")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(ernie_lab.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"ernie_lab.commands.{info.name}")
        command = module.add_parser(sub)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
