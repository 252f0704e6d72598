"""Markdown table of image-domain invariance runs (``blindspot invariances`` run folders), one row per run.

    python docs/make_invariance_table.py RUN_DIR [RUN_DIR …] [--seconds TIMING.txt]

Each row averages the run's ``records.csv`` over images and restarts (mean ± standard deviation): mean |x_inv − x|
(HU), mean and RMS |f(x_inv) − f(x)| (HU), the change ratio (RMS output change / RMS input change), the fidelity
``‖f(x) − f(x_inv)‖`` and ``D(x, x_inv)`` in the run's own distance (mse, (1 − SSIM)/2 or VGG, dimensionless),
iterations and how many rows converged. From ``arrays/*.npz`` (HU): mean |x_inv − x| and mean signed
x_inv − x over body pixels (``x > −500 HU``), and mean |x_inv − x| over the other (air) pixels. ``--seconds``
reads each run's wall-clock seconds from lines ``MODEL DIST … seconds=S`` (the loop in docs/invariances.md).
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
from pathlib import Path

import numpy as np

from blindspot.fileio import read_json


def _ms(values: list[float], fmt: str) -> str:
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(m, fmt)} ± {format(s, fmt)}"


def body_split(run: Path, body_hu: float = -500.0) -> tuple[list[float], list[float], list[float]]:
    """Per invariance: mean |Δ| in the body, mean signed Δ in the body, mean |Δ| in air (HU)."""
    body_abs, body_mean, air_abs = [], [], []
    for f in sorted((run / "arrays").glob("*.npz")):
        with np.load(f) as a:
            x, x_inv = a["x"], a["x_inv"].reshape(-1, *a["x"].shape)
        body = x > body_hu
        for d in x_inv - x:
            body_abs.append(float(np.abs(d[body]).mean()))
            body_mean.append(float(d[body].mean()))
            air_abs.append(float(np.abs(d[~body]).mean()))
    return body_abs, body_mean, air_abs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--seconds", type=Path, help="timing lines 'MODEL DIST … seconds=S'")
    args = parser.parse_args()
    seconds: dict[tuple[str, str], str] = {}
    if args.seconds and args.seconds.is_file():
        for line in args.seconds.read_text().splitlines():
            m = re.match(r"(\S+) (\S+) .*seconds=([0-9.]+)", line)
            if m:
                seconds[(m.group(1), m.group(2))] = f"{float(m.group(3)):.0f}"
    print("| model | D | images × restarts | mean abs(x_inv − x) (HU) | mean abs(f(x_inv) − f(x)) (HU) "
          "| RMS f change (HU) | change ratio | fidelity ‖f(x) − f(x_inv)‖ | D(x, x_inv) | iterations "
          "| converged | seconds | body mean abs Δ (HU) | body mean Δ (HU) | air mean abs Δ (HU) |")
    print("|" + " --- |" * 15)
    for run in args.runs:
        with open(run / "records.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        summary = read_json(run / "summary.json")
        col = lambda k: [float(r[k]) for r in rows]  # noqa: E731
        arch = summary.get("architecture") or summary.get("model")
        dist = rows[0]["distance_name"]
        n_img = len({r["key"] for r in rows})
        b_abs, b_mean, a_abs = body_split(run)
        print(f"| {arch} | {dist} | {n_img} × {len(rows) // n_img} | {_ms(col('mean_abs_change'), '.2f')} "
              f"| {_ms(col('output_mean_abs_change'), '.3f')} | {_ms(col('output_rms_change'), '.3f')} "
              f"| {_ms(col('change_ratio'), '.4f')} | {_ms(col('fidelity'), '.3g')} | {_ms(col('distance'), '.3g')} "
              f"| {int(max(col('iterations')))} | {sum(r['converged'] == 'True' for r in rows)}/{len(rows)} "
              f"| {seconds.get((arch, dist), '')} | {_ms(b_abs, '.1f')} | {_ms(b_mean, '.1f')} | {_ms(a_abs, '.1f')} |")


if __name__ == "__main__":
    main()
