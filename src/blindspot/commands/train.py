"""``blindspot train mri|ct``: each modality's trainer registers from its own module of this package."""

from __future__ import annotations

import importlib

SUBCOMMAND_MODULES = (
    "blindspot.commands.train_mri",
    "blindspot.commands.train_ct",
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train MRI reconstruction or CT denoising networks")
    inner = parser.add_subparsers(dest="train_command", metavar="MODALITY")
    parser.set_defaults(func=lambda args: parser.print_help() or 0)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.register(inner)
