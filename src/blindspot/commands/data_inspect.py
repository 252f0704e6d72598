"""``blindspot data inspect PATH``: summarise an MRI data set and read every slice, so that bad files surface now.

Prints the kind of source, the number of volumes (files) and slices, shapes, crop, challenge and attributes, then
reads every slice (k-space and target, or every image). A bad file ends the command with the one-line error naming
it and exit code 2. ``--json FILE`` also writes the summary as JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from blindspot.data.fastmri import CHALLENGES
from blindspot.data.images import RESIZE_MODES
from blindspot.data.mri import open_mri_dataset
from blindspot.errors import BlindspotError
from blindspot.fileio import write_json
from blindspot.validate import check_output_file, image_side, same_or_inside


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="summarise an MRI data set (fastMRI .h5, DICOM, PNG, .npy) and read every slice to find bad files",
        description="Summarise an MRI data set (volumes, slices, shapes, challenge, attributes) and read every slice, "
        "so that a bad file surfaces now as one line naming it (exit code 2).",
    )
    parser.add_argument("path", type=Path, help="an .h5 / DICOM / .png / .npy file, or a folder of them")
    parser.add_argument("--challenge", choices=CHALLENGES, help="fastMRI: require this challenge (default: detect)")
    parser.add_argument("--crop", type=image_side, nargs=2, metavar=("H", "W"),
                        help="crop (fastMRI) or working size (images)")
    parser.add_argument("--resize", choices=RESIZE_MODES, help="images: how to reach the working size (default crop)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the summary to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.set_defaults(func=run)


def _format(summary: dict[str, Any]) -> list[str]:
    lines = []
    if summary["kind"] == "fastmri":
        lines.append(f"fastMRI HDF5 data: {summary['root']}")
        lines.append(f"  volumes: {summary['volumes']}    slices: {summary['slices']}")
        labels = {
            "challenge": "challenge",
            "kspace_shape": "k-space per slice",
            "crop": "crop",
            "target": "target",
            "acquisition": "acquisition",
        }
    else:
        lines.append(f"image data: {summary['root']}")
        lines.append(f"  files: {summary['files']}    slices: {summary['slices']}")
        labels = {"file_kinds": "file kinds", "stored_shape": "stored size"}
    for key, label in labels.items():
        counted = ", ".join(f"{value} ({n})" for value, n in summary[key].items())
        lines.append(f"  {label}: {counted}")
    if summary["kind"] == "fastmri":
        lines.append(f"  patients: {summary['patients']}")
        if summary["max"] is not None:
            lines.append(f"  attribute max: {summary['max'][0]:.6g} to {summary['max'][1]:.6g}")
    else:
        lines.append(f"  working size: {summary['working_size'] or 'native'}    resize: {summary['resize']}")
    return lines


def run(args: argparse.Namespace) -> int:
    check_output_file(args.json, "--json", overwrite=args.overwrite)
    if args.json is not None and args.path.is_dir() and same_or_inside(args.json, args.path):
        raise BlindspotError(args.json, f"lies inside the data folder {args.path}; choose another --json")
    crop = tuple(args.crop) if args.crop else None
    dataset = open_mri_dataset(args.path, None, crop, challenge=args.challenge, resize=args.resize)
    summary = dataset.summary()
    for line in _format(summary):
        print(line)
    checked = dataset.check()
    print(f"read all {checked} slices: every file readable, no NaN/Inf")
    if args.json is not None:
        write_json(args.json, {**summary, "checked_slices": checked})
    return 0
