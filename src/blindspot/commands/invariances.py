"""``blindspot invariances``: which input changes does a network ignore? (DESIGN.md §1.3)

* ``blindspot invariances --model M --out RUN_DIR [--data PATH] [--distance mse|ssim|vgg|rms] [--alpha A] …`` —
  image-domain invariances by optimisation: a CT denoiser on its normalised low-dose input, or an MRI network (any
  convention) on the true image through the under-sampling.
* ``blindspot invariances train-generator --model M --out DIR …`` — train the generator of natural invariances
  ``g(z|x)`` with its WGAN-GP critic (CT and MRI networks; checkpoints and ``--resume``).
* ``blindspot invariances sample --generator DIR --out RUN_DIR …`` — draw natural invariances and score them.

Argument parsing only: the runs live in :mod:`blindspot.runs.invariances` (run folders, records, reports) and
:mod:`blindspot.runs.images` (the images).
"""

from __future__ import annotations

import argparse

from blindspot.attacks.distances import DISTANCES
from blindspot.attacks.invariance import InvarianceConfig
from blindspot.attacks.natural import NaturalConfig
from blindspot.commands.train_mri import add_mask_type_argument
from blindspot.errors import BlindspotError
from blindspot.models.loading import load_model
from blindspot.runs import invariances as runs
from blindspot.runs.images import DataOptions
from blindspot.training.distributed import resolve_device
from blindspot.validate import (acceleration, check_array_bytes, check_output_folder, dose, image_side, integer,
                                non_negative_float, non_negative_int, positive_float, positive_int, unit_fraction,
                                width)


