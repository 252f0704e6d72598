"""``blindspot train mri``: supervised training of an MRI reconstruction network (U-Net, I-RIM, E2E-VarNet, …).

Single process::

    blindspot train mri --model unet --epochs 20 --out runs/unet

Several processes / GPUs / nodes (``torchrun`` sets the ranks; nccl on GPUs, gloo on CPU)::

    torchrun --nproc_per_node 4 -m blindspot.cli train mri --model irim --batch-size 8 --out runs/irim

Without ``--data`` it trains on the built-in knee phantoms: training volumes are seeded from ``--phantom-seed``
(default 1000), validation volumes from ``--phantom-val-seed`` (default 0, the phantoms other commands use by
default), so attacks and evaluations on the default phantoms never see training images. With ``--data`` and no
``--val-data`` a seeded ``--val-fraction`` of the volumes is held out. Training masks change every epoch (seeded by
run seed, epoch and volume); validation masks are fixed per volume (seeded by file name, as fastMRI). A k-space
network (``--model varnet``) trains on masked multi-coil k-space: multi-coil phantoms (``--phantom-coils``, default 8
for it) or multi-coil fastMRI files; single-coil data are a one-line error.

The run folder gets ``last.pt`` (resumable with ``--resume``), ``best.pt`` (best validation SSIM), ``log.jsonl`` and
``summary.json``. The run itself is :func:`blindspot.runs.train.run_train_mri`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from blindspot.commands.train import add_optimisation_arguments, add_robust_arguments, robust_config
from blindspot.errors import BlindspotError
from blindspot.runs.train import PHANTOM_TRAIN_SEED, PHANTOM_VAL_SEED
from blindspot.validate import (acceleration, check_array_bytes, check_crop, check_hparam_types, check_output_folder,
                                fraction, hparam, hparam_dict, image_side, non_negative_int, positive_float,
                                positive_int, unit_fraction)


def check_hparams(architecture: str, hparams: dict[str, Any]) -> None:
    """``--hparam`` values against ``architecture``: known names, the constructor's types, and a network of sane
    size (built on the meta device, nothing allocated); one line naming ``--hparam``."""
    from blindspot.models.checkpoint import check_network_size
    from blindspot.models.registry import model_defaults

    if not hparams:
        return
    defaults = model_defaults(architecture)
    if defaults is not None:
        check_hparam_types(hparams, defaults)
    check_network_size(architecture, hparams, "--hparam")


def add_arch_arguments(p: argparse.ArgumentParser) -> None:
    """``--arch`` and ``--hparam`` for bare state dicts (``evaluate``, ``lesions``, ``audit``)."""
    p.add_argument("--arch", help="architecture of bare state-dict checkpoints (e.g. unet or varnet for fastMRI's "
                   "weights); hyper-parameters are read off the weights where possible")
    p.add_argument("--hparam", action="append", metavar="KEY=VALUE", type=hparam,
                   help="hyper-parameter for --arch, repeatable (overrides what the weights say); values are JSON")


def arch_hparams(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``--hparam`` values for ``--arch`` (``None`` without ``--hparam``); ``--hparam`` alone is an error."""
    if args.hparam and not args.arch:
        raise BlindspotError(None, "--hparam needs --arch (hyper-parameters of a bare state dict)")
    if not args.hparam:
        return None
    hparams = hparam_dict(args.hparam)
    check_hparams(args.arch, hparams)
    return hparams


def add_mask_type_argument(p: argparse.ArgumentParser, default_text: str) -> None:
    """``--mask-type``: every mask family of :data:`blindspot.physics.mri.MASK_TYPES` (column masks and 2-D
    variable-density masks), default ``None`` (described by ``default_text``)."""
    from blindspot.physics.mri import MASK_TYPES

    two_d = ", ".join(name for name, cls in MASK_TYPES.items() if cls.two_dimensional)
    p.add_argument("--mask-type", choices=list(MASK_TYPES), default=None,
                   help=f"sampling mask ({default_text}); {two_d} sample both phase-encode axes of a slice")


