"""``blindspot lesions``: how many annotated lesions each model's reconstruction preserves (the seed's lesion check).

::

    blindspot lesions --model runs/unet/best.pt runs/robust/best.pt --data knee_val/ --boxes boxes.csv \\
        --out runs/lesions --acceleration 4

Reads the bounding boxes (fastMRI+ style CSV ``file,slice,x,y,width,height,label`` or its JSON equivalent;
:mod:`blindspot.data.lesions`), checks them against the fastMRI volumes in ``--data``, runs every model (and the
zero-filled baseline) on the annotated slices under the same seeded masks, and scores every lesion
(:mod:`blindspot.runs.lesions`): SSIM / NMSE / PSNR in the box and in the box grown by ``--margin`` pixels, the lesion's
contrast in truth and reconstruction, the kept contrast fraction and the *preserved* verdict (``kept ≥
--threshold``). Writes ``lesions.csv``, ``table.md`` (preserved / total per model and label), ``table.json``,
``run.json`` and ``figures/*.png`` (crops: zero-filled input, truth, each model) into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from blindspot.commands.train_mri import add_mask_type_argument
from blindspot.validate import (acceleration, check_output_folder, non_negative_int, positive_int,
                                unit_fraction)

#: What a finished ``lesions`` run leaves in its folder: never replaced without ``--overwrite``.
LESION_RESULTS = ("run.json", "lesions.csv", "table.md", "table.json")


def register(subparsers) -> None:
    from blindspot.commands.train_mri import add_arch_arguments

    p = subparsers.add_parser(
        "lesions",
        help="lesion preservation per model on annotated bounding boxes (preserved / total by label)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", nargs="+", required=True, metavar="CKPT",
                   help="checkpoints (blindspot format, or bare state dicts with --arch); 'zero-filled' for the "
                   "baseline's position")
    p.add_argument("--names", nargs="+", help="row labels, one per checkpoint")
    p.add_argument("--no-zero-filled", action="store_true", help="leave out the zero-filled baseline row")
    add_arch_arguments(p)
    p.add_argument("--data", required=True, help="fastMRI HDF5 file or folder the boxes refer to")
    p.add_argument("--boxes", required=True, metavar="CSV", help="bounding boxes: .csv or .json")
    p.add_argument("--origin", choices=["top", "bottom"], default="top",
                   help="rows of y counted from the image's top (default) or bottom (fastMRI+ draws on the "
                   "flipped image)")
    p.add_argument("--acceleration", type=acceleration, default=4.0, help="default 4")
    p.add_argument("--center-fraction", type=unit_fraction, help="default: 4x → 0.08, 8x → 0.04")
    add_mask_type_argument(p, "default: the first checkpoint's, else random")
    p.add_argument("--threshold", type=unit_fraction, default=0.5,
                   help="preserved when the kept contrast fraction is at least this (default 0.5)")
    p.add_argument("--margin", type=non_negative_int, default=4, help="ring around each box, pixels (default 4)")
    p.add_argument("--max-figures", type=non_negative_int, default=12, help="lesion crop figures to draw (default 12)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in RUN_DIR")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from blindspot.commands.train_mri import arch_hparams
    from blindspot.data.lesions import read_annotations, volume_key
    from blindspot.runs.evaluate import load_eval_models
    from blindspot.fileio import write_json
    from blindspot.runs.lesions import PreservationRule, evaluate_lesions, open_annotated, table_markdown, write_results
    from blindspot.physics.mri import create_mask_func
    from blindspot.training.distributed import resolve_device

    check_output_folder(args.out, "--out", inputs=[args.data], results=LESION_RESULTS, overwrite=args.overwrite)
    hparams = arch_hparams(args)
    rule = PreservationRule(args.threshold, args.margin)
    annotations = read_annotations(args.boxes)  # malformed rows fail before any model is loaded
    device = resolve_device(args.device, None)
    models = load_eval_models(args.model, args.names, device, zero_filled=not args.no_zero_filled, arch=args.arch,
                              hparams=hparams)
    physics = next((m.physics for m in models if m.physics), {})
    mask_type = args.mask_type or physics.get("mask_type") or "random"
    cfs = [args.center_fraction] if args.center_fraction is not None else None
    mask_func = create_mask_func(mask_type, [args.acceleration], cfs)
    dataset, boxes, _ = open_annotated(args.data, annotations, mask_func, origin=args.origin,
                                       progress=args.progress)
    result = evaluate_lesions(models, dataset, boxes, rule, batch_size=args.batch_size, device=device,
                              max_crops=args.max_figures, progress=args.progress)
    meta = {
        "data": str(args.data), "boxes": str(args.boxes), "origin": annotations.origin or args.origin,
        "lesions": len(boxes),
        "study_level_rows_skipped": annotations.study_level,
        "slices": len({b.key for b in boxes}), "volumes": len({volume_key(b.file) for b in boxes}),
        "acceleration": args.acceleration, "center_fraction": mask_func.center_fractions[0], "mask_type": mask_type,
        "models": [{"name": m.name, "architecture": m.architecture, "source": m.source} for m in models],
    }
    title = (f"Lesions preserved / total ({len(boxes)} lesions on {meta['slices']} slices; {args.acceleration:g}x "
             f"{mask_type} masks)")
    out = Path(args.out)
    paths = write_results(out, result, meta, title)
    write_json(out / "run.json", {**meta, "rule": rule.describe(), "device": str(device)})
    print(table_markdown(result.rows, rule, title))
    figures = sum(1 for k in paths if k.startswith("figure_"))
    print(f"written: {paths['lesions']}, {paths['markdown']}, {paths['json']}, {figures} figure(s) in "
          f"{out / 'figures'}")
    return 0
