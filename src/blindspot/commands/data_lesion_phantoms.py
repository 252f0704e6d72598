"""``blindspot data lesion-phantoms``: synthetic knee phantoms with planted lesions, and their bounding boxes.

Writes ``OUT/file_phantom_{seed:06d}.h5`` (fastMRI HDF5, as ``data phantoms`` does) with ``--lesions`` lesions per
volume — cartilage defects, meniscal tears, bone-marrow lesions (:mod:`blindspot.data.lesion_phantom`) — and their
boxes as ``--boxes`` (CSV ``file,slice,x,y,width,height,label``, or JSON; outside ``OUT``), ready for
``blindspot lesions``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from blindspot.commands.data_phantoms import add_volume_arguments, check_volume_arguments
from blindspot.validate import check_output_file, check_output_folder, non_negative_int


def run(args: argparse.Namespace) -> int:
    from blindspot.data.lesion_phantom import write_lesion_phantoms

    check_volume_arguments(args)
    existing = sorted(p.name for p in args.out.glob("*.h5")) if args.out.is_dir() else []
    check_output_folder(args.out, "--out", results=existing[:3], overwrite=args.overwrite)
    check_output_file(args.boxes, "--boxes", overwrite=args.overwrite)
    paths, boxes = write_lesion_phantoms(
        args.out, args.boxes, args.volumes, args.slices, args.lesions, seed=args.seed, lesion_seed=args.lesion_seed,
        shape=tuple(args.shape), recon_size=tuple(args.recon_size), challenge=args.challenge, num_coils=args.coils,
        kinds=args.kinds, progress=sys.stderr.isatty(),
    )
    counts = ", ".join(f"{n} {k}" for k, n in Counter(b.label for b in boxes).items()) or "none"
    asked = args.lesions * args.volumes
    print(f"wrote {len(paths)} volumes to {args.out} and {len(boxes)} lesion boxes ({counts}) to {args.boxes}")
    if len(boxes) < asked:
        print(f"note: {asked - len(boxes)} of the {asked} lesions asked for found no conspicuous place "
              "(small images); see blindspot.data.lesion_phantom.plant_lesions")
    return 0


def register(subparsers) -> None:
    from blindspot.data.lesion_phantom import LESION_KINDS

    parser = subparsers.add_parser(
        "lesion-phantoms",
        help="write knee phantoms with planted lesions (fastMRI HDF5) and their bounding boxes (CSV)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder for the .h5 volumes")
    parser.add_argument("--boxes", required=True, type=Path, metavar="CSV",
                        help="bounding-box file to write (.csv or .json), outside --out")
    parser.add_argument("--lesions", type=non_negative_int, default=3, help="lesions per volume (default 3)")
    parser.add_argument("--kinds", nargs="+", choices=LESION_KINDS, default=list(LESION_KINDS),
                        help="lesion kinds, cycled through (default: all)")
    parser.add_argument("--lesion-seed", type=non_negative_int, default=0, help="seed of the lesions (default 0)")
    add_volume_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace volumes (.h5) already in --out and an existing --boxes file")
    parser.set_defaults(func=run)
