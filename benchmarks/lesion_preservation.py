"""Lesion preservation of standard, lesion-weighted and FNAF-robust U-Nets on knee phantoms with planted lesions.

Writes training, validation and test phantoms with planted lesions (``blindspot data lesion-phantoms``), trains the
U-Nets with identical settings (``blindspot train mri``: plain L1; ``--boxes … --box-weight W``; ``--robust``), scores
them and any extra checkpoints with ``blindspot lesions`` on the held-out test volumes at each acceleration, and
prints one JSON object: preserved / total per acceleration, model and label, mean kept fraction, and the wall time of
each stage. Data, runs and scores go to ``--out``; existing phantoms and finished runs (``best.pt``) are reused.

The defaults are the bundled U-Nets' settings (``src/blindspot/weights/mri_models.json``: 64×64, 16 training volumes
from seed 1000, 4 validation volumes from seed 0, 8 slices, ``chans=16``, 3 pools, 30 epochs, batch 8, lr 1e-3,
4x and 8x; the FNAF-robust run with fraction 0.5, RS of 4 candidates, weight 10), but on lesion phantoms; the test
volumes (seed 2000) were seen by no model, neither in training nor in model selection. The measurement in
``docs/lesions.md`` (about 5 CPU minutes with ``OMP_NUM_THREADS=1``)::

    python benchmarks/lesion_preservation.py --out /tmp/les_runs \\
        --models src/blindspot/weights/mri_unet.pt src/blindspot/weights/mri_unet_robust.pt \\
        --model-names "U-Net (bundled)" "FNAF-robust U-Net (bundled)"

Extra checkpoints are scored on the same test volumes; give the ``--size`` they were trained at.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import time
from pathlib import Path

from blindspot.cli import main as blindspot

#: Trainable variants: run folder → (row label, extra ``train mri`` arguments; ``{W}``: the box weight).
VARIANTS = {
    "plain_lesion_data": ("U-Net (lesion phantoms)", []),
    "lesion_weighted": ("lesion-weighted U-Net (W={W})", ["--boxes", "{boxes}", "--box-weight", "{W}"]),
    "robust_lesion_data": ("FNAF-robust U-Net (lesion phantoms)",
                           ["--robust", "--robust-fraction", "0.5", "--robust-search", "rs", "--robust-candidates",
                            "4", "--robust-weight", "10"]),
}


def _run(argv: list[str]) -> None:
    """Run one ``blindspot`` command; its printed tables go to stderr so stdout holds only the JSON result."""
    with contextlib.redirect_stdout(sys.stderr):
        rc = blindspot(argv)
    if rc != 0:
        raise SystemExit(f"blindspot {' '.join(argv[:2])} failed with exit code {rc}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", type=int, default=64, help="k-space and reconstruction size h = w (default 64)")
    p.add_argument("--train-volumes", type=int, default=16)
    p.add_argument("--val-volumes", type=int, default=4)
    p.add_argument("--test-volumes", type=int, default=8)
    p.add_argument("--test-seed", type=int, default=2000,
                   help="first test volume seed (training uses 1000+, validation 0+)")
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--lesions", type=int, default=4, help="lesions per volume")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--chans", type=int, default=16)
    p.add_argument("--pools", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--box-weight", type=float, default=10.0)
    p.add_argument("--accelerations", type=float, nargs="+", default=[4.0, 8.0],
                   help="training accelerations, and those scored")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                   help="U-Nets to train on the lesion phantoms (default all; none: only score --models)")
    p.add_argument("--device", default="auto")
    p.add_argument("--models", nargs="*", default=[], help="extra checkpoints to score")
    p.add_argument("--model-names", nargs="*", help="row labels of --models")
    args = p.parse_args()
    if args.model_names and len(args.model_names) != len(args.models):
        raise SystemExit("give one --model-names entry per --models checkpoint")
    out = args.out
    geo = ["--shape", str(args.size), str(args.size), "--recon-size", str(args.size), str(args.size),
           "--slices", str(args.slices), "--lesions", str(args.lesions)]
    times: dict[str, float] = {}
    t = time.perf_counter()
    splits = {"train": (args.train_volumes, 1000, 1), "val": (args.val_volumes, 0, 3),
              "test": (args.test_volumes, args.test_seed, 2)}
    for split, (volumes, seed, lesion_seed) in splits.items():
        if split != "test" and not args.variants:
            continue
        if not (out / f"{split}_boxes.csv").exists():
            _run(["data", "lesion-phantoms", "--out", str(out / split), "--boxes", str(out / f"{split}_boxes.csv"),
                  "--volumes", str(volumes), "--seed", str(seed), "--lesion-seed", str(lesion_seed), *geo])
    times["data_s"] = time.perf_counter() - t
    common = ["train", "mri", "--model", "unet", "--hparam", f"chans={args.chans}", "--hparam",
              f"num_pool_layers={args.pools}", "--epochs", str(args.epochs), "--data", str(out / "train"),
              "--val-data", str(out / "val"), "--accelerations", *map(str, args.accelerations), "--batch-size",
              str(args.batch_size), "--lr", "1e-3", "--seed", "0", "--device", args.device, "--no-progress"]
    models, names = [], []
    fill = {"W": f"{args.box_weight:g}", "boxes": str(out / "train_boxes.csv")}
    for folder in args.variants:
        label, extra = VARIANTS[folder]
        run_dir = out / folder
        t = time.perf_counter()
        if not (run_dir / "best.pt").exists():
            _run([*common, *(e.format(**fill) for e in extra), "--out", str(run_dir)])
        times[f"train_{folder}_s"] = time.perf_counter() - t
        models.append(str(run_dir / "best.pt"))
        names.append(label.format(**fill))
    models += args.models
    names += args.model_names or [Path(m).stem for m in args.models]
    result: dict = {
        "benchmark": "lesion_preservation", "size": args.size, "epochs": args.epochs, "box_weight": args.box_weight,
        "train_volumes": args.train_volumes, "val_volumes": args.val_volumes, "test_volumes": args.test_volumes,
        "test_seed": args.test_seed, "slices": args.slices, "lesions_per_volume": args.lesions,
        "by_acceleration": {},
    }
    for acc in args.accelerations:
        key = f"{acc:g}x"
        t = time.perf_counter()
        _run(["lesions", "--model", *models, "--names", *names, "--data", str(out / "test"), "--boxes",
              str(out / "test_boxes.csv"), "--out", str(out / f"lesions_{key}"), "--acceleration", str(acc),
              "--device", args.device, "--no-progress"])
        times[f"lesions_{key}_s"] = time.perf_counter() - t
        table = json.loads((out / f"lesions_{key}" / "table.json").read_text())
        kept: dict[str, list[float]] = {}
        with open(out / f"lesions_{key}" / "lesions.csv", newline="") as f:
            for r in csv.DictReader(f):
                kept.setdefault(r["model"], []).append(float(r["kept"]))
        result["lesions"], result["rule"] = table["lesions"], table["rule"]["text"]
        result["by_acceleration"][key] = {
            "preserved": {m: {lab: f"{c['preserved']}/{c['total']}" for lab, c in v.items()}
                          for m, v in table["preserved"].items()},
            "mean_kept": {m: round(sum(v) / len(v), 4) for m, v in kept.items()},
        }
    result.update({k: round(v, 1) for k, v in times.items()})
    json.dump(result, sys.stdout, indent=1, ensure_ascii=False)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
