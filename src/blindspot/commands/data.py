"""``blindspot data …``: make and inspect data sets. Each sub-command lives in its own module of this package."""

from __future__ import annotations

import importlib

# Modules with `register(subparsers)` for `blindspot data <name>`.
SUBCOMMAND_MODULES = (
    "blindspot.commands.data_phantoms",
    "blindspot.commands.data_inspect",
    "blindspot.commands.data_ct_phantoms",
    "blindspot.commands.data_lesion_phantoms",
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="make the built-in phantoms and inspect data sets")
    inner = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 0)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # not written yet
                continue
            raise
        module.register(inner)
