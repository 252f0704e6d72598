"""Speed of the CT low-dose simulation: scikit-image's radon/iradon against blindspot's torch projectors.

Prints one JSON object: for each image size, seconds per image for

* ``skimage_radon`` / ``skimage_iradon`` (NumPy, one image at a time, ``circle=False``),
* ``torch_project_pixel`` (distance-driven pixel projector, the default), ``torch_project_ray`` (ray-driven, equal
  to skimage's radon), ``torch_fbp`` (ramp-filtered back-projection), at batch sizes 1 and ``--batch``,
* ``simulate_3_doses`` (one projection + Poisson noise + FBP at doses 1, 0.25, 0.10),

on CPU with ``--threads`` torch threads (and on CUDA when available), plus the noise standard deviation (HU) of a
phantom abdomen slice at each dose and the ratio 25 % / 100 % (physics: 2).

    python benchmarks/ct_lowdose.py --sizes 256 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch


def _time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_size(size: int, batch: int, repeats: int, device: str) -> dict:
    from skimage.transform import iradon, radon

    from blindspot.data.ct_phantom import FOV_MM, PhantomPatient
    from blindspot.physics.ct import LowDoseCT, ParallelBeamProjector, noise_std

    hu = torch.stack([PhantomPatient(("abdomen", "chest")[i % 2], i).render(0.5, size=size) for i in range(batch)])
    hu = hu.unsqueeze(1)
    ct = LowDoseCT((size, size), FOV_MM / size)
    n_angles = ct.projector.n_angles
    mu = (hu.clamp_min(-1000) / 1000 + 1) * 0.0192 * (FOV_MM / size)
    out: dict = {"size": size, "n_angles": n_angles, "n_det": ct.projector.n_det, "batch": batch}
    img = mu[0, 0].double().numpy()
    theta = np.arange(n_angles) * 180.0 / n_angles
    sino = radon(img, theta, circle=False, preserve_range=True)
    out["skimage_radon_s"] = _time(lambda: radon(img, theta, circle=False, preserve_range=True), repeats)
    out["skimage_iradon_s"] = _time(
        lambda: iradon(sino, theta, circle=False, preserve_range=True, output_size=size), repeats)
    cpu: dict = {}
    for method in ("pixel", "ray"):
        proj = ParallelBeamProjector((size, size), n_angles, method=method)
        for b in sorted({1, batch}):
            cpu[f"torch_project_{method}_b{b}_s_per_image"] = _time(lambda: proj.project(mu[:b]), repeats) / b
    proj = ParallelBeamProjector((size, size), n_angles)
    s = proj.project(mu)
    for b in sorted({1, batch}):
        cpu[f"torch_fbp_b{b}_s_per_image"] = _time(lambda: proj.fbp(s[:b]), repeats) / b
    g = torch.Generator().manual_seed(0)
    cpu[f"simulate_3_doses_b{batch}_s_per_image"] = _time(lambda: ct.simulate(hu, (1.0, 0.25, 0.1), g), repeats) / batch
    out["cpu"] = cpu
    out["speedup_pixel_vs_skimage_radon"] = out["skimage_radon_s"] / cpu[f"torch_project_pixel_b{batch}_s_per_image"]
    out["speedup_fbp_vs_skimage_iradon"] = out["skimage_iradon_s"] / cpu[f"torch_fbp_b{batch}_s_per_image"]
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu: dict = {}
        hu_d, mu_d = hu.to(device), mu.to(device)
        ct_d = LowDoseCT((size, size), FOV_MM / size)
        gd = torch.Generator(device=device).manual_seed(0)
        ct_d.simulate(hu_d, (1.0,), gd)  # warm-up
        for method in ("pixel", "ray"):
            proj = ParallelBeamProjector((size, size), n_angles, method=method)
            proj.project(mu_d)
            gpu[f"torch_project_{method}_b{batch}_s_per_image"] = _time(lambda: proj.project(mu_d), repeats) / batch
        s_d = proj.project(mu_d)
        gpu[f"torch_fbp_b{batch}_s_per_image"] = _time(lambda: proj.fbp(s_d), repeats) / batch
        gpu[f"simulate_3_doses_b{batch}_s_per_image"] = _time(
            lambda: ct_d.simulate(hu_d, (1.0, 0.25, 0.1), gd), repeats) / batch
        out["cuda"] = gpu
    # physics check on the first (abdomen) slice: noise std in the body against the noise-free FBP
    ref = ct.noise_free(hu[:1])
    body = (hu[:1] > -900) & (ref > -900)
    sims = ct.simulate(hu[:1], (1.0, 0.25, 0.1), torch.Generator().manual_seed(1))
    std = {f"{d:g}": float(noise_std(v, ref, body)[0]) for d, v in sims.items()}
    out["noise_std_hu"] = std
    out["noise_ratio_25_vs_100"] = std["0.25"] / std["1"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "benchmark": "ct_lowdose",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "note": "seconds per image (best of repeats); skimage is single-threaded NumPy",
        "sizes": [bench_size(s, args.batch, args.repeats, args.device) for s in args.sizes],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
