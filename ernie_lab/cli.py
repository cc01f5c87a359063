"""``ernie-lab`` command line. Each sub-command lives in ``ernie_lab/commands/<name>.py`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``; modules are discovered, not listed here.

A user error (a bad argument, file, config, spec or checkpoint: the named errors below) prints one line,
``ernie-lab <cmd>: error: ...``, and exits with status 2, as argparse does for bad options; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import ernie_lab.commands
from ernie_lab.io.sources import SourceError

# ConfigError, CheckpointError and SpecError are ValueErrors; KeyError: unknown hook or preset names;
# OSError: missing, existing or unwritable files and folders; SourceError: a hub id not downloadable
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, ImportError, SourceError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernie-lab", description="ERNIE 4.5 MoE interpretability workbench")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(ernie_lab.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"ernie_lab.commands.{info.name}")
        command = module.add_parser(sub)
        # also after the command name; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"ernie-lab {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
