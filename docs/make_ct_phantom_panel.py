"""Render docs/ct_phantom_panel.png: the middle slice of the first four synthetic CT patients, as written to DICOM.

    python docs/make_ct_phantom_panel.py [--out docs/ct_phantom_panel.png] [--data DIR]

Writes the first four patients of ``blindspot data ct-phantoms``'s defaults (the same files as the command's first
four patients: each patient's slices and noise depend only on the base seed and the patient's number) into ``--data``
(a temporary folder unless given), reads each patient's middle slice back from the DICOM files with the loader the
audit uses, and shows full dose in the lung window (C −600 / W 1500), full dose in the abdomen window (C 50 / W 400),
then 25 % and 10 % dose in the abdomen window.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

#: (row label, dose fraction, window centre HU, window width HU)
ROWS = (("full dose, lung window\nC −600 W 1500", 1.0, -600.0, 1500.0),
        ("full dose, abdomen window\nC 50 W 400", 1.0, 50.0, 400.0),
        ("25 % dose, abdomen window", 0.25, 50.0, 400.0),
        ("10 % dose, abdomen window", 0.10, 50.0, 400.0))
PATIENTS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("ct_phantom_panel.png"))
    parser.add_argument("--data", type=Path, default=None, help="folder for the DICOM files (default: temporary)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blindspot.data.ct_phantom import PhantomDatasetSpec, write_phantom_dataset
    from blindspot.data.ldct import find_ldct, read_ct_hu
    from blindspot.fileio import atomic_write_bytes

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        manifest = write_phantom_dataset(root, PhantomDatasetSpec(patients=PATIENTS))
        kinds = {p["patient"]: p["kind"] for p in manifest["patients"]}
        columns: dict[str, dict[float, object]] = {}
        for dose in (0.25, 0.10):
            for patient in find_ldct(root, dose=dose):
                middle = patient.slices[len(patient.slices) // 2]
                images = columns.setdefault(patient.patient, {})
                if 1.0 not in images:  # the full-dose series pairs with every low dose
                    images[1.0] = read_ct_hu(middle.full_file)[0]
                images[dose] = read_ct_hu(middle.low_file)[0]

    names = sorted(columns, key=lambda n: n[1:])  # patient number: C001, L002, C003, L004
    fig, axes = plt.subplots(len(ROWS), len(names), figsize=(2.6 * len(names), 2.6 * len(ROWS)), squeeze=False)
    for r, (label, dose, centre, width) in enumerate(ROWS):
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.imshow(columns[name][dose], cmap="gray", vmin=centre - width / 2, vmax=centre + width / 2,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{name} ({kinds[name]})", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.tight_layout(pad=0.4)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    print(atomic_write_bytes(args.out, buf.getvalue()))


if __name__ == "__main__":
    main()
