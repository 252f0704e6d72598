"""The ``blindspot`` command.

Each sub-command lives in a module of :mod:`blindspot.commands` that exposes ``register(subparsers)``; registering
adds an ``argparse`` parser whose ``func(args) -> int`` runs it. A user's bad input raises
:class:`~blindspot.errors.BlindspotError`, printed here as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from blindspot import __version__
from blindspot.errors import BlindspotError

# Order is the order of `blindspot --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "blindspot.commands.demo",
    "blindspot.commands.data",
    "blindspot.commands.train",
    "blindspot.commands.evaluate",
    "blindspot.commands.fnaf",
    "blindspot.commands.audit",
    "blindspot.commands.invariances",
    "blindspot.commands.lesions",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blindspot",
        description="Find what medical-image reconstruction and denoising networks cannot see, and help fix it.",
    )
    parser.add_argument("--version", action="version", version=f"blindspot {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # a sub-command whose module is not part of this build
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except BlindspotError as err:
        print(f"blindspot: error: {err.message}", file=sys.stderr)
        return err.exit_code
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        where = err.filename if err.filename is not None else ""
        print(f"blindspot: error: {where}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blindspot: interrupted; results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
