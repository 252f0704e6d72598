"""``blindspot train mri``: supervised training of an MRI reconstruction network (U-Net, I-RIM, …).

Single process::

    blindspot train mri --model unet --epochs 20 --out runs/unet

Several processes / GPUs / nodes (``torchrun`` sets the ranks; nccl on GPUs, gloo on CPU)::

    torchrun --nproc_per_node 4 -m blindspot.cli train mri --model irim --batch-size 8 --out runs/irim

Without ``--data`` it trains on the built-in knee phantoms: training volumes are seeded from ``--phantom-seed``
(default 1000), validation volumes from ``--phantom-val-seed`` (default 0, the phantoms other commands use by
default), so attacks and evaluations on the default phantoms never see training images. With ``--data`` and no
``--val-data`` a seeded ``--val-fraction`` of the volumes is held out. Training masks change every epoch (seeded by
run seed, epoch and volume); validation masks are fixed per volume (seeded by file name, as fastMRI).

The run folder gets ``last.pt`` (resumable with ``--resume``), ``best.pt`` (best validation SSIM), ``log.jsonl`` and
``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from blindspot.commands.train import add_optimisation_arguments
from blindspot.errors import BlindspotError

#: Phantom seeds: training volumes start at 1000; validation (and every command's default phantoms) start at 0.
PHANTOM_TRAIN_SEED = 1000
PHANTOM_VAL_SEED = 0


def parse_hparams(items: list[str] | None) -> dict[str, Any]:
    """``["chans=16", "dilations=[1,2]"]`` → ``{"chans": 16, "dilations": [1, 2]}`` (values parsed as JSON)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BlindspotError(None, f"--hparam expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def add_data_arguments(p: argparse.ArgumentParser):
    """Options shared by ``train mri`` and ``evaluate``: physics and the phantom geometry; returns the phantom group."""
    p.add_argument("--accelerations", nargs="+", type=float, default=[4.0, 8.0], help="default 4 8")
    p.add_argument("--center-fractions", nargs="+", type=float,
                   help="one per acceleration (default: 4x → 0.08, 8x → 0.04)")
    p.add_argument("--mask-type", choices=["random", "equispaced"], default=None, help="default random")
    p.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"), help="image size (default: the data's)")
    g = p.add_argument_group("built-in phantoms (without --data)")
    g.add_argument("--phantom-shape", nargs=2, type=int, metavar=("H", "W"),
                   help="k-space size of the phantoms (default fastMRI's 640 368)")
    g.add_argument("--phantom-recon-size", nargs=2, type=int, metavar=("H", "W"),
                   help="reconstruction (target) size of the phantoms (default 320 320)")
    g.add_argument("--phantom-slices", type=int, help="slices per phantom volume (default 8)")
    return g


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mri",
        help="train an MRI reconstruction network (U-Net, I-RIM) on (zero-filled, target) pairs",
        description="Supervised training with L1 or SSIM loss; validation SSIM/NMSE/PSNR each epoch; best and last "
        "checkpoints; --resume; multi-process through torchrun.",
    )
    p.add_argument("--data", help="training data: fastMRI HDF5, DICOM, PNG or NumPy file/folder (default: phantoms)")
    p.add_argument("--val-data", help="validation data (default: --val-fraction of --data's volumes, or phantoms)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of volumes without --val-data")
    p.add_argument("--model", default="unet", help="registered architecture: unet or irim (default unet)")
    p.add_argument("--preset", help="named hyper-parameters (irim: small or paper)")
    p.add_argument("--hparam", action="append", metavar="KEY=VALUE",
                   help="model hyper-parameter, repeatable (e.g. --hparam chans=16); values are JSON")
    g = add_data_arguments(p)
    g.add_argument("--phantom-volumes", type=int, default=16, help="training volumes (default 16)")
    g.add_argument("--phantom-val-volumes", type=int, default=4, help="validation volumes (default 4)")
    g.add_argument("--phantom-seed", type=int, default=PHANTOM_TRAIN_SEED, help="first training volume seed")
    g.add_argument("--phantom-val-seed", type=int, default=PHANTOM_VAL_SEED, help="first validation volume seed")
    o = add_optimisation_arguments(p, batch_size=4, lr=1e-3, lr_gamma=0.1, seed_help="weights, shuffling and "
                                   "training masks", batch_help="global batch (split over processes)")
    o.add_argument("--loss", default="l1", choices=["l1", "mse", "ssim"])
    r = p.add_argument_group("FNAF-robust training (blindspot.training.robust)")
    r.add_argument("--robust", action="store_true", help="add the FNAF attack loss of on-the-fly features to the loss")
    r.add_argument("--robust-fraction", type=float, default=0.5, help="share of each batch given an FNAF (0.5)")
    r.add_argument("--robust-families", nargs="+", default=["walk"], help="feature families (default walk)")
    r.add_argument("--robust-weight", type=float, default=1.0, help="weight of the attack loss (default 1)")
    r.add_argument("--robust-search", choices=["draw", "rs", "grad"], default="rs",
                   help="draw: one random feature; rs: worst of --robust-candidates; grad: rs then gradient steps")
    r.add_argument("--robust-candidates", type=int, default=4)
    r.add_argument("--robust-grad-steps", type=int, default=2)
    r.add_argument("--robust-grad-step-size", type=float, default=0.2)
    r.add_argument("--robust-dilation", type=int, default=3)
    lw = p.add_argument_group("lesion-weighted training (blindspot.training.lesion_weighted)")
    lw.add_argument("--boxes", metavar="CSV", help="lesion boxes (CSV or JSON) on the --data files")
    lw.add_argument("--box-weight", type=float, default=10.0, help="loss weight inside the boxes (default 10)")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal)")
    p.set_defaults(func=run)


