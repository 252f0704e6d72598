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


def add_robust_arguments(p: argparse.ArgumentParser) -> None:
    """The FNAF-robust training options (``--robust …``; :class:`blindspot.training.robust.RobustConfig`)."""
    r = p.add_argument_group("FNAF-robust training (blindspot.training.robust)")
    r.add_argument("--robust", action="store_true", help="add the FNAF attack loss of on-the-fly features to the loss")
    r.add_argument("--robust-fraction", type=unit_fraction, default=0.5,
                   help="share of each batch given an FNAF (0.5)")
    r.add_argument("--robust-families", nargs="+", default=["walk"], help="feature families (default walk)")
    r.add_argument("--robust-weight", type=positive_float, default=1.0, help="weight of the attack loss (default 1)")
    r.add_argument("--robust-search", choices=["draw", "rs", "grad"], default="rs",
                   help="draw: one random feature; rs: worst of --robust-candidates; grad: rs then gradient steps")
    r.add_argument("--robust-candidates", type=positive_int, default=4)
    r.add_argument("--robust-grad-steps", type=non_negative_int, default=2)
    r.add_argument("--robust-grad-step-size", type=positive_float, default=0.2)
    r.add_argument("--robust-dilation", type=non_negative_int, default=3)
    r.add_argument("--robust-walk-steps", nargs=2, type=positive_int, default=[10, 99], metavar=("MIN", "MAX"),
                   help="pixels of a walk feature (default the seed's robust training: 10 99)")
    r.add_argument("--robust-mixing", choices=["batch", "alternate"], default="batch",
                   help="batch: every step replaces --robust-fraction of the batch by FNAF examples; alternate: the "
                        "seed's mixing, a clean step then a feature step")


def robust_config(args: argparse.Namespace):
    """The :class:`~blindspot.training.robust.RobustConfig` of ``--robust …`` (``None`` without ``--robust``)."""
    from blindspot.training.robust import RobustConfig

    if not getattr(args, "robust", False):
        return None
    return RobustConfig(fraction=args.robust_fraction, families=tuple(args.robust_families), weight=args.robust_weight,
                        search=args.robust_search, candidates=args.robust_candidates, grad_steps=args.robust_grad_steps,
                        grad_step_size=args.robust_grad_step_size, dilation=args.robust_dilation,
                        walk_steps=tuple(args.robust_walk_steps), mixing=args.robust_mixing)
