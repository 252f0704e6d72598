"""``blindspot audit``: the whole FNAF audit of MRI reconstruction networks or CT denoisers in one command.

Without ``--model`` it audits the bundled demo models (standard U-Net, FNAF-robust U-Net, I-RIM) on freshly generated
phantoms; with ``--model CKPT [--model CKPT …] [--data PATH]`` it audits yours. It prints Table 1 (SSIM, NMSE ± std,
PSNR), Table 2 (RS / FD / gradient attack rates with 95% intervals and mean attack loss), the IP table and the
transfer rates, and writes ``RUN_DIR/report.html`` with ``results.json`` and CSVs beside it
(:mod:`blindspot.runs.audit`). With ``--boxes CSV`` (lesion bounding boxes on the ``--data`` fastMRI files) the report
gains a lesion section: preserved / total per model and label at each acceleration (:mod:`blindspot.runs.lesions`),
``results.json["lesions"]`` and ``lesions.csv``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from blindspot.commands.train_mri import add_mask_type_argument
from blindspot.errors import BlindspotError
from blindspot.validate import (acceleration, check_output_folder, dose, image_side, non_negative_int, positive_int,
                                unit_fraction)


def add_audit_arguments(p: argparse.ArgumentParser, out_default: str | None = None, lesion_phantoms: int = 0) -> None:
    """Options shared by ``audit`` and ``demo`` (``lesion_phantoms``: the default of ``--lesion-phantoms``)."""
    from blindspot.attacks.features import FAMILIES
    from blindspot.runs.audit import AUDIT_PHANTOM_SEED

    p.add_argument("--model", action="append", metavar="CKPT",
                   help="checkpoint or bundled network (e.g. cnn10) to audit, repeatable (default: the bundled demo "
                        "networks of --modality)")
    p.add_argument("--modality", choices=["mri", "ct"], default="mri",
                   help="without --model: audit the bundled MRI networks (default) or CT denoisers")
    p.add_argument("--dose", type=dose, help="CT: dose fraction of the denoisers' input (default: the checkpoint's)")
    p.add_argument("--ct-size", type=image_side,
                   help="CT phantoms: image size (default: the checkpoint's training size)")
    p.add_argument("--names", nargs="+", help="row labels, one per --model (default: from the architecture)")
    p.add_argument("--data", help="MRI: fastMRI HDF5, DICOM, PNG or NumPy file/folder; CT: a folder in the LDCT layout "
                        "(default: built-in phantoms)")
    if out_default is None:
        p.add_argument("--out", required=True, metavar="RUN_DIR")
    else:
        p.add_argument("--out", default=out_default, metavar="RUN_DIR", help=f"default {out_default}")
    p.add_argument("--accelerations", nargs="+", type=acceleration, default=[4.0, 8.0])
    p.add_argument("--center-fractions", nargs="+", type=unit_fraction,
                   help="one per acceleration (default 0.08, 0.04)")
    add_mask_type_argument(p, "default: the first checkpoint's, else random")
    p.add_argument("--crop", nargs=2, type=image_side, metavar=("H", "W"))
    p.add_argument("--search", nargs="+", choices=["rs", "fd", "grad"], default=["rs", "fd", "grad"])
    p.add_argument("--family", choices=FAMILIES, help="feature family (default: walk for MRI, disc for CT)")
    p.add_argument("--criteria", nargs="+", choices=["seed", "recovery"], default=["seed", "recovery"],
                   help="FNAF criteria, each attacked and reported on its own (default both: seed = L_atk reaches "
                        "the seed's threshold, recovery = less than half of the feature's energy kept); the first "
                        "one's features make the figures")
    p.add_argument("--candidates", type=positive_int, default=11, help="RS candidates per image (seed: 11)")
    p.add_argument("--phantom-volumes", type=positive_int, default=6,
                   help="phantom volumes (MRI; CT: phantom patients x slices images)")
    p.add_argument("--phantom-slices", type=positive_int, default=6)
    p.add_argument("--phantom-seed", type=non_negative_int, default=AUDIT_PHANTOM_SEED,
                   help=f"first phantom seed (default {AUDIT_PHANTOM_SEED}: seen neither in training nor validation)")
    p.add_argument("--limit", type=positive_int, help="only the first N images")
    p.add_argument("--skip-bad", action="store_true",
                   help="CT series: leave out unreadable member files (and their partner slices), each listed on "
                   "stderr and in run.json, instead of stopping at the first")
    p.add_argument("--lesion-phantoms", type=non_negative_int, default=lesion_phantoms, metavar="N",
                   help="plant lesions in N held-out phantom volumes (RUN_DIR/lesion_phantoms) and add the lesion "
                        f"section on them (default {lesion_phantoms})")
    p.add_argument("--no-transfer", action="store_true", help="skip the transferability replay")
    p.add_argument("--coil-maps", choices=["full", "lowres", "espirit"], default="full",
                   help="multi-coil MRI data: coil-sensitivity estimator of the attacks' acquisition (default full)")
    p.add_argument("--invariance-images", type=non_negative_int, default=1,
                   help="CT: image-domain invariances of each denoiser on this many inputs (default 1; 0: none)")
    p.add_argument("--invariance-iterations", type=positive_int, default=200,
                   help="CT: Adam iterations of those invariances (default 200; the source document runs 3000)")
    p.add_argument("--no-beyond", action="store_true",
                   help="skip the sections beyond the seeds (hallucination maps, worst-case and false-positive "
                        "measurement attacks, sampling-rate stability; docs/beyond.md)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue an interrupted audit in RUN_DIR")


def register(subparsers) -> None:
    from blindspot.commands.train_mri import add_arch_arguments

    p = subparsers.add_parser(
        "audit",
        help="audit MRI reconstruction networks or CT denoisers: quality, FNAF attack rates, IP, transfer; report.html",
        description="Table 1 (SSIM/NMSE/PSNR), Table 2 (RS/FD/gradient FNAF attack rates with 95%% intervals), the "
        "IP table and transferability for the bundled demo models or your checkpoints; writes RUN_DIR/report.html, "
        "results.json and CSVs.",
    )
    add_audit_arguments(p)
    add_arch_arguments(p)
    g = p.add_argument_group("lesions (blindspot.runs.lesions): a lesion section in the report")
    g.add_argument("--boxes", metavar="CSV", help="lesion bounding boxes (CSV or JSON) on the --data fastMRI files")
    g.add_argument("--lesion-threshold", type=unit_fraction, default=0.5,
                   help="preserved when the kept contrast fraction is at least this (default 0.5)")
    g.add_argument("--lesion-margin", type=non_negative_int, default=4, help="ring around each box, pixels (default 4)")
    g.add_argument("--box-origin", choices=["top", "bottom"], default="top",
                   help="rows of y counted from the image's top (default) or bottom (fastMRI+)")
    g.add_argument("--lesion-figures", type=non_negative_int, default=3,
                   help="lesion crop figures per acceleration (default 3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from blindspot.commands.train_mri import arch_hparams
    from blindspot.runs.audit import AuditConfig, bundled_models, run_audit

    t0 = time.perf_counter()
    check_output_folder(args.out, "--out", inputs=[args.data, getattr(args, "boxes", None)])
    hparams = arch_hparams(args) if hasattr(args, "arch") else None
    bare = {"architecture": args.arch, "hparams": hparams} if getattr(args, "arch", None) else {}
    if bare and not args.model:
        raise BlindspotError(None, "--arch needs --model (the bare state dicts to audit)")
    lesion_options = None
    boxes = getattr(args, "boxes", None)
    if boxes and not args.data:
        raise BlindspotError(boxes, "--boxes needs --data: the fastMRI volumes the boxes name (or use "
                                    "--lesion-phantoms N for built-in phantoms with planted lesions)")
    if boxes or args.lesion_phantoms:
        from blindspot.runs.lesions import LesionAuditOptions, PreservationRule

        figures = getattr(args, "lesion_figures", 3)
        lesion_options = LesionAuditOptions(PreservationRule(getattr(args, "lesion_threshold", 0.5),
                                                             getattr(args, "lesion_margin", 4)),
                                            getattr(args, "box_origin", "top"), figures)
    if args.model:
        if args.names and len(args.names) != len(args.model):
            raise BlindspotError(None, f"give one --names entry per --model ({len(args.model)})")
        names = args.names or [None] * len(args.model)
        models = list(zip(names, args.model))
    else:
        if args.names:
            raise BlindspotError(None, "--names needs --model")
        models = bundled_models(args.modality)
    config = AuditConfig(
        accelerations=tuple(args.accelerations),
        center_fractions=tuple(args.center_fractions) if args.center_fractions else None,
        mask_type=args.mask_type, dose=args.dose, ct_size=args.ct_size, searches=tuple(args.search),
        family=args.family, criteria=tuple(args.criteria),
        candidates=args.candidates, transfer=not args.no_transfer, phantom_volumes=args.phantom_volumes,
        phantom_slices=args.phantom_slices, phantom_seed=args.phantom_seed, limit=args.limit, skip_bad=args.skip_bad,
        lesion_phantoms=args.lesion_phantoms, invariance_images=args.invariance_images,
        invariance_iterations=args.invariance_iterations,
        batch_size=args.batch_size, seed=args.seed, device=args.device, figures=not args.no_figures,
        beyond=not args.no_beyond,
    )
    result = run_audit(models, args.out, data=args.data, config=config,
                       crop=tuple(args.crop) if args.crop else None, resume=args.resume,
                       log=lambda s: print(s, file=sys.stderr), boxes=boxes,
                       lesion_options=lesion_options, coil_maps=args.coil_maps, **bare)
    if not result.main:  # another rank of a torchrun job: rank 0 prints the summary
        return 0
    print(result.markdown)
    t = result.timings
    parts = [("Table 1", "table1"), ("lesions", "lesions"), ("attacks", "attacks"), ("transfer", "transfer"),
             ("invariances", "invariances"), ("beyond the seeds", "beyond"), ("figures", "figures")]
    took = ", ".join(f"{name} {t[k]:.1f} s" for name, k in parts if t.get(k, 0) >= 0.05)
    print(f"audit finished in {time.perf_counter() - t0:.1f} s ({took})")
    print(f"report: {result.report.resolve()}")
    print(f"results: {(Path(args.out) / 'results.json').resolve()}")
    return 0
