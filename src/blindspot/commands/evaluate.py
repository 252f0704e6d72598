"""``blindspot evaluate``: the source document's Table 1 for one or several checkpoints.

::

    blindspot evaluate runs/unet/best.pt runs/irim/best.pt --accelerations 4 8 --out runs/table1

Scores every model (and the zero-filled baseline) on the same validation slices at each acceleration — SSIM and NMSE
(mean ± std over volumes, fastMRI's definitions) and PSNR — and writes ``table.md``, ``table.csv``, ``table.json``
(``--per-slice``: also ``slices.csv``) into ``--out``. Without ``--data`` the built-in phantoms are used with the
geometry the first checkpoint was trained on (validation volumes from seed 0, which training never uses).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from blindspot.errors import BlindspotError
from blindspot.validate import check_output_folder, non_negative_int, positive_int


def register(subparsers) -> None:
    from blindspot.commands.train_mri import add_arch_arguments, add_data_arguments

    p = subparsers.add_parser(
        "evaluate",
        help="SSIM / NMSE / PSNR table (the seed's Table 1) for reconstruction checkpoints",
        description="Evaluate checkpoints and the zero-filled baseline on a validation set at each acceleration.",
    )
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                   help="checkpoint files (blindspot format, or bare state dicts with --arch); 'zero-filled' for "
                   "the baseline's position")
    p.add_argument("--names", nargs="+", help="row labels, one per checkpoint (default: architecture names)")
    p.add_argument("--no-zero-filled", action="store_true", help="leave out the zero-filled baseline row")
    add_arch_arguments(p)
    p.add_argument("--data", help="validation data: fastMRI HDF5, DICOM, PNG or NumPy file/folder (default: phantoms)")
    g = add_data_arguments(p)
    g.add_argument("--phantom-volumes", type=positive_int, default=4, help="validation phantom volumes (default 4)")
    g.add_argument("--phantom-seed", type=non_negative_int, default=0, help="first validation phantom seed (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--per-slice", action="store_true", help="also write slices.csv (one row per model and slice)")
    p.add_argument("--resume", action="store_true", help="reuse the accelerations already evaluated in DIR")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from blindspot.commands.train_mri import arch_hparams, center_fractions, phantom_options
    from blindspot.data.mri import open_mri_dataset
    from blindspot.report.tables import table1_markdown
    from blindspot.runs.evaluate import evaluate_models, load_eval_models, write_tables
    from blindspot.fileio import write_json
    from blindspot.models.adapters import network_convention
    from blindspot.training.distributed import resolve_device

    check_output_folder(args.out, "--out", inputs=[args.data])
    device = resolve_device(args.device, None)
    hparams = arch_hparams(args)
    models = load_eval_models(args.checkpoints, args.names, device, zero_filled=not args.no_zero_filled,
                              arch=args.arch, hparams=hparams)
    if not models:
        raise BlindspotError(None, "nothing to evaluate: give a checkpoint or keep the zero-filled baseline")
    trained = next((m for m in models if m.physics), None)
    physics: dict[str, Any] = trained.physics if trained else {}
    if args.mask_type is None:
        args.mask_type = physics.get("mask_type") or "random"
    cfs = center_fractions(args)
    crop = tuple(args.crop) if args.crop else (tuple(physics["crop"]) if physics.get("crop") else None)
    kspace = any(network_convention(m.model) == "kspace" for m in models)  # k-space networks read masked k-space

    def open_dataset(mask_func):
        if args.data is not None:
            return open_mri_dataset(args.data, mask_func, crop, kspace=kspace)
        phantom = physics.get("phantom") or {}
        geometry = {k: tuple(phantom[k]) for k in ("shape", "recon_size") if phantom.get(k)}
        if phantom.get("num_coils"):  # the multi-coil phantoms the first checkpoint was trained on
            geometry.update(challenge="multicoil", num_coils=int(phantom["num_coils"]))
        geometry.update(phantom_options(args))
        return open_mri_dataset(None, mask_func, crop, volumes=args.phantom_volumes, seed=args.phantom_seed,
                                kspace=kspace, **geometry)

    out = Path(args.out)
    result = evaluate_models(models, args.accelerations, cfs, open_dataset, mask_type=args.mask_type,
                             batch_size=args.batch_size, device=device, out_dir=out, resume=args.resume,
                             progress=args.progress)
    meta = {
        "data": args.data or "built-in knee phantoms",
        "mask_type": args.mask_type,
        "models": [{"name": m.name, "architecture": m.architecture, "source": m.source} for m in models],
    }
    n_vol, n_sl = result.rows[0]["volumes"], result.rows[0]["slices"]
    title = (f"Table 1: validation set evaluation ({meta['data']}; {n_vol} volumes, {n_sl} slices; "
             f"{args.mask_type} masks), per-volume mean ± std")
    paths = write_tables(out, result, per_slice=args.per_slice, meta=meta, title=title)
    write_json(out / "run.json", {**meta, "accelerations": args.accelerations, "center_fractions": cfs,
                                  "crop": list(crop) if crop else None, "device": str(device)})
    print(table1_markdown(result.rows, title))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
