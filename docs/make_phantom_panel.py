"""Render docs/phantom_panel.png: eight synthetic knee slices from eight phantom volumes (fastMRI size).

    python docs/make_phantom_panel.py [--out docs/phantom_panel.png]

Each volume is rendered at fastMRI's 640x368 k-space size with 35 slices; the panel shows one central slice of each
(the stored 320x320 target, ``reconstruction_esc``), mixing proton-density (CORPD_FBK) and fat-suppressed
(CORPDFS_FBK) contrast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from blindspot.commands.data_phantoms import save_panel
from blindspot.data.knee_phantom import generate_knee_volume, reconstruction_from_kspace

#: (volume seed, slice of 35): volumes and sections chosen to show both contrasts and several depths.
PANEL = ((0, 17), (1, 16), (7, 19), (12, 15), (3, 20), (5, 18), (9, 13), (4, 22))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("phantom_panel.png"))
    args = parser.parse_args()
    images = []
    for seed, slice_num in PANEL:
        vol = generate_knee_volume(seed, 35)
        rec = reconstruction_from_kspace(vol.kspace(), vol.recon_size)[slice_num]
        images.append((rec.numpy(), f"seed {seed} · slice {slice_num}/35 · {vol.acquisition}"))
    print(save_panel(images, args.out, cols=4, dpi=90))


if __name__ == "__main__":
    main()
