"""Throughput of FNAF-robust training relative to standard training (same model, batch and optimiser).

Times optimisation steps (forward, loss, backward, Adam step) on knee phantoms for the usual L1 loss and for the
FNAF-robust loss with each example search (``draw``: one random feature; ``rs``: worst of k; ``grad``: worst of k then
gradient steps; ``rs-alternate``: the seed's mixing, a clean step then an ``rs`` feature step), and prints JSON:
slices per second, and the step time relative to a standard step (issue 18's targets: one-feature ``draw`` ≤ 1.15×,
worst-of-4 ``rs`` ≤ 1.6×). The settings' steps are interleaved (mean step time), so that a shared CPU's
changing load affects every setting alike. Run it at one thread (``OMP_NUM_THREADS=1``) on a CPU.

``rs`` needs, beyond a standard step, the forward passes that score its candidates (``candidates`` per chosen image,
without gradients); ``rs_floor`` times exactly those passes (the same number of rows through the network, no
features, no loss) in the same rounds, and ``rs_floor_vs_standard`` = 1 + their time / a standard step's is the
least the recipe can cost on this machine; ``rs_overhead_vs_standard`` is what ``rs`` costs beyond it.

    python benchmarks/robust_training_throughput.py --size 128 --chans 16 --batch-size 8 --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from timing import sync


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="unet", choices=["unet", "irim"])
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--chans", type=int, default=16, help="U-Net channels")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6,
                   help="timed steps per setting (after one warm-up step; even, for the alternate mixing)")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--grad-steps", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    from blindspot.data.mri import open_mri_dataset
    from blindspot.data.sample import collate_mri
    from blindspot.models.adapters import eval_mode, reconstruct
    from blindspot.models.registry import build_model
    from blindspot.physics.mri import create_mask_func, mask_on_grid
    from blindspot.training.distributed import DistContext, resolve_device
    from blindspot.training.engine import StepContext, seed_everything
    from blindspot.training.mri import mri_loss
    from blindspot.training.robust import RobustConfig, fnaf_robust_loss

    device = resolve_device(args.device)
    ds = open_mri_dataset(None, create_mask_func("random", [4.0], [0.08]), None, volumes=2,
                          slices=max(1, args.batch_size // 2), seed=1000, shape=(args.size, args.size),
                          recon_size=(args.size, args.size))
    batch = collate_mri([ds[i % len(ds)] for i in range(args.batch_size)]).to(device)
    settings = {"standard": None}
    for search in ("draw", "rs", "grad"):
        settings[f"robust-{search}"] = RobustConfig(fraction=args.fraction, search=search, candidates=args.candidates,
                                                    grad_steps=args.grad_steps)
    settings["robust-rs-alternate"] = RobustConfig(fraction=args.fraction, search="rs", candidates=args.candidates,
                                                   mixing="alternate")
    dist = DistContext(device=device)
    runs = {}
    for name, cfg in settings.items():
        seed_everything(0)
        hp = {"chans": args.chans, "num_pool_layers": 3} if args.model == "unet" else {}
        model = build_model(args.model, **hp).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        loss_fn = mri_loss("l1") if cfg is None else fnaf_robust_loss(mri_loss("l1"), cfg)
        runs[name] = (model, opt, loss_fn, [])
    # the rs scoring passes alone: chosen images × candidates rows, no gradients, on the standard model's weights
    chosen = max(1, min(args.batch_size, round(args.fraction * args.batch_size)))
    rows = torch.arange(chosen, device=device).repeat_interleave(args.candidates)
    x_score = batch.normalized()[0].index_select(0, rows)
    m_score = mask_on_grid(batch.mask.to(device), tuple(batch.input.shape[-2:]), args.batch_size).index_select(0, rows)
    floor_times: list[float] = []
    # round robin: one step of every setting in turn, so that a change of the machine's load hits all settings alike
    # (the CPU may be shared); the mean step time of each is reported (alternate mixing: clean and feature steps alike)
    for step in range(args.steps + 1):
        for name, (model, opt, loss_fn, times) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = loss_fn(model, batch, StepContext(0, step, device, dist, 0))
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            opt.step()
            sync(device)
            if step:
                times.append(time.perf_counter() - t0)
        model = runs["standard"][0]
        sync(device)
        t0 = time.perf_counter()
        with eval_mode(model), torch.no_grad():
            reconstruct(model, x_score, m_score)
        sync(device)
        if step:
            floor_times.append(time.perf_counter() - t0)
    results = {}
    for name, (_, _, _, times) in runs.items():
        sec = statistics.mean(times)
        results[name] = {"seconds_per_step": sec, "slices_per_s": args.batch_size / sec}
    base = results["standard"]["slices_per_s"]
    for name, r in results.items():
        r["throughput_vs_standard"] = r["slices_per_s"] / base
        r["step_time_vs_standard"] = base / r["slices_per_s"]
    floor = 1 + statistics.mean(floor_times) / results["standard"]["seconds_per_step"]
    results["robust-rs"]["rs_floor_vs_standard"] = floor
    results["robust-rs"]["rs_overhead_vs_standard"] = results["robust-rs"]["step_time_vs_standard"] - floor
    print(json.dumps({
        "benchmark": "robust_training_throughput",
        "model": args.model, "size": args.size, "chans": args.chans, "batch_size": args.batch_size,
        "fraction": args.fraction, "candidates": args.candidates, "grad_steps": args.grad_steps,
        "device": str(device), "torch_threads": torch.get_num_threads(), "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
