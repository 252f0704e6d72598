"""``blindspot train mri|ct``: each modality's trainer registers from its own module of this package."""

from __future__ import annotations

import argparse
import importlib

from blindspot.validate import non_negative_float, non_negative_int, positive_float, positive_int, unit_fraction

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


def add_optimisation_arguments(p: argparse.ArgumentParser, batch_size: int, lr: float, lr_gamma: float,
                               batch_help: str, seed_help: str) -> argparse._ArgumentGroup:
    """The "optimisation" options every trainer shares, with the modality's defaults; returns the group."""
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=positive_int, default=20)
    o.add_argument("--batch-size", type=positive_int, default=batch_size, help=batch_help)
    o.add_argument("--lr", type=positive_float, default=lr)
    o.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "rmsprop", "sgd"])
    o.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    o.add_argument("--lr-step-size", type=non_negative_int, default=0,
                   help="epochs between learning-rate decays (0: none)")
    o.add_argument("--lr-gamma", type=unit_fraction, default=lr_gamma, help="learning-rate decay factor, in (0, 1]")
    o.add_argument("--grad-clip", type=non_negative_float, default=0.0, help="max gradient norm (0: off)")
    o.add_argument("--seed", type=non_negative_int, default=0, help=seed_help)
    o.add_argument("--num-workers", type=non_negative_int, default=0, help="data loader workers per process")
    o.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: the local GPU)")
    return o
