"""FNAF attack throughput with 1 and 2 (or more) processes under ``torchrun`` on the same total work; prints JSON.

Each job is ``python -m torch.distributed.run --nproc_per_node N benchmarks/attack_scaling.py --worker …``: every
process builds the same U-Net (seeded; random weights: speed only) and phantom data set, then — timed between two
barriers — runs :func:`blindspot.runs.fnaf.run_fnaf` over all the images (each rank attacks its share of the
batches, rank 0 merges the records and writes the summary). Images per second = images / that time; ``ratio`` is the
images per second of the largest process count over that of one process (ideal: the process count). Start-up and
imports are not timed. On CPU every process gets ``--threads`` threads (default 1: on a 2-core machine, 2 processes
use both cores); on GPUs each process uses its own GPU (``LOCAL_RANK``).

    python benchmarks/attack_scaling.py                                  # 1 and 2 processes, CPU
    python benchmarks/attack_scaling.py --device cuda --procs 1 2 4 --images 256 --size 320 --chans 32
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "ATTACK_SCALING_RESULT "


def worker(args: argparse.Namespace) -> None:
    import torch

    from blindspot.models.registry import build_model
    from blindspot.runs.fnaf import FnafConfig, mri_settings, run_fnaf
    from blindspot.runs.ranks import join, leave
    from blindspot.training.distributed import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    ranks = join(device)
    torch.manual_seed(0)
    model = build_model("unet", chans=args.chans, num_pool_layers=args.pools).to(ranks.device).eval()
    settings = mri_settings(None, [4.0], volumes=args.images // args.slices, slices=args.slices, seed=3,
                            shape=(args.size, args.size), recon_size=(args.size, args.size))
    config = FnafConfig(searches=("rs",), candidates=args.candidates, batch_size=args.batch_size,
                        chunk_size=args.batch_size * args.candidates, figures=False, progress=False)
    ranks.barrier()
    t0 = time.perf_counter()
    run_fnaf(model, settings, config, args.out, name="unet")
    ranks.barrier()
    seconds = time.perf_counter() - t0
    if ranks.is_main:
        images = len(settings[0].dataset)
        print(MARK + json.dumps({"processes": ranks.world_size, "images": images, "seconds": seconds,
                                 "images_per_s": images / seconds, "device": str(ranks.device)}), flush=True)
    leave(ranks)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2], help="process counts to compare")
    p.add_argument("--images", type=int, default=16, help="images attacked (the same total work for every count)")
    p.add_argument("--slices", type=int, default=2, help="phantom slices per volume")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--chans", type=int, default=16, help="U-Net channels")
    p.add_argument("--pools", type=int, default=3)
    p.add_argument("--candidates", type=int, default=11)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MPLBACKEND": "Agg"}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.procs:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
                   "127.0.0.1", "--master_port", str(_port()), str(Path(__file__).resolve()), "--worker",
                   "--out", str(Path(tmp) / f"run{n}"),
                   *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k not in ("procs", "worker", "out"))]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            runs.append(json.loads(lines[-1][len(MARK):]))
            print(f"# {n} process(es): {runs[-1]['images_per_s']:.2f} images/s", file=sys.stderr)
    base = runs[0]["images_per_s"]
    result = {
        "benchmark": "attack_scaling",
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "runs": runs,
        "ratio": runs[-1]["images_per_s"] / base,
        "ratios": {str(r["processes"]): r["images_per_s"] / base for r in runs},
        "ideal_ratio": runs[-1]["processes"] / runs[0]["processes"],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
