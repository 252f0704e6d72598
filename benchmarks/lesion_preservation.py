"""Lesion preservation of standard, lesion-weighted and FNAF-robust U-Nets on knee phantoms with planted lesions.

Writes training and test phantoms with planted lesions (``blindspot data lesion-phantoms``), trains the three U-Nets
with identical settings (``blindspot train mri``: plain L1; ``--boxes … --box-weight W``; ``--robust``), scores them
and any extra checkpoints with ``blindspot lesions`` on the test volumes, and prints one JSON object: preserved /
total per model and label, mean kept fraction and the wall time of each stage. Test and training phantoms use
different seeds. Example (CPU, a few minutes)::

    python benchmarks/lesion_preservation.py --out /tmp/lesion_bench --size 64 --epochs 4

Extra checkpoints (``--models A.pt B.pt``, e.g. the bundled U-Nets) are scored on the same test volumes; give the
``--size`` / ``--shape`` they were trained at.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from blindspot.cli import main as blindspot


def _run(argv: list[str]) -> None:
    rc = blindspot(argv)
    if rc != 0:
        raise SystemExit(f"blindspot {' '.join(argv[:2])} failed with exit code {rc}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", type=int, default=64, help="reconstruction size h = w (default 64)")
    p.add_argument("--shape", type=int, nargs=2, help="k-space size (default: size x size)")
    p.add_argument("--train-volumes", type=int, default=8)
    p.add_argument("--test-volumes", type=int, default=3)
    p.add_argument("--test-seed", type=int, default=0, help="first test volume seed (training uses 1000+)")
    p.add_argument("--slices", type=int, default=6)
    p.add_argument("--lesions", type=int, default=4, help="lesions per volume")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--chans", type=int, default=8)
    p.add_argument("--pools", type=int, default=2)
    p.add_argument("--box-weight", type=float, default=10.0)
    p.add_argument("--acceleration", type=float, default=4.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--models", nargs="*", default=[], help="extra checkpoints to score")
    p.add_argument("--skip-training", action="store_true", help="only score --models")
    args = p.parse_args()
    out = args.out
    shape = [str(v) for v in (args.shape or [args.size, args.size])]
    geo = ["--shape", *shape, "--recon-size", str(args.size), str(args.size), "--slices", str(args.slices),
           "--lesions", str(args.lesions)]
    times: dict[str, float] = {}
    t = time.perf_counter()
    if not args.skip_training:
        _run(["data", "lesion-phantoms", "--out", str(out / "train"), "--boxes", str(out / "train_boxes.csv"),
              "--volumes", str(args.train_volumes), "--seed", "1000", "--lesion-seed", "1", *geo])
    _run(["data", "lesion-phantoms", "--out", str(out / "test"), "--boxes", str(out / "test_boxes.csv"),
          "--volumes", str(args.test_volumes), "--seed", str(args.test_seed), "--lesion-seed", "2", *geo])
    times["data_s"] = time.perf_counter() - t
    common = ["train", "mri", "--data", str(out / "train"), "--val-fraction", "0.25", "--epochs", str(args.epochs),
              "--batch-size", "4", "--accelerations", str(args.acceleration), "--hparam", f"chans={args.chans}",
              "--hparam", f"num_pool_layers={args.pools}", "--seed", "0", "--device", args.device, "--no-progress"]
    variants = {
        "U-Net": [],
        f"lesion-weighted U-Net (W={args.box_weight:g})": ["--boxes", str(out / "train_boxes.csv"), "--box-weight",
                                                          str(args.box_weight)],
        "FNAF-robust U-Net": ["--robust"],
    }
    models, names = [], []
    if not args.skip_training:
        for i, (name, extra) in enumerate(variants.items()):
            run_dir = out / f"model_{i}"
            t = time.perf_counter()
            if not (run_dir / "best.pt").exists():
                _run([*common, *extra, "--out", str(run_dir)])
            times[f"train_{i}_s"] = time.perf_counter() - t
            models.append(str(run_dir / "best.pt"))
            names.append(name)
    for m in args.models:
        models.append(m)
        names.append(Path(m).stem)
    t = time.perf_counter()
    _run(["lesions", "--model", *models, "--names", *names, "--data", str(out / "test"), "--boxes",
          str(out / "test_boxes.csv"), "--out", str(out / "lesions"), "--acceleration", str(args.acceleration),
          "--device", args.device, "--no-progress"])
    times["lesions_s"] = time.perf_counter() - t
    table = json.loads((out / "lesions" / "table.json").read_text())
    rows = (out / "lesions" / "lesions.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    kept: dict[str, list[float]] = {}
    for line in rows[1:]:
        r = dict(zip(header, line.split(",")))
        kept.setdefault(r["model"], []).append(float(r["kept"]))
    result = {
        "benchmark": "lesion_preservation",
        "size": args.size, "acceleration": args.acceleration, "epochs": args.epochs,
        "train_volumes": args.train_volumes, "test_volumes": args.test_volumes, "test_seed": args.test_seed,
        "slices": args.slices,
        "lesions": table["lesions"], "rule": table["rule"]["text"],
        "preserved": {m: {lab: f"{c['preserved']}/{c['total']}" for lab, c in v.items()}
                      for m, v in table["preserved"].items()},
        "mean_kept": {m: sum(v) / len(v) for m, v in kept.items()},
        **{k: round(v, 1) for k, v in times.items()},
    }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
