"""Write a seeded, randomly initialised VGG16 (torchvision layout, features only) for offline ``--distance vgg`` runs.

    python docs/make_random_vgg16.py --out /tmp/inv_runs/vgg16_random_seed0.pth [--seed 0]

NOT ImageNet weights: no pretrained VGG16 is available offline, so the perceptual distance measured with this file
uses random convolutional features (``blindspot.models.vgg.load_vgg16`` reports ``vgg_imagenet: false`` for it, and
run summaries record that). The file is a run input, not a committed artefact.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from blindspot.models.vgg import load_vgg16, write_seeded_vgg16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the .pth state dict")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    args = parser.parse_args()
    path = write_seeded_vgg16(args.out, seed=args.seed)
    _, info = load_vgg16(path)  # check it loads as the CLI will load it
    print(f"{path}: seeded random VGG16 (seed {args.seed}), sha256 {info.sha256[:16]}…, imagenet={info.imagenet}")


if __name__ == "__main__":
    main()
