"""Speed of the synthetic knee phantom generator on one CPU thread (or a GPU); prints JSON.

For each case: wall time to render ``slices`` slices (median of ``--repeats``), slices per second, the time of the
extra steps a data set needs (k-space ``F``, the cropped reconstruction), and the process's peak resident memory.

    python benchmarks/knee_phantom_speed.py                     # 200 slices at 640x368 and 320x320, 1 thread,
                                                                # and one 35-slice 8-coil volume at 640x368
    python benchmarks/knee_phantom_speed.py --slices 35 --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

from timing import sync


def _median_time(fn, device: torch.device, repeats: int) -> tuple[float, float, object]:
    """Median wall time and median process CPU time (seconds) of ``fn()``, and its last result.

    CPU time is what the run costs when the machine is shared with other work; on one thread and an idle machine
    the two agree."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        out = None  # release the previous result before making the next
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--coils", type=int, default=8, help="coils of the multi-coil case (0 skips it)")
    parser.add_argument("--multicoil-slices", type=int, default=35, help="slices of the multi-coil case (one volume)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from blindspot.data.knee_phantom import generate_knee_volume, reconstruction_from_kspace

    generate_knee_volume(0, 2, (64, 64), device=device)  # warm-up (allocator, FFT plans)
    cases = [("singlecoil", (640, 368), None, args.slices), ("singlecoil", (320, 320), None, args.slices)]
    if args.coils > 0:
        cases.append(("multicoil", (640, 368), args.coils, args.multicoil_slices))
    results = []
    for name, shape, coils, slices in cases:
        seconds, cpu_seconds, vol = _median_time(
            lambda: generate_knee_volume(1, slices, shape, (320, 320), device=device, num_coils=coils),
            device, args.repeats,
        )
        post, _, _ = _median_time(lambda v=vol: reconstruction_from_kspace(v.kspace(), v.recon_size), device, 1)
        results.append({
            "case": name, "shape": list(shape), "coils": coils or 1, "slices": slices,
            "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
            "slices_per_second": round(slices / seconds, 1),
            "ms_per_slice": round(1000 * seconds / slices, 2),
            "kspace_and_reconstruction_seconds": round(post, 3),
        })
        del vol
    print(json.dumps({
        "benchmark": "knee_phantom_speed", "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_average_1min": round(os.getloadavg()[0], 2), "results": results,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