def _add_common(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    p.add_argument("--model", required=model_required,
                   help="checkpoint file, or a registered model name (gaussian-ri; cnn10, redcnn, wganvgg with "
                        "bundled weights; unet, irim, zero-filled for MRI)")
    p.add_argument("--arch", help="architecture of a bare state-dict checkpoint")
    p.add_argument("--modality", choices=["ct", "mri"], help="default: the checkpoint's physics, else the registry's")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    p.add_argument("--data", help="CT: DICOM series / LDCT folder / .npy or .png in HU; MRI: fastMRI HDF5 or images "
                                  "(default: built-in phantoms)")
    p.add_argument("--phantoms", type=positive_int, default=4,
                   help="built-in phantoms: CT slices, MRI volumes of 8 slices (default 4)")
    p.add_argument("--size", type=image_side, help="phantom side in pixels (CT default: the checkpoint's training "
                                                      "size, else 512; MRI: its phantom geometry, else fastMRI's)")
    p.add_argument("--dose", type=dose, help="CT: dose of the network input (default: the checkpoint's, else 0.25)")
    add_mask_type_argument(p, "MRI; default: the checkpoint's")
    p.add_argument("--acceleration", type=acceleration, help="MRI acceleration (default: checkpoint's first, else 4)")
    p.add_argument("--center-fraction", type=unit_fraction,
                   help="MRI centre fraction (default: standard for the acceleration)")
    p.add_argument("--crop", nargs=2, type=image_side, metavar=("H", "W"),
                   help="MRI image size (default: the checkpoint's)")
    p.add_argument("--limit", type=positive_int, help="use only the first N images")
    p.add_argument("--skip-bad", action="store_true",
                   help="CT series in the LDCT layout: leave out unreadable member files (and their partner slices), "
                   "each listed on stderr and in run.json, instead of stopping at the first")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per batch (default 4)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--vgg-weights", help="torchvision-format VGG16 ImageNet weights (.pth) for --distance vgg")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "invariances", help="invariances: large input changes a network ignores (optimised, or sampled)",
        description="Reconstruct invariances of a CT denoiser or MRI network: minimise ‖f(x) − f(x_inv)‖ − "
                    "α·D(x, x_inv) with Adam from x + noise. Sub-commands train and sample a generator of natural "
                    "invariances.")
    _add_common(p)
    p.add_argument("--distance", choices=DISTANCES, default="mse",
                   help="D: mse (bounded by 1, the seed's), ssim ((1 − SSIM)/2), vgg (VGG16 perceptual) or rms "
                        "(bounded un-squared norm) (default mse)")
    p.add_argument("--fidelity", choices=("same",) + DISTANCES, default="same",
                   help="‖·‖ on the outputs (default: the same as --distance, as the source document)")
    p.add_argument("--alpha", type=positive_float, default=0.01, help="weight of the distance reward (default 0.01)")
    p.add_argument("--iterations", type=positive_int, default=3000, help="most Adam iterations (default 3000)")
    p.add_argument("--lr", type=positive_float, default=1e-2, help="Adam learning rate (default 0.01)")
    p.add_argument("--restarts", type=positive_int, default=3, help="invariances per image (default 3)")
    p.add_argument("--init-std", type=non_negative_float, default=0.1,
                   help="std of the start noise in normalised units (default 0.1: variance 10⁻²)")
    p.add_argument("--tol", type=non_negative_float, default=1e-4,
                   help="early stop: relative objective change per window")
    p.add_argument("--window", type=positive_int, default=100, help="early stop: iterations per check (default 100)")
    p.add_argument("--min-iterations", type=non_negative_int, default=300,
                   help="no early stop before this (default 300)")
    p.add_argument("--region", help="where x may change: square:SIZE (central), box:TOP,LEFT,H,W, or a .npy mask")
    p.add_argument("--bounds-hu", default="-1024,3071",
                   help="CT: keep x_inv within LOW,HIGH HU ('none' for no bounds; default -1024,3071)")
    p.add_argument("--figures", type=non_negative_int, default=8, help="figures for the first N images (default 8)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (required)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR, skipping images already recorded")
    p.add_argument("--overwrite", action="store_true", help="replace the records already in RUN_DIR")
    p.set_defaults(func=run)

    inner = p.add_subparsers(dest="invariances_command", metavar="SUBCOMMAND")
    t = inner.add_parser(
        "train-generator", help="train a conditional generator of natural invariances g(z|x) with a WGAN-GP critic",
        description="Train g(z|x) to minimise ‖f(x) − f(g)‖ − α·D(x, g) − β·C(g) on patches of the normalised network "
                    "input (whole images, through the acquisition, for MRI networks that need the mask or k-space), "
                    "with a WGAN-GP critic C. Writes DIR/generator.pt (checkpoint) and DIR/train_log.jsonl.")
    _add_common(t, model_required=True)
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--resume", action="store_true", help="continue from DIR/generator.pt")
    t.add_argument("--steps", type=positive_int, default=2000, help="generator steps in total (default 2000)")
    t.add_argument("--alpha", type=positive_float, default=0.01, help="weight of the distance reward (default 0.01)")
    t.add_argument("--beta", type=non_negative_float, default=1e-3, help="weight of the critic term (default 0.001)")
    t.add_argument("--distance", choices=DISTANCES, default="rms",
                   help="D (default rms: the bounded un-squared norm, whose gradient does not vanish at g = x)")
    t.add_argument("--fidelity", choices=DISTANCES, default="mse")
    t.add_argument("--patch", type=image_side, default=80)
    t.add_argument("--train-batch", type=positive_int, default=16, help="patches per step (default 16)")
    t.add_argument("--n-critic", type=positive_int, default=5)
    t.add_argument("--gp-weight", type=non_negative_float, default=10.0)
    t.add_argument("--lr", type=positive_float, default=1e-4)
    t.add_argument("--scales", type=integer(1, 8), default=3)
    t.add_argument("--channels", type=width, default=32)
    t.add_argument("--z-channels", type=width, default=4)
    t.add_argument("--critic-channels", type=width, default=32)
    t.add_argument("--checkpoint-every", type=positive_int, default=200)
    t.add_argument("--log-every", type=positive_int, default=10)
    t.set_defaults(func=run_train_generator)

    s = inner.add_parser(
        "sample", help="sample natural invariances from a trained generator and score them",
        description="Draw --samples invariances per image from g(z|x) (no optimisation); report the change of the "
                    "network input, the change of f and the critic's scores against real inputs.")
    s.add_argument("--generator", required=True, help="generator checkpoint, or the folder holding generator.pt")
    _add_common(s)
    s.add_argument("--samples", type=positive_int, default=8, help="invariances per image (default 8)")
    s.add_argument("--figures", type=non_negative_int, default=8)
    s.add_argument("--out", required=True, metavar="RUN_DIR")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=run_sample)