def model_hparams(args: argparse.Namespace) -> dict[str, Any]:
    """Hyper-parameters from ``--preset`` and ``--hparam`` (later wins)."""
    hparams: dict[str, Any] = {}
    if args.preset:
        if args.model != "irim":
            raise BlindspotError(None, f"--preset applies to irim, not {args.model!r}")
        from blindspot.models.irim import PRESETS

        if args.preset not in PRESETS:
            raise BlindspotError(None, f"unknown irim preset {args.preset!r}; choose from {', '.join(PRESETS)}")
        hparams.update(PRESETS[args.preset])
    hparams.update(parse_hparams(args.hparam))
    return hparams


def center_fractions(args: argparse.Namespace) -> list[float]:
    from blindspot.physics.mri import create_mask_func

    if args.center_fractions and len(args.center_fractions) != len(args.accelerations):
        raise BlindspotError(None, "give one --center-fractions value per acceleration")
    return create_mask_func(args.mask_type or "random", args.accelerations, args.center_fractions).center_fractions


def phantom_options(args: argparse.Namespace) -> dict[str, Any]:
    """PhantomDataset keyword arguments from the ``--phantom-*`` geometry flags (unset ones omitted)."""
    opts: dict[str, Any] = {}
    if args.phantom_shape:
        opts["shape"] = tuple(args.phantom_shape)
    if args.phantom_recon_size:
        opts["recon_size"] = tuple(args.phantom_recon_size)
    if args.phantom_slices is not None:
        opts["slices"] = args.phantom_slices
    return opts


