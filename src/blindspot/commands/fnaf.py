"""``blindspot fnaf``: the FNAF attack on an MRI reconstruction network or a CT denoiser (:mod:`blindspot.runs.fnaf`).

The network's modality (its checkpoint's physics, or its architecture) decides the acquisition: MRI under-sampling
at ``--accelerations`` (masks seeded by file name), or low-dose CT at ``--dose`` (the network's own physics; built-in
phantoms whose low dose is simulated, or ``--data`` in the LDCT layout with real low-dose pairs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from blindspot.attacks.features import CENTER_FRACTION, FAMILIES
from blindspot.attacks.fnaf import CRITERIA
from blindspot.attacks.search import SEARCHES
from blindspot.commands.train_mri import add_arch_arguments, add_data_arguments, arch_hparams, phantom_options
from blindspot.physics.coils import MAP_ESTIMATORS
from blindspot.data.images import read_mask
from blindspot.errors import BlindspotError
from blindspot.models.loading import load_model
from blindspot.runs.fnaf import FnafConfig, ct_settings, mri_settings, phantom_geometry_of, run_fnaf
from blindspot.training.distributed import resolve_device
from blindspot.validate import (check_output_folder, dose, finite_float, image_side, non_negative_int,
                                positive_float, positive_int, unit_fraction)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fnaf",
        help="FNAF attack: find small features that a reconstruction or denoising network drops",
        description="Search for false-negative adversarial features (FNAF) against an MRI reconstruction network or a "
        "CT denoiser and report attack rates, IP acceptance and figures. Results go to --out and can be resumed.",
    )
    p.add_argument("--model", required=True, help="checkpoint file, bundled network (e.g. cnn10, unet) or registered "
                   "model name (e.g. zero-filled) for an untrained baseline")
    p.add_argument("--name", help="the model's label in records and tables (default: from the checkpoint's path)")
    p.add_argument("--data", help="MRI: fastMRI HDF5, DICOM, PNG or NumPy file or folder; CT: a folder in the LDCT "
                   "layout (default: built-in phantoms)")
    p.add_argument("--search", nargs="+", choices=SEARCHES,
                   help="searches to run (default rs; with --replay: the saved searches)")
    p.add_argument("--replay", metavar="RUN_DIR",
                   help="replay the features found by another run on this model (transferability) instead of searching")
    add_arch_arguments(p)  # --arch, --hparam: bare state dicts
    g = add_data_arguments(p)  # --accelerations, --center-fractions, --mask-type, --crop, phantom geometry
    g.add_argument("--phantom-volumes", type=positive_int, default=4,
                   help="phantom volumes (MRI) or phantom slices (CT) to attack (default 4)")
    g.add_argument("--phantom-seed", type=non_negative_int, default=0,
                   help="first phantom seed (default 0: the validation "
                   "phantoms of train/evaluate)")
    p.add_argument("--coil-maps", choices=sorted(MAP_ESTIMATORS), default="full",
                   help="multi-coil data: coil-sensitivity estimator of the attack's acquisition (default full: from "
                   "the fully sampled coil images; lowres / espirit: from the auto-calibration columns only)")
    p.add_argument("--dose", type=dose, help="CT: dose fraction of the network's input (default: its checkpoint's)")
    p.add_argument("--size", type=image_side, help="CT phantoms: image size (default: the network's training size)")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--family", choices=FAMILIES, help="feature family (default: the seed's walk for MRI, disc for CT)")
    p.add_argument("--intensity", nargs=2, type=finite_float, metavar=("LO", "HI"),
                   help="feature intensities: MRI fractions of each image's range (family default), CT HU "
                   "(default 30 100)")
    p.add_argument("--criterion", choices=CRITERIA, default="seed",
                   help="what is maximised and counted: seed (L_atk >= threshold) or recovery (kept energy < 0.5)")
    p.add_argument("--region", default="center",
                   help="where features go: center (the central crop), foreground, or a .npy boolean mask file")
    p.add_argument("--region-fraction", type=unit_fraction, default=CENTER_FRACTION,
                   help="side of the central crop as a fraction of the image (default 120/320)")
    p.add_argument("--candidates", type=positive_int, default=11,
                   help="RS candidates per image (default 11, as the seed)")
    p.add_argument("--fd-iterations", type=positive_int, default=2)
    p.add_argument("--fd-restarts", type=positive_int, default=1)
    p.add_argument("--grad-steps", type=positive_int, default=6)
    p.add_argument("--grad-step-size", type=positive_float, default=0.2,
                   help="signed step as a fraction of the allowed maximum intensity")
    p.add_argument("--grad-init", type=positive_int, default=4,
                   help="random features the gradient search picks its start "
                   "from (default 4: with 6 steps, the same 11 queries as RS)")
    p.add_argument("--dilation", type=non_negative_int, default=3, help="pixels by which the support is dilated into T")
    p.add_argument("--loss-threshold", type=unit_fraction, default=1e-3,
                   help="the seed's threshold on L_atk (whole-image MSE) for 320x320 images")
    p.add_argument("--threshold-pixels", type=non_negative_int, default=320 * 320,
                   help="image size in pixels at which --loss-threshold applies; other sizes scale it by "
                   "threshold-pixels/(h*w) so the same lost energy counts alike (0: no scaling)")
    p.add_argument("--recovery-threshold", type=unit_fraction, default=0.5,
                   help="recovery criterion: lost when the kept share of the feature's energy is below this (0.5)")
    p.add_argument("--ip-threshold", type=positive_float,
                   help="IP threshold (default: MRI the seed's 1e-4 on the IP loss; CT detectability d' of 5)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per batch")
    p.add_argument("--chunk-size", type=positive_int, default=64, help="most candidates per model call (bounds memory)")
    p.add_argument("--limit", type=positive_int, help="attack only the first N images")
    p.add_argument("--skip-bad", action="store_true",
                   help="CT series: leave out unreadable member files (and their partner slices), each listed on "
                   "stderr and in run.json, instead of stopping at the first")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR, skipping images already recorded")
    p.add_argument("--overwrite", action="store_true", help="replace the records already in RUN_DIR")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(func=run)


def region_option(spec: str) -> "str | torch.Tensor":
    """``--region``: ``center``, ``foreground`` or a ``.npy`` boolean mask file."""
    if spec in ("center", "foreground"):
        return spec
    if not Path(spec).is_file():
        raise BlindspotError(spec, "region must be center, foreground or a .npy mask file")
    return read_mask(spec)


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "--out", inputs=[args.data, args.replay])
    if args.intensity and args.intensity[0] > args.intensity[1]:
        raise BlindspotError(None, f"--intensity {args.intensity[0]:g} {args.intensity[1]:g}: LO is above HI")
    config = FnafConfig(
        searches=tuple(args.search or ["rs"]), family=args.family,
        intensity_range=tuple(args.intensity) if args.intensity else None, criterion=args.criterion,
        region=region_option(args.region), region_fraction=args.region_fraction, candidates=args.candidates,
        fd_iterations=args.fd_iterations, fd_restarts=args.fd_restarts, grad_steps=args.grad_steps,
        grad_step_size=args.grad_step_size, grad_init=args.grad_init, dilation=args.dilation,
        loss_threshold=args.loss_threshold, threshold_pixels=args.threshold_pixels,
        recovery_threshold=args.recovery_threshold, ip_threshold=args.ip_threshold, batch_size=args.batch_size,
        chunk_size=args.chunk_size, seed=args.seed, figures=not args.no_figures,
    )
    config.check()
    device = resolve_device(args.device)
    model = load_model(args.model, device, architecture=args.arch, hparams=arch_hparams(args), name=args.name)
    crop = tuple(args.crop) if args.crop else (tuple(model.physics["crop"]) if model.physics.get("crop") else None)
    if model.modality == "ct":
        settings = ct_settings(model, args.data, args.dose, args.phantom_volumes, args.size, args.seed, args.limit,
                               skip_bad=args.skip_bad)
    else:
        if args.skip_bad:
            raise BlindspotError("--skip-bad", "is for CT series (LDCT layout); this is an MRI network")
        geometry = {**phantom_geometry_of(model), **phantom_options(args)}
        settings = mri_settings(args.data, args.accelerations, args.center_fractions,
                                args.mask_type or model.physics.get("mask_type") or "random", crop, args.limit,
                                coil_maps=args.coil_maps, kspace=model.network.needs_measurements,
                                volumes=args.phantom_volumes, seed=args.phantom_seed, **geometry)
    identity = {k: getattr(args, k) for k in ("model", "arch", "name", "data", "accelerations", "center_fractions",
                                               "mask_type", "crop", "phantom_shape", "phantom_recon_size",
                                               "phantom_slices", "phantom_volumes", "phantom_seed", "dose", "size",
                                               "limit", "region", "coil_maps")}
    result = run_fnaf(model, settings, config, args.out, resume=args.resume, overwrite=args.overwrite,
                      replay=args.replay, replay_searches=args.search, run_settings=identity, inputs=[args.data])
    print(result.markdown, end="")
    print(f"records: {result.out / 'records.csv'}\nsummary: {result.out / 'summary.json'}")
    return 0
