"""Figure and measurements of a Gaussian + RI invariance run (the known-answer check of DESIGN.md §1.3).

    blindspot invariances --model gaussian-ri --size 512 --phantoms 2 --distance mse --out RUN_DIR
    python docs/make_gaussian_ri_figure.py RUN_DIR [--out docs/gaussian_ri_invariance_512.png] [--json M.json]

Reads ``RUN_DIR/arrays/*.npz`` (HU) and prints JSON per image and restart:

* ``square_ratio`` — mean |5×5 local mean of x_inv − x| over windows wholly inside the 30×30 square shrunk by
  3 px, over windows wholly outside it grown by 3 px (:func:`blindspot.attacks.invariance.square_contrast`);
* ``mean_abs_change_inside_hu`` / ``_outside_hu`` — mean |x_inv − x| (HU) over the pixels of the 30×30 square and
  over all other pixels;
* ``output_rms_change_hu`` / ``output_max_abs_change_hu`` — RMS and maximum |f(x_inv) − f(x)| (HU);
* ``outside_high_frequency_fraction`` — share of the energy of (x_inv − x) outside the square (the square grown by
  3 px is zeroed) at spatial frequencies above half Nyquist (radius > 0.25 cycles/px), where the σ = 1 px
  Gaussian's transfer is below exp(−2π²·0.25²) ≈ 0.29; ``outside_local_mean_fraction`` — RMS of its 5×5 local
  mean over its own RMS (≈ 1 for smooth changes, ≪ 1 for pixel-scale patterns).

The figure shows, for the first restart of the first image: x and x_inv (abdomen window), x_inv − x, its 5×5 local
mean and f(x_inv) − f(x) (difference window C 0, W 100), whole image and enlarged around the square.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from blindspot.attacks.invariance import square_contrast, square_mask
from blindspot.physics.ct import WINDOWS
from blindspot.report.invariance_figures import Panel, local_mean_map, panel_grid


def measure(x: torch.Tensor, x_inv: torch.Tensor, f_x: torch.Tensor, f_inv: torch.Tensor, square: int = 30,
            margin: int = 3) -> list[dict[str, float]]:
    """Per-restart measurements; ``x``, ``f_x`` ``(H, W)`` HU, ``x_inv``, ``f_inv`` ``(R, H, W)`` HU."""
    H, W = x.shape
    d = x_inv - x  # (R, H, W)
    od = f_inv - f_x
    sq = square_mask(H, W, square)
    grown = square_mask(H, W, square, inset=-margin)
    contrast = square_contrast(d, square=square, margin=margin)
    outside = d * (~grown)
    power = torch.fft.fftshift(torch.fft.fft2(outside).abs().square(), dim=(-2, -1))
    fy = torch.fft.fftshift(torch.fft.fftfreq(H))
    fx = torch.fft.fftshift(torch.fft.fftfreq(W))
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    high = (power * (radius > 0.25)).sum((-2, -1)) / power.sum((-2, -1)).clamp_min(1e-30)
    lm_out = torch.from_numpy(np.stack([local_mean_map(o.numpy()) for o in outside])) * (~grown)
    rows = []
    for r in range(d.shape[0]):
        rows.append({
            "restart": r,
            "square_inside_hu": float(contrast["inside"][r]),
            "square_outside_hu": float(contrast["outside"][r]),
            "square_ratio": float(contrast["ratio"][r]),
            "mean_abs_change_inside_hu": float(d[r][sq].abs().mean()),
            "mean_abs_change_outside_hu": float(d[r][~sq].abs().mean()),
            "max_abs_change_outside_hu": float(d[r][~grown].abs().max()),
            "output_rms_change_hu": float(od[r].square().mean().sqrt()),
            "output_max_abs_change_hu": float(od[r].abs().max()),
            "outside_high_frequency_fraction": float(high[r]),
            "outside_local_mean_fraction": float(lm_out[r].square().mean().sqrt()
                                                 / outside[r].square().mean().sqrt().clamp_min(1e-30)),
        })
    return rows


def figure(x: np.ndarray, x_inv: np.ndarray, f_x: np.ndarray, f_inv: np.ndarray, path: Path, title: str,
           square: int = 30) -> Path:
    """Two rows of five panels: whole image, then a 3·square box around the centre."""
    H, W = x.shape
    side = 3 * square
    t, l = (H - side) // 2, (W - side) // 2
    box = (slice(t, t + side), slice(l, l + side))
    d, od = x_inv - x, f_inv - f_x
    lm = local_mean_map(d)
    ab, df = WINDOWS["abdomen"], WINDOWS["difference"]

    def row(s: tuple[slice, slice], tag: str) -> list[Panel]:
        return [
            Panel(x[s], ab.lower, ab.upper, f"x{tag}\n{ab}"),
            Panel(x_inv[s], ab.lower, ab.upper, f"x_inv{tag}\n{ab}"),
            Panel(d[s], df.lower, df.upper, f"x_inv − x{tag}\n{df}", cmap="RdBu_r", colorbar=True),
            Panel(lm[s], df.lower, df.upper, f"5×5 local mean{tag}", cmap="RdBu_r", colorbar=True),
            Panel(od[s], df.lower, df.upper, f"f(x_inv) − f(x){tag}", cmap="RdBu_r", colorbar=True),
        ]

    where = f"bottom row: central {side}×{side} px (rows {t}–{t + side - 1}, cols {l}–{l + side - 1})"
    out = panel_grid([row((slice(None), slice(None)), ""), row(box, ", zoom")], path, f"{title}\n{where}", size=2.4)
    _palette(out)
    return out


def _palette(path: Path) -> None:
    """Re-save the PNG with a 256-colour palette (the noisy difference panels make a full-colour PNG large)."""
    import io

    from PIL import Image

    from blindspot.fileio import atomic_write_bytes

    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").quantize(256).save(buf, format="PNG", optimize=True)
    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("gaussian_ri_invariance_512.png"))
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    results = {}
    files = sorted((args.run_dir / "arrays").glob("*.npz"))
    for i, f in enumerate(files):
        with np.load(f) as a:
            x, xi, fx, fi = (torch.from_numpy(a[k].astype(np.float32)) for k in ("x", "x_inv", "f_x", "f_x_inv"))
        xi, fi = xi.reshape(-1, *x.shape), fi.reshape(-1, *x.shape)
        results[f.stem] = measure(x, xi, fx, fi)
        if i == 0:
            figure(x.numpy(), xi[0].numpy(), fx.numpy(), fi[0].numpy(), args.out,
                   f"Gaussian + RI invariance, {f.stem} (restart 0)")
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