def run(args: argparse.Namespace) -> int:
    from blindspot.data.mri import open_mri_dataset
    from blindspot.models.adapters import network_convention
    from blindspot.models.registry import build_model
    from blindspot.physics.mri import create_mask_func
    from blindspot.training.distributed import DistContext
    from blindspot.training.engine import TrainConfig, seed_everything
    from blindspot.training.mri import EpochDataset, EpochMasks, mri_physics, split_volumes, train_mri

    hparams = model_hparams(args)
    mask_type = args.mask_type or "random"
    cfs = center_fractions(args)
    crop = tuple(args.crop) if args.crop else None
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, lr_step_size=args.lr_step_size, lr_gamma=args.lr_gamma,
        grad_clip=args.grad_clip, seed=args.seed, num_workers=args.num_workers, progress=args.progress,
    )
    config.check()
    if args.data is None and args.val_data is not None:
        raise BlindspotError(None, "--val-data needs --data (the phantoms bring their own validation volumes)")

    dist = DistContext.from_env(device=args.device)
    try:
        seed_everything(args.seed)
        model = build_model(args.model, **hparams)
        if network_convention(model) == "kspace":  # MRISample batches hold magnitude images, not coil k-space
            raise BlindspotError(None, f"{args.model} takes multi-coil k-space; train mri trains image-domain networks "
                                       "only (its batches hold magnitude images); train it with fastMRI and load the "
                                       "state dict with --arch")
        masks = EpochMasks(create_mask_func(mask_type, args.accelerations, cfs), seed=args.seed)
        val_masks = create_mask_func(mask_type, args.accelerations, cfs)
        physics = mri_physics(mask_type, args.accelerations, cfs, crop)
        if args.data is None:
            geometry = phantom_options(args)
            train_set = open_mri_dataset(None, masks, crop, volumes=args.phantom_volumes, seed=args.phantom_seed,
                                         **geometry)
            val_set = open_mri_dataset(None, val_masks, crop, volumes=args.phantom_val_volumes,
                                       seed=args.phantom_val_seed, **geometry)
            physics["crop"] = list(train_set.crop)
            physics["phantom"] = {"shape": list(train_set.shape), "recon_size": list(train_set.recon_size)}
            data = (f"built-in knee phantoms {train_set.shape[0]}x{train_set.shape[1]} (crop "
                    f"{train_set.crop[0]}x{train_set.crop[1]}): {args.phantom_volumes} training volumes from seed "
                    f"{args.phantom_seed}, {args.phantom_val_volumes} validation volumes from seed "
                    f"{args.phantom_val_seed}, {train_set.slices} slices each")
        else:
            train_set = open_mri_dataset(args.data, masks, crop)
            if args.val_data is not None:
                val_set = open_mri_dataset(args.val_data, val_masks, crop)
                data = f"{args.data} ({len(train_set)} slices); validation {args.val_data} ({len(val_set)} slices)"
            else:
                val_full = open_mri_dataset(args.data, val_masks, crop)
                train_set, _ = split_volumes(train_set, args.val_fraction, seed=args.seed)
                _, val_set = split_volumes(val_full, args.val_fraction, seed=args.seed)
                data = (f"{args.data}: {len(train_set)} training slices, {len(val_set)} validation slices "
                        f"({args.val_fraction:g} of the volumes held out, seed {args.seed})")
        train_set = EpochDataset(train_set, masks)
        if dist.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            print(f"training {args.model} ({n_params:,} parameters) on {dist.device} x {dist.world_size} "
                  f"process(es): {len(train_set)} training slices, {len(val_set)} validation slices -> {args.out}",
                  flush=True)
        loss_fn, extra = None, None
        if getattr(args, "robust", False):
            from blindspot.training.mri import mri_loss
            from blindspot.training.robust import RobustConfig, fnaf_robust_loss

            rcfg = RobustConfig(fraction=args.robust_fraction, families=tuple(args.robust_families),
                                weight=args.robust_weight, search=args.robust_search,
                                candidates=args.robust_candidates, grad_steps=args.robust_grad_steps,
                                grad_step_size=args.robust_grad_step_size, dilation=args.robust_dilation)
            loss_fn, extra = fnaf_robust_loss(mri_loss(args.loss), rcfg), {"robust": rcfg.as_dict()}
        if getattr(args, "boxes", None):
            if loss_fn is not None:
                raise BlindspotError(None, "give --boxes or --robust, not both")
            from blindspot.training.lesion_weighted import box_weighted_setup

            loss_fn, extra = box_weighted_setup(args.boxes, args.data, args.loss, args.box_weight)
        result = train_mri(model, args.model, hparams, train_set, val_set, config, args.out, loss=args.loss,
                           physics=physics, data=data, resume=args.resume, dist=dist, loss_fn=loss_fn,
                           extra_summary=extra)
        if dist.is_main:
            best = next((r for r in result.history if r["epoch"] == result.best_epoch), None)
            if result.epochs_run == 0:
                print(f"{args.out}: already trained for {len(result.history)} epochs; nothing to do")
            if best is not None:
                v = best["val"]
                print(f"best epoch {best['epoch'] + 1}/{len(result.history)}: validation SSIM {v['ssim']:.4f}, "
                      f"NMSE {v['nmse']:.5f}, PSNR {v['psnr']:.2f} dB")
            print(f"checkpoints: {result.best_path} (best), {result.last_path} (last); log: "
                  f"{Path(args.out) / 'log.jsonl'}", file=sys.stdout)
    finally:
        dist.shutdown()
    return 0
