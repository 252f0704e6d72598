"""``blindspot data phantoms``: write the built-in synthetic knee phantoms as fastMRI HDF5 files.

Volume ``v`` gets seed ``--seed + v`` and the file name ``file_phantom_{seed:06d}.h5`` (the name also seeds its
under-sampling mask, as fastMRI's file names do). Files that already hold the same phantom are kept, so an
interrupted run resumes; a file of that name holding anything else is a one-line error unless ``--overwrite``.
``--panel`` also renders a PNG panel of a few slices read back from the written files.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from blindspot.data.fastmri import CHALLENGES
from blindspot.data.knee_files import write_phantom_volumes
from blindspot.data.knee_phantom import FASTMRI_KNEE_SHAPE, FASTMRI_RECON_SIZE
from blindspot.errors import BlindspotError
from blindspot.fileio import atomic_write_bytes
from blindspot.validate import (check_array_bytes, check_crop, check_output_file, check_output_folder,
                                image_side, non_negative_int, positive_int)

#: Coils of multi-coil phantom volumes unless ``--coils`` says otherwise.
DEFAULT_COILS = 8


def save_panel(images: Sequence[tuple[np.ndarray, str]], path: str | Path, cols: int = 4, dpi: int = 100) -> Path:
    """Save magnitude images ``(h, w)`` with titles as a grey-scale grid PNG, atomically.

    Each image is displayed from 0 to its own 99.9th percentile (fat-suppressed images are otherwise dark).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not images:
        raise BlindspotError(path, "no images to put in the panel")
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, title) in zip(axes.flat, images):
        image = np.asarray(image, dtype=np.float32)
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=float(np.percentile(image, 99.9)), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.tight_layout(pad=0.4, h_pad=0.9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def panel_from_files(paths: Sequence[str | Path], out: str | Path, max_volumes: int = 4, per_volume: int = 2) -> Path:
    """A panel of ``per_volume`` central slices from each of the first ``max_volumes`` fastMRI files."""
    images = []
    for path in list(paths)[:max_volumes]:
        with h5py.File(path, "r") as hf:
            key = "reconstruction_esc" if "reconstruction_esc" in hf else "reconstruction_rss"
            rec = hf[key]
            n = rec.shape[0]
            picks = sorted({int(round(q * (n - 1))) for q in np.linspace(0.42, 0.58, per_volume)})
            acq = str(hf.attrs.get("acquisition", ""))
            images += [(rec[i], f"{Path(path).stem} · slice {i}\n{acq}") for i in picks]
    return save_panel(images, out, cols=min(4, len(images)))


def check_volume_arguments(args: argparse.Namespace) -> None:
    """What :func:`add_volume_arguments` asked for is consistent and fits in memory (one volume's complex64 k-space).
    ``--coils`` alone means multi-coil volumes; with ``--challenge singlecoil`` it is an error."""
    if args.coils is not None and args.challenge == "singlecoil":
        raise BlindspotError("--coils", "is for multi-coil volumes; drop it or give --challenge multicoil")
    if args.challenge is None:
        args.challenge = "singlecoil" if args.coils is None else "multicoil"
    if args.coils is None:
        args.coils = DEFAULT_COILS
    coils = 1 if args.challenge == "singlecoil" else args.coils
    check_array_bytes((args.slices, coils, *args.shape), 8, "--slices/--coils/--shape")
    check_crop(args.recon_size, args.shape, "--shape", "--recon-size")  # only when given: the default is clipped
    if args.recon_size is None:
        args.recon_size = list(FASTMRI_RECON_SIZE)


def run(args: argparse.Namespace) -> int:
    check_volume_arguments(args)
    check_output_folder(args.out, "--out")
    check_output_file(args.panel, "--panel", overwrite=args.overwrite)
    shape = tuple(args.shape)
    paths = write_phantom_volumes(
        args.out, args.volumes, args.slices, seed=args.seed, shape=shape, challenge=args.challenge,
        num_coils=args.coils, recon_size=tuple(args.recon_size), overwrite=args.overwrite, progress=sys.stderr.isatty(),
    )
    kind = "single-coil" if args.challenge == "singlecoil" else f"multi-coil ({args.coils} coils)"
    print(f"wrote {len(paths)} {kind} fastMRI volumes of {args.slices} slices, k-space {shape[0]}x{shape[1]}, "
          f"to {args.out}")
    for path in paths:
        print(f"  {path}")
    if args.panel:
        print(f"panel: {panel_from_files(paths, args.panel)}")
    return 0


def add_volume_arguments(parser: argparse.ArgumentParser) -> None:
    """What every phantom writer asks for: ``--volumes --slices --seed --shape --recon-size --challenge --coils``."""
    parser.add_argument("--volumes", type=positive_int, default=4, help="number of volumes (default 4)")
    parser.add_argument("--slices", type=positive_int, default=35, help="slices per volume (default 35)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the first volume (default 0)")
    parser.add_argument("--shape", type=image_side, nargs=2, metavar=("H", "W"), default=list(FASTMRI_KNEE_SHAPE),
                        help="k-space size, rows (readout) and columns (phase encode); default 640 368")
    parser.add_argument("--recon-size", type=image_side, nargs=2, metavar=("h", "w"),
                        help="reconstruction crop, at most --shape (default 320 320, clipped to --shape)")
    parser.add_argument("--challenge", choices=CHALLENGES,
                        help="singlecoil (the default) or multicoil (the default when --coils is given)")
    parser.add_argument("--coils", type=positive_int,
                        help=f"coils of multi-coil volumes (default {DEFAULT_COILS}; implies --challenge multicoil)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "phantoms",
        help="write synthetic knee MR phantoms as fastMRI HDF5 files",
        description=__doc__.split("\n\n")[0] + " Files: OUT/file_phantom_{seed:06d}.h5.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    add_volume_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="rewrite files that already exist (without it, only the same phantoms are kept)")
    parser.add_argument("--panel", type=Path, default=None, metavar="PNG", help="also save a PNG panel of slices")
    parser.set_defaults(func=run)
