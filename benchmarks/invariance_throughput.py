"""Invariance-optimisation throughput against the bare network's forward + backward on the same batch; prints JSON.

For each distance: Adam iterations per second of :class:`blindspot.attacks.invariance.InvarianceAttack` on a batch of
``images × restarts`` inputs, the bare model's forward + backward (gradient with respect to the input, weights
frozen, as the attack needs) per second on the same batch, their ratio, and peak memory. A CT model is attacked on
its normalised low-dose input (:class:`~blindspot.attacks.invariance.DenoiserTarget`); an MRI model (``unet``,
``irim``, ``zero-filled``) on the true image through its acquisition (:class:`~blindspot.attacks.invariance.MRITarget`:
4x random masks, FFTs and the normalisation in every iteration), against its bare pass on the normalised
zero-filled input.

    python benchmarks/invariance_throughput.py            # CNN-10, 2 images × 2 restarts, 512×512 (128×128 on a CPU)
    python benchmarks/invariance_throughput.py --model wganvgg --size 256 --distances mse ssim vgg
    python benchmarks/invariance_throughput.py --model gaussian-ri --size 512
    python benchmarks/invariance_throughput.py --model unet --size 320

The attack's per-iteration cost is measured as the difference between runs of ``2n`` and ``n`` iterations (early
stopping off), so its fixed costs (start noise, the clean and final forward passes) do not count against it. The
``vgg`` distance times a seeded random VGG16 (the weights do not change the cost). Ratios near 1 mean the
optimisation costs what the network costs; the rest is the distance, the fidelity term and Adam's update.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from timing import peak_mb, reset_peak, sync

from blindspot.attacks.distances import build_distance
from blindspot.attacks.invariance import DenoiserTarget, InvarianceAttack, InvarianceConfig, MRITarget
from blindspot.data.ct_phantom import ct_phantom_batch
from blindspot.models.adapters import network_convention, reconstruct
from blindspot.models.registry import build_model, model_modality
from blindspot.models.vgg import write_seeded_vgg16
from blindspot.physics.mri import create_mask_func


def _ct_batch(n: int, size: int, device: torch.device) -> torch.Tensor:
    """Normalised low-dose-like phantom slices ``(n, 1, size, size)`` (noise added in the image domain for speed)."""
    kinds = [("chest", "abdomen")[i % 2] for i in range(n)]
    hu = ct_phantom_batch(kinds, list(range(n)), [0.5] * n, size=size)
    hu = hu + 40.0 * torch.randn(hu.shape, generator=torch.Generator().manual_seed(0))
    return ((hu - hu.mean()) / hu.std()).to(device)


def _workload(model: torch.nn.Module, modality: str, n: int, size: int, restarts: int, device: torch.device):
    """``(target, x, bare, bare_x)``: the attack's target and start images ``(n, 1, s, s)``, and the bare model's call
    and input on the same ``(n·restarts, 1, s, s)`` batch."""
    x = _ct_batch(n, size, device)
    if modality == "ct":
        return DenoiserTarget(model), x, model, x.repeat_interleave(restarts, 0)
    if network_convention(model) == "kspace":
        raise SystemExit("a k-space network has no image-domain bare pass to compare with")
    masks = torch.stack([create_mask_func("random", [4])(size, seed=i).mask.reshape(1, 1, size) for i in range(n)])
    target = MRITarget(model, (x - x.min()).detach(), masks.to(device))
    zero_filled = target.zero_filled(target.x, torch.arange(n, device=device)).detach()
    mask_rep = target.mask.repeat_interleave(restarts, 0)
    return target, target.x, lambda t: reconstruct(model, t, mask_rep), zero_filled.repeat_interleave(restarts, 0)


def bench(args: argparse.Namespace) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.size is None:
        args.size = 512 if device.type == "cuda" else 128
    torch.manual_seed(0)
    model = build_model(args.model).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    modality = model_modality(args.model) or "ct"
    rows = args.images * args.restarts
    target, x, bare_call, x_rep = _workload(model, modality, args.images, args.size, args.restarts, device)

    # bare model: forward + backward to the input on the same (images × restarts) batch
    def bare_step() -> None:
        xi = x_rep.detach().clone().requires_grad_(True)
        bare_call(xi).sum().backward()
    def bare(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            bare_step()
        sync(device)
        return time.perf_counter() - t0

    bare(args.warmup)
    reset_peak(device)
    bare(1)
    bare_peak = peak_mb(device)

    results = {}
    tmp = tempfile.TemporaryDirectory()
    for name in args.distances:
        if name == "vgg":
            dist = build_distance("vgg", vgg_weights=write_seeded_vgg16(os.path.join(tmp.name, "vgg16.pth")),
                                  device=device)
        else:
            dist = build_distance(name, device=device)

        def run(n: int) -> float:
            cfg = InvarianceConfig(alpha=0.01, iterations=n, restarts=args.restarts, min_iterations=10**9,
                                   progress=False)
            attack = InvarianceAttack(dist, config=cfg)
            sync(device)
            t0 = time.perf_counter()
            attack(target, x)
            sync(device)
            return time.perf_counter() - t0

        run(args.warmup)
        reset_peak(device)
        attack_s, bare_s, ratios = [], [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            b = bare(args.iterations) / args.iterations
            t_n = run(args.iterations)
            t_2n = run(2 * args.iterations)
            if t_2n <= t_n:  # a load spike on a shared machine: this sample says nothing
                continue
            a = (t_2n - t_n) / args.iterations
            attack_s.append(a)
            bare_s.append(b)
            ratios.append(b / a)
        if not ratios:
            raise SystemExit("timing failed: every sample was disturbed; run again on a quieter machine")
        results[name] = {
            "iterations_per_s": 1.0 / statistics.median(attack_s),
            "bare_forward_backward_per_s": 1.0 / statistics.median(bare_s),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "peak_memory_mb": peak_mb(device),
        }
    tmp.cleanup()
    return {
        "benchmark": "invariance_throughput",
        "model": args.model,
        "modality": modality,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "images": args.images,
        "restarts": args.restarts,
        "batch_rows": rows,
        "size": args.size,
        "iterations_timed": args.iterations,
        "bare_peak_memory_mb": bare_peak,
        "peak_memory_unit": "CUDA max allocated" if device.type == "cuda" else "process peak RSS",
        "distances": results,
        "min_ratio": min(r["ratio"] for r in results.values()),
        "target_ratio": 0.9,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn10", help="registered CT or MRI model (weights do not change the cost)")
    p.add_argument("--size", type=int, help="image side (default 512 on a GPU, 128 on a CPU)")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5, help="iterations per timed run (the attack runs n and 2n)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--distances", nargs="+", default=["mse", "ssim"], choices=["mse", "ssim", "vgg"])
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    print(json.dumps(bench(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
