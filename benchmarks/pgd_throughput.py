"""PGD throughput of the ℓ2 worst-case measurement attack against the bare network's forward + backward; prints JSON.

For each image size: the PGD iterations per second of :class:`blindspot.attacks.measurement.WorstCasePGD` (one
iteration = one (image, budget) item moved one step: acquisition perturbation → normalisation → network forward and
backward → projection), the bare network's forward + backward passes per second on a batch of the same shape
(normalised inputs that require grad, the same chunks), and their ratio (target ≥ 0.9: the attack costs what the
network costs; from median times, and ``ratio_best`` from the fastest repeat of each, the steadier figure on a
shared machine). ``ratio_all_passes`` also counts the forward-only pass each item spends after its steps (evaluating
the last iterate), which the iteration count leaves out. Random draws are off here
(they are forward passes, see ``fnaf_throughput.py`` for forward-only throughput).

    python benchmarks/pgd_throughput.py                          # bundled U-Net at 64x64
    python benchmarks/pgd_throughput.py --model irim --sizes 64 --images 4
    python benchmarks/pgd_throughput.py --sizes 64 320 --images 4 --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys

import torch

from timing import interleaved_times


def run_size(model, size: int, images: int, budgets: tuple[float, ...], steps: int, chunk: int, device, repeats: int,
             warmup: int) -> dict:
    from blindspot.attacks.measurement import WorstCasePGD, prepare_measurements
    from blindspot.models.adapters import eval_mode
    from blindspot.runs.fnaf import mri_settings

    (setting,) = mri_settings(None, [4.0], crop=(size, size), volumes=1, slices=images, seed=100,
                              shape=(size, size), recon_size=(size, size))
    batch = setting.materialised(images).batch_list[0]
    net = model.network
    attack = WorstCasePGD(budgets=budgets, steps=steps, random_draws=0, chunk_size=chunk)
    with eval_mode(net.module):
        with torch.no_grad():
            ctx = prepare_measurements(net, batch, setting.physics)
        items = len(ctx) * len(budgets)
        idx = torch.arange(len(ctx), device=ctx.device).repeat_interleave(len(budgets))
        acq, meas = ctx.acquisition.select(idx), ctx.measurement.select(idx)
        x, stats = acq.network_input(meas)

        def bare() -> None:  # the network's forward + backward on the attack's chunks, ``steps`` times
            for _ in range(steps):
                for s in range(0, items, chunk):
                    sl = slice(s, s + chunk)
                    xi = x[sl].detach().requires_grad_(True)
                    out = net(acq.select(torch.arange(sl.start, min(items, sl.stop), device=x.device)),
                              meas.select(torch.arange(sl.start, min(items, sl.stop), device=x.device)), xi,
                              stats.index(sl))
                    torch.autograd.grad(out.square().sum(), xi)

        def pgd() -> None:
            attack.run(net, ctx)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = interleaved_times({"bare": bare, "pgd": pgd}, device, repeats, warmup)
    t = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    bare_its = steps * items / t["bare"]
    pgd_its = steps * items / t["pgd"]
    fwd_bwd_equiv = steps * items + items / 3.0  # a forward pass costs about a third of forward + backward
    row = {"size": size, "images": images, "budgets": list(budgets), "steps": steps, "items": items,
           "bare_fwd_bwd_per_s": bare_its, "pgd_iterations_per_s": pgd_its, "ratio": pgd_its / bare_its,
           "ratio_all_passes": fwd_bwd_equiv / t["pgd"] / bare_its, "ratio_best": best["bare"] / best["pgd"],
           "bare_s": t["bare"], "pgd_s": t["pgd"], "bare_best_s": best["bare"], "pgd_best_s": best["pgd"]}
    if device.type == "cuda":
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="unet", help="bundled network or checkpoint (default unet)")
    p.add_argument("--sizes", nargs="+", type=int, default=[64])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.01, 0.03])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from blindspot.models.loading import load_model

    device = torch.device(args.device)
    model = load_model(args.model, device, warn=False)
    rows = [run_size(model, s, args.images, tuple(args.budgets), args.steps, args.chunk_size, device, args.repeats,
                     args.warmup) for s in args.sizes]
    out = {"benchmark": "pgd_throughput", "model": args.model, "device": str(device), "threads": args.threads,
           "torch": torch.__version__, "rows": rows,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
