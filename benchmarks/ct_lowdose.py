"""Speed and memory of the CT low-dose simulation: blindspot's projector against scikit-image and a baseline version.

Prints one JSON object. For each image size (phantom abdomen/chest slices, ``ceil(π/2·N)`` views), side by side in
one run, each part in its own child process (so that its peak memory is its own):

* ``skimage``: ``iradon`` (NumPy, single-threaded, ``circle=False``, one image) and, with ``--radon``, ``radon``;
* ``current``: this checkout's :class:`~blindspot.physics.ct.ParallelBeamProjector` — projection and FBP per image
  at batch 1 and ``--batch``, and the three-dose simulation (one projection, nested Poisson noise, FBP at doses 1,
  0.25, 0.10) per slice at ``--batch``; the attacks' clean CT measurement (:meth:`LowDoseCTScan.measure
  <blindspot.physics.acquisition.LowDoseCTScan.measure>`: the 25 % dose image and its noise realisation, one batched
  FBP of the noisy and the noise-free sinograms) against the earlier two separate FBPs
  (``ct_measure_speedup_vs_two_fbps``); plus the noise standard deviation of an abdomen slice at each dose;
* ``baseline``: the same for ``src/blindspot/physics/ct.py`` at git revision ``--baseline`` (default: the
  index_add/gather projector this benchmark was written to replace), loaded from ``git show`` into a temporary
  module;
* ``cuda``: the current version on the GPU when there is one;
* with ``--feature-noise``, :func:`feature_noise_check`: how far the CT FNAF attack's kept-noise approximation is
  from simulating each candidate's own Poisson noise (measured against the analytic bound).

Times are seconds (best of ``--repeats``). Memory: ``working_mb`` is, for each step, the peak memory one call
holds above what was held before it (see :func:`_working_mb`); ``peak_rss_mb`` the child's peak resident memory
(which also counts what the allocator kept after frees). The ratios (``fbp_speedup_vs_iradon`` …) compare
per-image times.

    python benchmarks/ct_lowdose.py --sizes 512 --batch 4 --threads 2
    python benchmarks/ct_lowdose.py --sizes 512 --baseline HEAD --feature-noise   # against the last commit
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

#: The last revision of ``physics/ct.py`` with the index_add projector and gather back-projector.
DEFAULT_BASELINE = "56d6785"
DOSES = (1.0, 0.25, 0.10)


def _best_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _working_mb(fn: Callable[[], Any], cuda: bool) -> float | None:
    """Peak memory (MiB) that one call of ``fn`` holds above what was held before it.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the resident size sampled every millisecond while ``fn`` runs,
    with glibc told to give large blocks back to the system as soon as they are freed (otherwise freed memory
    stays resident and the figure would show the allocator's history rather than ``fn``'s needs); ``None`` where
    that cannot be arranged.
    """
    import threading

    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks ≥ 1 MiB are mapped, and unmapped when freed
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return None
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            done.wait(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_mb()) - before


def _phantoms(size: int, batch: int):
    import torch

    from blindspot.data.ct_phantom import PhantomPatient

    hu = torch.stack([PhantomPatient(("abdomen", "chest")[i % 2], i).render(0.5, size=size) for i in range(batch)])
    return hu.unsqueeze(1)  # (B, 1, N, N) HU


def _load_ct(part: str, baseline: str):
    """The ``ct`` module to measure: this checkout's, or the file at git revision ``baseline``."""
    if part != "baseline":
        from blindspot.physics import ct

        return ct
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "-C", str(root), "show", f"{baseline}:src/blindspot/physics/ct.py"],
                            check=True, capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="ct_baseline_"))
    path = folder / "ct_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ct_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ct_baseline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_part(part: str, size: int, batch: int, repeats: int, threads: int, baseline: str, radon: bool) -> dict:
    """One child process's measurements (see the module docs)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from blindspot.data.ct_phantom import FOV_MM

    hu = _phantoms(size, batch)
    out: dict[str, Any] = {"part": part, "threads": torch.get_num_threads()}
    if part == "skimage":
        from skimage.transform import iradon
        from skimage.transform import radon as sk_radon

        ct = _load_ct("current", baseline)
        lct = ct.LowDoseCT((size, size), FOV_MM / size)
        n_angles = lct.projector.n_angles
        theta = np.arange(n_angles) * 180.0 / n_angles
        sino = lct.line_integrals(hu[:1])[0, 0].double().numpy().T  # (n_det, angles), scikit-image's layout
        def fbp() -> Any:
            return iradon(sino, theta, circle=False, preserve_range=True, output_size=size, filter_name="shepp-logan")

        out["iradon_s"] = _best_time(fbp, repeats)
        if radon:
            img = hu[0, 0].double().numpy()
            out["radon_s"] = _best_time(lambda: sk_radon(img, theta, circle=False, preserve_range=True), repeats)
        out["peak_rss_mb"] = _peak_rss_mb()
        out["working_mb"] = {"iradon": _working_mb(fbp, False)}
        return out

    ct = _load_ct(part, baseline)
    device = "cuda" if part == "cuda" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    hu = hu.to(device)
    lct = ct.LowDoseCT((size, size), FOV_MM / size)
    proj = lct.projector
    mu = (hu.clamp_min(-1000.0) / 1000.0 + 1.0) * lct.mu_water * lct.pixel_size_mm  # attenuation per pixel
    sino = proj.project(mu)
    generator = torch.Generator(device=device).manual_seed(0)
    lct.simulate(hu[:1], DOSES, generator)  # warm-up (lazy caches, CUDA kernels)
    sync()
    steps: dict[str, Callable[[], Any]] = {}
    for b in sorted({1, batch}):
        steps[f"project_b{b}"] = lambda b=b: proj.project(mu[:b])
        steps[f"fbp_b{b}"] = lambda b=b: proj.fbp(sino[:b])
    steps[f"simulate_3_doses_b{batch}"] = lambda: lct.simulate(hu, DOSES, generator)
    if part != "baseline":
        from blindspot.physics.acquisition import LowDoseCTScan

        scan = LowDoseCTScan(lct, 0.25, ct.HUNormalization(0.0, 500.0))

        def two_fbps() -> Any:  # what LowDoseCTScan.measure did before: the low dose, then the noise-free FBP
            with torch.no_grad():
                p = lct.line_integrals(hu)
                return lct.simulate(hu, (0.25,), generator, line_integrals=p)[0.25] - lct.reconstruct(p)

        steps[f"ct_measure_two_fbps_b{batch}"] = two_fbps
        steps[f"ct_measure_b{batch}"] = lambda: scan.measure(hu, generator)
    for name, fn in steps.items():
        per = batch if name.endswith(f"_b{batch}") else 1
        out[f"{name}_s_per_{'image' if name.startswith(('project', 'fbp')) else 'slice'}"] = \
            _best_time(fn, repeats, sync) / per
    out["peak_rss_mb"] = _peak_rss_mb() if device == "cpu" else None
    # after the timing (it changes how the allocator works); the smaller of two calls: the first may still fill
    # the allocator's pools
    working: dict[str, float | None] = {}
    for name, fn in steps.items():
        calls = [_working_mb(fn, device == "cuda") for _ in range(2)]
        working[name] = None if None in calls else min(calls)
    out["working_mb"] = working
    if hasattr(proj, "cache_nbytes"):
        out["projector_cache_mb"] = proj.cache_nbytes / 2**20
    if part == "current":
        # physics check on the first (abdomen) slice: noise std in the body against the noise-free FBP
        ref = lct.noise_free(hu[:1])
        body = (hu[:1] > -900) & (ref > -900)
        sims = lct.simulate(hu[:1], DOSES, torch.Generator(device=device).manual_seed(1))
        std = {f"{d:g}": float(ct.noise_std(v, ref, body)[0]) for d, v in sims.items()}
        out["noise_std_hu"] = std
        out["noise_ratio_25_vs_100"] = std["0.25"] / std["1"]
    return out


def feature_noise_check(size: int = 128, seeds: int = 64, radius: int = 6, dose: float = 0.25) -> dict:
    """What the CT FNAF attack approximates: it keeps the clean image's noise realisation when it adds a feature
    (``measure(y) + FBP(P(δ))``), while a scan of ``y + δ`` would have Poisson noise at the counts ``y + δ``
    transmits. A feature adding ``Δp`` to a ray's line integral multiplies that ray's log-count variance by
    ``exp(Δp)`` (fewer photons), so every pixel's noise variance grows by a factor between 1 and ``exp(Δp_max)``
    (``Δp_max``: the feature's largest line integral): its standard deviation by at most ``exp(Δp_max / 2)``.

    Measured here on an abdomen phantom slice with a disc feature of ``radius`` pixels: the noise standard deviation
    inside the disc with the feature simulated (``simulate(y + δ) − FBP(P(y + δ))``) over the clean one, pooled over
    ``seeds`` noise realisations, at the attack's largest intensity (100 HU) and at 1000 HU (where the effect is
    large enough to see above the sampling error), each against the bound."""
    import torch

    from blindspot.data.ct_phantom import FOV_MM, PhantomPatient
    from blindspot.physics.ct import LowDoseCT

    ct = LowDoseCT((size, size), FOV_MM / size)
    hu = PhantomPatient("abdomen", 0).render(0.5, size=size)[None, None]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size // 2) ** 2 + (xx - size // 2 - size // 8) ** 2 <= radius**2)[None, None]
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(seeds)]  # noqa: E731
    batch = hu.expand(seeds, 1, size, size).contiguous()
    clean = ct.simulate(batch, (dose,), gens(), noise_free=True)
    clean_std = float((clean[dose] - clean[0.0])[disc.expand_as(batch)].std())
    out: dict[str, Any] = {"size": size, "seeds": seeds, "radius_px": radius, "dose": dose,
                           "clean_noise_std_hu": clean_std}
    for delta_hu in (100.0, 1000.0):
        with_feature = batch + delta_hu * disc
        sims = ct.simulate(with_feature, (dose,), gens(), noise_free=True)
        std = float((sims[dose] - sims[0.0])[disc.expand_as(batch)].std())
        dp_max = delta_hu / 1000.0 * ct.mu_water * 2 * radius * ct.pixel_size_mm
        out[f"{delta_hu:g}_hu"] = {"noise_std_hu": std, "std_ratio": std / clean_std,
                                   "bound_std_ratio": math.exp(dp_max / 2.0), "dp_max": dp_max}
    return out


def _child(part: str, size: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--sizes", str(size),
           "--batch", str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--baseline", args.baseline] + (["--radon"] if args.radon else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"part": part, "error": lines[-1] if lines else f"exit code {done.returncode}"}
    return json.loads(done.stdout)


def bench_size(size: int, args: argparse.Namespace, cuda: bool) -> dict:
    from blindspot.physics.ct import ParallelBeamProjector

    proj = ParallelBeamProjector((size, size))
    out: dict[str, Any] = {"size": size, "n_angles": proj.n_angles, "n_det": proj.n_det, "batch": args.batch}
    parts = ["skimage", "current"] + ([] if args.baseline == "none" else ["baseline"]) + (["cuda"] if cuda else [])
    for part in parts:
        out[part] = _child(part, size, args)
    cur, sk, base = out["current"], out["skimage"], out.get("baseline", {})
    b = args.batch
    if "iradon_s" in sk and "error" not in cur:
        out["fbp_speedup_vs_iradon"] = sk["iradon_s"] / cur[f"fbp_b{b}_s_per_image"]
        out["fbp_b1_speedup_vs_iradon"] = sk["iradon_s"] / cur["fbp_b1_s_per_image"]
    if "radon_s" in sk and "error" not in cur:
        out["project_speedup_vs_radon"] = sk["radon_s"] / cur[f"project_b{b}_s_per_image"]
    if f"ct_measure_b{b}_s_per_slice" in cur:
        out["ct_measure_speedup_vs_two_fbps"] = (cur[f"ct_measure_two_fbps_b{b}_s_per_slice"]
                                                 / cur[f"ct_measure_b{b}_s_per_slice"])
    if base and "error" not in base and "error" not in cur:
        for key in (f"project_b{b}_s_per_image", f"fbp_b{b}_s_per_image", f"simulate_3_doses_b{b}_s_per_slice"):
            out[f"speedup_vs_baseline_{key.split('_s_per')[0]}"] = base[key] / cur[key]
    return out


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help="git revision of physics/ct.py to compare against ('none' to skip)")
    parser.add_argument("--radon", action="store_true", help="also time scikit-image's radon (slow at 512)")
    parser.add_argument("--feature-noise", action="store_true",
                        help="also measure the CT FNAF attack's kept-noise approximation (feature_noise_check)")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args.part, args.sizes[0], args.batch, args.repeats, args.threads, args.baseline,
                                  args.radon)))
        return
    cuda = torch.cuda.is_available()
    result = {
        "benchmark": "ct_lowdose",
        "torch": torch.__version__,
        "threads": args.threads,
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
        "baseline": args.baseline,
        "note": "seconds per image or slice (best of repeats); skimage is single-threaded NumPy; each part runs "
                "in its own process, one after the other",
        "sizes": [bench_size(s, args, cuda) for s in args.sizes],
    }
    if args.feature_noise:
        result["feature_noise"] = feature_noise_check()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
