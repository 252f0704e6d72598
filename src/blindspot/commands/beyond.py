"""``blindspot hallucinations | worst-case | false-positive | sampling-rate``: the questions beyond the seeds
(:mod:`blindspot.runs.beyond`) for one or more networks of one modality.

::

    blindspot hallucinations --model unet irim --out runs/halluc                 # null-space maps, MRI
    blindspot worst-case --model unet --budgets 0.01 0.03 --out runs/wc          # PGD vs random, MRI or CT
    blindspot false-positive --model cnn10 --out runs/fp                         # make a feature appear
    blindspot sampling-rate --model unet --sampling-accelerations 2 4 8 12 --out runs/sr

Without ``--data`` they run on built-in phantoms (the first network's training geometry; seeds from
``--phantom-seed``, by default the audit's held-out ones). Each writes ``records.jsonl`` / ``records.csv``,
``summary.json``, ``summary.csv``, ``tables.md``, ``section.html``, ``report.html`` and ``figures/`` into
``--out``; ``--resume`` continues an interrupted run, ``--overwrite`` replaces one.
"""

from __future__ import annotations

import argparse

from blindspot.commands.train_mri import add_mask_type_argument
from blindspot.validate import (acceleration, dose, image_side, non_negative_float, non_negative_int, positive_float,
                                positive_int, unit_fraction)

#: command name → (section of blindspot.runs.beyond, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "hallucinations": ("hallucinations", "null-space hallucination maps: the error the measurements cannot see (MRI)"),
    "worst-case": ("worst_case", "l2 worst-case measurement perturbations (PGD) against random noise of the same norm"),
    "false-positive": ("false_positive", "smallest measurement perturbation that makes a chosen feature appear"),
    "sampling-rate": ("sampling", "quality over accelerations: flags networks that get worse with more samples (MRI)"),
}


def add_common(p: argparse.ArgumentParser) -> None:
    """Models, data, run folder and batching options shared by the four commands."""
    from blindspot.commands.train_mri import add_arch_arguments
    from blindspot.runs.audit import AUDIT_PHANTOM_SEED

    p.add_argument("--model", nargs="+", required=True, metavar="CKPT",
                   help="checkpoints or bundled networks (e.g. unet irim, or cnn10), one modality")
    p.add_argument("--names", nargs="+", help="row labels, one per --model")
    add_arch_arguments(p)
    p.add_argument("--data", help="MRI: fastMRI HDF5, DICOM, PNG or NumPy file/folder; CT: a folder in the LDCT "
                   "layout (default: built-in phantoms)")
    p.add_argument("--accelerations", nargs="+", type=acceleration, default=[4.0], help="MRI settings (default 4)")
    p.add_argument("--center-fractions", nargs="+", type=unit_fraction, help="one per acceleration")
    add_mask_type_argument(p, "default: the first checkpoint's")
    p.add_argument("--crop", nargs=2, type=image_side, metavar=("H", "W"))
    p.add_argument("--coil-maps", choices=["full", "lowres", "espirit"], default="full")
    p.add_argument("--dose", type=dose, help="CT: dose fraction (default: the checkpoint's)")
    p.add_argument("--phantom-volumes", type=positive_int, default=2, help="MRI volumes (CT: patients x slices)")
    p.add_argument("--phantom-slices", type=positive_int, default=4)
    p.add_argument("--phantom-seed", type=non_negative_int, default=AUDIT_PHANTOM_SEED)
    p.add_argument("--limit", type=positive_int, help="only the first N images")
    p.add_argument("--skip-bad", action="store_true",
                   help="CT series: leave out unreadable member files (and their partner slices), each listed on "
                   "stderr and in run.json, instead of stopping at the first")
    p.add_argument("--normalization", choices=["perturbed", "clean"], default="perturbed",
                   help="statistics of a perturbed input: its own (default, as deployed) or the clean input's")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--chunk-size", type=positive_int, default=32, help="most items per network call")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR, skipping images already recorded")
    p.add_argument("--overwrite", action="store_true", help="replace the records already in RUN_DIR")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)