def add_data_arguments(p: argparse.ArgumentParser):
    """Options shared by ``train mri`` and ``evaluate``: physics and the phantom geometry; returns the phantom group."""
    p.add_argument("--accelerations", nargs="+", type=acceleration, default=[4.0, 8.0], help="default 4 8")
    p.add_argument("--center-fractions", nargs="+", type=unit_fraction,
                   help="one per acceleration (default: 4x → 0.08, 8x → 0.04)")
    add_mask_type_argument(p, "default random")
    p.add_argument("--crop", nargs=2, type=image_side, metavar=("H", "W"), help="image size (default: the data's)")
    g = p.add_argument_group("built-in phantoms (without --data)")
    g.add_argument("--phantom-shape", nargs=2, type=image_side, metavar=("H", "W"),
                   help="k-space size of the phantoms (default fastMRI's 640 368)")
    g.add_argument("--phantom-recon-size", nargs=2, type=image_side, metavar=("H", "W"),
                   help="reconstruction (target) size of the phantoms (default 320 320)")
    g.add_argument("--phantom-slices", type=positive_int, help="slices per phantom volume (default 8)")
    g.add_argument("--phantom-coils", type=positive_int, metavar="C",
                   help="multi-coil phantoms with C coils (default: single-coil; 8 coils for k-space networks)")
    return g


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mri",
        help="train an MRI reconstruction network (U-Net, I-RIM, E2E-VarNet) on under-sampled data",
        description="Supervised training with L1 or SSIM loss; validation SSIM/NMSE/PSNR each epoch; best and last "
        "checkpoints; --resume; multi-process through torchrun.",
    )
    p.add_argument("--data", help="training data: fastMRI HDF5, DICOM, PNG or NumPy file/folder (default: phantoms)")
    p.add_argument("--val-data", help="validation data (default: --val-fraction of --data's volumes, or phantoms)")
    p.add_argument("--val-fraction", type=fraction, default=0.2, help="held-out share of volumes without --val-data")
    p.add_argument("--model", default="unet", help="registered architecture: unet, irim or varnet (default unet)")
    p.add_argument("--preset", help="named hyper-parameters (irim: small or paper)")
    p.add_argument("--hparam", action="append", metavar="KEY=VALUE", type=hparam,
                   help="model hyper-parameter, repeatable (e.g. --hparam chans=16); values are JSON")
    g = add_data_arguments(p)
    g.add_argument("--phantom-volumes", type=positive_int, default=16, help="training volumes (default 16)")
    g.add_argument("--phantom-val-volumes", type=positive_int, default=4, help="validation volumes (default 4)")
    g.add_argument("--phantom-seed", type=non_negative_int, default=PHANTOM_TRAIN_SEED,
                   help="first training volume seed")
    g.add_argument("--phantom-val-seed", type=non_negative_int, default=PHANTOM_VAL_SEED,
                   help="first validation volume seed")
    o = add_optimisation_arguments(p, batch_size=4, lr=1e-3, lr_gamma=0.1, seed_help="weights, shuffling and "
                                   "training masks", batch_help="global batch (split over processes)")
    o.add_argument("--loss", default="l1", choices=["l1", "mse", "ssim"])
    add_robust_arguments(p)
    lw = p.add_argument_group("lesion-weighted training (blindspot.training.lesion_weighted)")
    lw.add_argument("--boxes", metavar="CSV", help="lesion boxes (CSV or JSON) on the --data files")
    lw.add_argument("--box-weight", type=positive_float, default=10.0,
                    help="loss weight inside the boxes (default 10)")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start from these weights instead of a fresh initialisation (a blindspot checkpoint, a "
                   "bundled name such as mri_unet, or a bare state dict of --model): fine-tuning, e.g. FNAF-robust "
                   "training of a trained U-Net; the optimiser and epochs start fresh")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal)")
    p.set_defaults(func=run)


def center_fractions(args: argparse.Namespace) -> list[float]:
    """``--center-fractions``, one per ``--accelerations`` (default: the standard fraction of each)."""
    from blindspot.physics.mri import create_mask_func

    if args.center_fractions and len(args.center_fractions) != len(args.accelerations):
        raise BlindspotError(None, "give one --center-fractions value per acceleration")
    return create_mask_func(args.mask_type or "random", args.accelerations, args.center_fractions).center_fractions


def phantom_options(args: argparse.Namespace) -> dict[str, Any]:
    """PhantomDataset keyword arguments from the ``--phantom-*`` geometry flags (unset ones omitted;
    ``--phantom-coils C`` → multi-coil phantoms with C coils)."""
    opts: dict[str, Any] = {}
    if args.phantom_shape:
        opts["shape"] = tuple(args.phantom_shape)
    if args.phantom_recon_size:
        opts["recon_size"] = tuple(args.phantom_recon_size)
    if args.phantom_slices is not None:
        opts["slices"] = args.phantom_slices
    if getattr(args, "phantom_coils", None) is not None:
        opts.update(challenge="multicoil", num_coils=args.phantom_coils)
    if "shape" in opts or "slices" in opts or "num_coils" in opts:  # one volume's complex64 k-space
        from blindspot.data.knee_phantom import FASTMRI_KNEE_SHAPE

        shape = opts.get("shape", FASTMRI_KNEE_SHAPE)
        check_array_bytes((opts.get("slices", 8), opts.get("num_coils", 1), *shape), 8,
                          "--phantom-slices/--phantom-coils/--phantom-shape")
    if "recon_size" in opts:
        from blindspot.data.knee_phantom import FASTMRI_KNEE_SHAPE

        check_crop(opts["recon_size"], opts.get("shape", FASTMRI_KNEE_SHAPE), "--phantom-shape", "--phantom-recon-size")
    return opts


def run(args: argparse.Namespace) -> int:
    from blindspot.runs.train import MRITrainData, run_train_mri
    from blindspot.training.engine import TrainConfig

    check_output_folder(args.out, "--out", inputs=[args.data, args.val_data, args.init])
    check_hparams(args.model, hparam_dict(args.hparam))

    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, lr_step_size=args.lr_step_size, lr_gamma=args.lr_gamma,
        grad_clip=args.grad_clip, seed=args.seed, num_workers=args.num_workers, progress=args.progress,
    )
    geometry = phantom_options(args)
    phantom = {k: geometry[k] for k in ("shape", "recon_size", "slices", "num_coils") if k in geometry}
    spec = MRITrainData(
        data=args.data, val_data=args.val_data, val_fraction=args.val_fraction, accelerations=args.accelerations,
        center_fractions=center_fractions(args), mask_type=args.mask_type or "random",
        crop=tuple(args.crop) if args.crop else None, phantom_volumes=args.phantom_volumes,
        phantom_val_volumes=args.phantom_val_volumes, phantom_seed=args.phantom_seed,
        phantom_val_seed=args.phantom_val_seed, phantom=phantom,
    )
    run_train_mri(args.model, args.out, spec, config, preset=args.preset, hparams=hparam_dict(args.hparam),
                  loss=args.loss, robust=robust_config(args), boxes=getattr(args, "boxes", None), box_weight=args.box_weight,
                  resume=args.resume, init=args.init, device=args.device, log=lambda line: print(line, file=sys.stdout, flush=True))
    return 0
