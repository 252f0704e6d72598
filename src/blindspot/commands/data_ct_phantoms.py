"""``blindspot data ct-phantoms --out DIR``: synthetic chest and abdomen CT written as DICOM in the public LDCT layout.

Each synthetic patient gets a study with a ``Full Dose Images`` series and one ``Low Dose Images (NN%)`` series per
``--doses`` value, slices ``1-NNN.dcm`` in ``DIR/LDCT-and-Projection-data/<patient>/<study>/<series>/`` — the layout
``blindspot train ct --data DIR`` (and every CT command) reads, exactly like the real data set. Low-dose images are
simulated in the projection domain (Poisson counts, log, FBP; :mod:`blindspot.physics.ct`). ``DIR/phantoms.json``
records the settings and the physics; re-running with the same settings resumes (patients already written are
skipped), other settings in the same folder are refused. ``--panel FILE.png`` also draws a windowed panel (lung
C −600 W 1500, abdomen C 50 W 400) of the first slices of the first patients.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from blindspot.validate import (check_array_bytes, check_output_file, check_output_folder, fraction, image_side,
                                non_negative_int, positive_float, positive_int)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ct-phantoms",
        help="write synthetic chest/abdomen CT (full dose + simulated low doses) as DICOM in the LDCT layout",
        description="Synthetic chest and abdomen CT slices in HU, each paired with projection-domain low-dose "
        "simulations, written as DICOM series in the public LDCT-and-Projection-data layout.",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--patients", type=positive_int, default=6, help="synthetic patients (kinds alternate; default 6)")
    p.add_argument("--min-slices", type=positive_int, default=3, help="fewest slices per patient (default 3)")
    p.add_argument("--max-slices", type=positive_int, default=8, help="most slices per patient (default 8)")
    p.add_argument("--size", type=image_side, default=512, help="image size in pixels (default 512; FOV 380 mm)")
    p.add_argument("--doses", type=fraction, nargs="+", default=[0.25, 0.10],
                   help="low-dose fractions (default 0.25 0.10)")
    p.add_argument("--kinds", nargs="+", default=["chest", "abdomen"], help="phantom kinds cycled over patients")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--i0", type=positive_float, help="full-dose photons per detector bin and view (default 2e6)")
    p.add_argument("--angles", type=positive_int, help="projection views over 180° (default ceil(π/2·size))")
    p.add_argument("--filter", default="shepp-logan", help="FBP filter: ramp, shepp-logan, cosine, hamming, hann")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N (simulation device; a GPU draws other noise realisations than the CPU)")
    p.add_argument("--panel", type=Path, metavar="PNG", help="also draw a windowed panel of some slices")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --panel file")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on a terminal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from blindspot.data.ct_phantom import PhantomDatasetSpec, write_phantom_dataset
    from blindspot.physics.ct import FILTERS
    from blindspot.errors import BlindspotError

    check_output_folder(args.out, "--out")
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / "phantoms.json").is_file():
        raise BlindspotError(args.out, "holds other files and no phantoms.json; choose a new or empty --out")
    check_output_file(args.panel, "--panel", overwrite=args.overwrite)
    angles = args.angles or math.ceil(math.pi / 2 * args.size)
    check_array_bytes((angles, math.ceil(math.sqrt(2) * args.size)), 4, "--angles/--size")  # one sinogram
    if args.filter not in FILTERS:
        raise BlindspotError(None, f"unknown --filter {args.filter!r}; choose from {', '.join(FILTERS)}")
    spec = PhantomDatasetSpec(
        patients=args.patients, min_slices=args.min_slices, max_slices=args.max_slices, size=args.size,
        doses=tuple(float(d) for d in args.doses), seed=args.seed, kinds=tuple(args.kinds), i0=args.i0,
        n_angles=args.angles, filter_name=args.filter,
    )
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    manifest = write_phantom_dataset(args.out, spec, device=args.device, progress=progress)
    n = sum(len(p["z_rel"]) for p in manifest["patients"])
    print(f"wrote {len(manifest['patients'])} patients, {n} slices × {1 + len(spec.doses)} series "
          f"({spec.size}x{spec.size}, doses 1 + {', '.join(f'{d:g}' for d in spec.doses)}) to "
          f"{Path(args.out) / 'LDCT-and-Projection-data'}")
    if args.panel is not None:
        draw_panel(args.out, args.panel, doses=spec.doses)
        print(f"panel: {args.panel}")
    return 0


def draw_panel(data: Path, png: Path, doses=(0.25,), columns: int = 4) -> Path:
    """A panel of the middle slice of up to ``columns`` patients: full dose in the lung and abdomen windows, then
    each low dose in the abdomen window."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from blindspot.data.dicom import read_dicom
    from blindspot.data.ldct import find_ldct
    from blindspot.fileio import atomic_write_bytes
    from blindspot.physics.ct import WINDOWS

    by_dose = {d: find_ldct(data, dose=d) for d in sorted(doses, reverse=True)}
    first = next(iter(by_dose.values()))
    order = sorted(range(len(first)), key=lambda i: (first[i].patient[1:], first[i].patient[0]))[:columns]
    rows = [("full dose, lung window\nC −600 W 1500", "lung", None),
            ("full dose, abdomen window\nC 50 W 400", "abdomen", None)]
    rows += [(f"{d * 100:g} % dose, abdomen window", "abdomen", d) for d in by_dose]
    fig, axes = plt.subplots(len(rows), len(order), figsize=(3.2 * len(order), 3.25 * len(rows)), squeeze=False)
    for j, i in enumerate(order):
        p = first[i]
        k = len(p.slices) // 2
        for r, (title, window, dose) in enumerate(rows):
            s = p.slices[k] if dose is None else by_dose[dose][i].slices[k]
            hu = read_dicom(s.full_file if dose is None else s.low_file).pixels
            ax = axes[r][j]
            ax.imshow(WINDOWS[window].apply(torch.from_numpy(hu)).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{p.patient} ({'chest' if p.patient.startswith('C') else 'abdomen'})", fontsize=10)
            if j == 0:
                ax.set_ylabel(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return atomic_write_bytes(png, buf.getvalue())