def register(subparsers) -> None:
    from blindspot.attacks.features import FAMILIES

    for name, (section, help_text) in COMMANDS.items():
        p = subparsers.add_parser(name, help=help_text, description=help_text + ". " + __doc__.split("\n\n")[3])
        add_common(p)
        if section == "worst_case":
            p.add_argument("--budgets", nargs="+", type=positive_float,
                           help="relative budgets ε: ‖e‖ ≤ ε × ‖measured k-space‖ (default 0.01 0.02 0.05), CT: × "
                                "‖input noise‖ (default 0.1 0.3 1)")
            p.add_argument("--steps", type=positive_int, default=10, help="PGD steps per budget (default 10)")
            p.add_argument("--random-draws", type=non_negative_int, default=4,
                           help="random perturbations of the same norm per image and budget (default 4)")
            p.add_argument("--attack-images", type=positive_int, default=16, help="images per setting (default 16)")
        elif section == "false_positive":
            p.add_argument("--budgets", nargs="+", type=positive_float,
                           help="the ladder of relative budgets searched (default MRI 0.005 0.01 0.02 0.05 0.1, CT "
                                "0.02 0.05 0.1 0.2 0.5)")
            p.add_argument("--fixed-budget", type=positive_float,
                           help="budget of the reported attack rate (added to the ladder; default MRI 0.02, CT 0.1, "
                                "or the middle of --budgets)")
            p.add_argument("--steps", type=positive_int, default=10, help="PGD steps per budget (default 10)")
            p.add_argument("--family", choices=FAMILIES, default="disc", help="the feature (default disc)")
            p.add_argument("--intensity", nargs=2, type=positive_float, metavar=("LO", "HI"),
                           help="feature intensity: MRI fractions of the image's range, CT HU (default 30 100)")
            p.add_argument("--threshold", type=unit_fraction, default=0.5,
                           help="appearance at which the feature counts as present (default 0.5)")
            p.add_argument("--attack-images", type=positive_int, default=16, help="images per setting (default 16)")
        elif section == "sampling":
            p.add_argument("--sampling-accelerations", nargs="+", type=acceleration,
                           default=[2.0, 3.0, 4.0, 6.0, 8.0, 12.0], help="default 2 3 4 6 8 12")
            p.add_argument("--tolerance", type=non_negative_float, default=0.0,
                           help="flag only when more samples are worse by more than this (SSIM; relative NMSE)")
        p.set_defaults(func=run, section=section)


def config_of(args: argparse.Namespace):
    """The :class:`~blindspot.runs.beyond.BeyondConfig` of a parsed command line."""
    from blindspot.runs.beyond import BeyondConfig

    opts = dict(images=args.limit, normalization=args.normalization, batch_size=args.batch_size,
                chunk_size=args.chunk_size, seed=args.seed, figures=not args.no_figures, mask_type=args.mask_type)
    if args.section == "worst_case":
        opts.update(budgets=tuple(args.budgets) if args.budgets else None, steps=args.steps,
                    random_draws=args.random_draws, attack_images=args.attack_images)
    elif args.section == "false_positive":
        opts.update(fp_budgets=tuple(args.budgets) if args.budgets else None, fp_budget=args.fixed_budget,
                    fp_steps=args.steps, fp_family=args.family, fp_intensity=tuple(args.intensity) if args.intensity else None,
                    fp_threshold=args.threshold, attack_images=args.attack_images)
    elif args.section == "sampling":
        opts.update(sampling_accelerations=tuple(args.sampling_accelerations), sampling_tolerance=args.tolerance,
                    sampling_images=args.limit)
    config = BeyondConfig(**opts)
    config.check()
    return config


def run(args: argparse.Namespace) -> int:
    from blindspot.commands.train_mri import arch_hparams
    from blindspot.errors import BlindspotError
    from blindspot.models.loading import load_model
    from blindspot.runs.beyond import RUNNERS, build_settings
    from blindspot.training.distributed import resolve_device
    from blindspot.validate import check_output_folder

    check_output_folder(args.out, "--out", inputs=[args.data])
    if args.names and len(args.names) != len(args.model):
        raise BlindspotError(None, f"give one --names entry per --model ({len(args.model)})")
    config = config_of(args)
    device = resolve_device(args.device)
    hparams = arch_hparams(args)
    names = args.names or [None] * len(args.model)
    models = [load_model(spec, device, architecture=args.arch, hparams=hparams, name=n, warn=False)
              for spec, n in zip(args.model, names)]
    if len({m.name for m in models}) != len(models):
        raise BlindspotError(None, "two models share a name; give --names")
    if args.section in ("hallucinations", "sampling") and models[0].modality == "ct":
        raise BlindspotError(args.model[0], f"is a CT denoiser; {args.section} is for MRI networks")
    settings = build_settings(models, args.data, args.accelerations, args.center_fractions, args.mask_type,
                              tuple(args.crop) if args.crop else None, args.phantom_volumes, args.phantom_slices,
                              args.phantom_seed, args.limit, args.dose, args.coil_maps, args.batch_size,
                              skip_bad=args.skip_bad)
    result = RUNNERS[args.section](models, settings, args.out, config, progress=args.progress, resume=args.resume,
                                   overwrite=args.overwrite)
    print(result.markdown, end="")
    print(f"records: {result.out / 'records.csv'}\nsummary: {result.out / 'summary.json'}\n"
          f"report: {result.out / 'report.html'}")
    return 0