def _setup(args: argparse.Namespace):
    """The device, the model (``None`` without ``--model``) and the data options (after the output checks)."""
    check_output_folder(args.out, "--out", inputs=[args.data, getattr(args, "generator", None)])
    device = resolve_device(args.device)
    model = load_model(args.model, device, args.arch, modality=args.modality) if args.model else None
    data = DataOptions(args.data, args.phantoms, args.size, args.dose, args.mask_type, args.acceleration,
                            args.center_fraction, tuple(args.crop) if args.crop else None, args.limit, args.seed,
                            skip_bad=args.skip_bad)
    return device, model, data


def _bounds_hu(spec: str | None) -> tuple[float, float] | None:
    if spec is None or spec.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in spec.split(","))
    except ValueError:
        raise BlindspotError(None, f"bad --bounds-hu {spec!r}: use LOW,HIGH in HU or none") from None
    if not lo < hi:
        raise BlindspotError(None, f"--bounds-hu {spec}: LOW must be below HIGH")
    return lo, hi


def run(args: argparse.Namespace) -> int:
    if not args.out:
        raise BlindspotError(None, "--out RUN_DIR is required")
    if not args.model:
        raise BlindspotError(None, "--model is required")
    bounds = _bounds_hu(args.bounds_hu)
    device, model, data = _setup(args)
    config = InvarianceConfig(alpha=args.alpha, iterations=args.iterations, lr=args.lr, restarts=args.restarts,
                              init_std=args.init_std, tol=args.tol, window=args.window,
                              min_iterations=args.min_iterations, seed=args.seed)
    result = runs.run_invariances(model, args.out, data, config, args.distance,
                                  None if args.fidelity == "same" else args.fidelity, region=args.region,
                                  bounds_hu=bounds, vgg_weights=args.vgg_weights, batch_size=args.batch_size,
                                  figures=args.figures, device=device, resume=args.resume, overwrite=args.overwrite)
    print("\n".join(result.lines()))
    return 0


def run_train_generator(args: argparse.Namespace) -> int:
    check_array_bytes((args.train_batch, args.channels, args.patch, args.patch), 4,
                      "--train-batch/--channels/--patch")  # one activation of the generator's widest layer
    device, model, data = _setup(args)
    config = NaturalConfig(
        alpha=args.alpha, beta=args.beta, distance=args.distance, fidelity=args.fidelity, patch=args.patch,
        batch_size=args.train_batch, n_critic=args.n_critic, gp_weight=args.gp_weight, lr=args.lr, scales=args.scales,
        channels=args.channels, z_channels=args.z_channels, critic_channels=args.critic_channels, seed=args.seed)
    result = runs.run_train_generator(model, args.out, data, config, args.steps,
                                      checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                                      vgg_weights=args.vgg_weights, device=device, resume=args.resume)
    print("\n".join(result.lines()))
    return 0


def run_sample(args: argparse.Namespace) -> int:
    device, model, data = _setup(args)
    result = runs.run_sample(args.generator, args.out, model, data, args.samples, args.seed,
                             batch_size=args.batch_size, figures=args.figures, device=device, resume=args.resume,
                             overwrite=args.overwrite)
    print("\n".join(result.lines()))
    return 0
