"""Why the seed's criterion and the recovery criterion disagree on the phantoms (issue 14 item 3): measured anatomy of
``L_atk`` for random seed-sized walks.

For every image and random walk candidate (the attack's own sampler and region, the seed's 10-pixel walk by default)
it measures, at one acceleration, in units of the seed's threshold ``1e-3 · 320² / (h·w)`` (so 1.0 = the threshold):

* ``feature_energy`` — ``Σ_T (N(y') − N(y))²·/(h·w)``: the feature's own energy in the network's units. A network
  that reconstructs the clean image perfectly and erases the feature completely has exactly this ``L_atk``: it is the
  most a feature can contribute, so features below 1.0 can only be "lost" under the seed's criterion with the help
  of the network's own error;
* ``attack_loss``, ``baseline_loss`` (the network's own error in ``T`` without the feature) and ``recovery``, for the
  seed's ``T`` (support + 1-pixel ring, ``dilation 1``) and blindspot's (``dilation 3``);
* the dynamic range of each truth in units of the input's standard deviation ``(max y − min y)/σ(x)`` — what sets
  ``feature_energy`` — and the distinct pixels of each walk (a walk revisits pixels);
* the IP loss, whose summed value ``IP·h·w`` compares with the seed's (random features: 6.4e-4 at 320², i.e. 65.5)
  and so gives the ratio of the seed data's normalised feature energy to the phantoms'.

Prints JSON. Example (the bundled U-Net, the demo's phantoms)::

    OMP_NUM_THREADS=1 python benchmarks/fnaf_seed_criterion.py --model mri_unet --volumes 2 --slices 6
"""

from __future__ import annotations

import argparse
import json

import torch

#: The seed's IP loss of random features (its IP table, "Random" column): a whole-image mean at 320×320.
SEED_RANDOM_IP_LOSS = 6.4e-4
SEED_PIXELS = 320 * 320


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    x = x.double().flatten()
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"mean": float(x.mean()), "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mri_unet", help="checkpoint or bundled name")
    p.add_argument("--acceleration", type=float, default=4.0)
    p.add_argument("--volumes", type=int, default=2)
    p.add_argument("--slices", type=int, default=6)
    p.add_argument("--phantom-seed", type=int, default=100, help="the audit's phantoms (default 100)")
    p.add_argument("--candidates", type=int, default=11, help="random walks per image")
    p.add_argument("--steps", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="walk pixels (default: the seed's evaluation walk, 10)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from blindspot.attacks.features import FeatureSampler, Region, candidate_keys, neighbourhood
    from blindspot.attacks.fnaf import FnafObjective
    from blindspot.models.loading import load_model
    from blindspot.runs.fnaf import mri_settings, phantom_geometry_of

    loaded = load_model(args.model)
    geometry = phantom_geometry_of(loaded)
    setting = mri_settings(None, [args.acceleration], volumes=args.volumes, slices=args.slices,
                           seed=args.phantom_seed, **geometry)[0]
    sampler = FeatureSampler("walk", None if args.steps is None else ((args.steps[0], args.steps[1]), (0, 0)))
    region = Region()
    rows: dict[str, list[torch.Tensor]] = {}

    def add(name: str, value: torch.Tensor) -> None:
        rows.setdefault(name, []).append(value.detach().cpu().double())

    shape = None
    for batch in setting.loader(8):
        for dilation in (1, 3):
            obj = FnafObjective(dilation=dilation, reference=True, fuse_reference=False)
            ctx = obj.prepare(loaded.network, batch, setting.physics, region, args.seed)
            shape = ctx.shape
            B, n = len(ctx), args.candidates
            feats = sampler.sample(candidate_keys(ctx.image_keys, range(n)), ctx.region, ctx.dynamic_range)
            values, support = feats.render(ctx.shape)
            idx = torch.arange(B).repeat_interleave(n)
            with torch.no_grad():
                ev = obj.evaluate(loaded.network, ctx, idx, values, support)
            thr = obj.effective_loss_threshold(ctx.shape)
            stats = ctx.stats.index(idx)
            _, stats_p, _ = obj.perturbed_input(ctx.acquisition.select(idx), ctx.measurement.select(idx), stats,
                                                values)
            y = ctx.target.index_select(0, idx)
            T = neighbourhood(support, dilation)
            energy = (T * (stats_p.apply(y + values) - stats_p.apply(y))).square().mean((1, 2, 3))
            add(f"d{dilation}_feature_energy", energy / thr)
            add(f"d{dilation}_attack_loss", ev.attack_loss / thr)
            add(f"d{dilation}_baseline_loss", ev.baseline_loss / thr)
            add(f"d{dilation}_lost_seed", (ev.lost_seed & ev.accepted).double())
            add(f"d{dilation}_baseline_alone_lost", (ev.baseline_loss >= thr).double())
            add(f"d{dilation}_energy_reaches_threshold", (energy >= thr).double())
            add(f"d{dilation}_lost_recovery", (ev.lost_recovery & ev.accepted).double())
            if dilation == 1:
                add("recovery", ev.recovery)
                add("ip_loss", ev.ip_loss)
                add("accepted", ev.accepted.double())
                add("distinct_pixels", support.flatten(1).sum(1))
                sigma = ctx.stats.std.flatten()
                add("range_over_sigma", ctx.dynamic_range / sigma)
    cat = {k: torch.cat(v) for k, v in rows.items()}
    h, w = shape
    ip_sum = float(cat["ip_loss"].mean()) * h * w
    out = {
        "benchmark": "fnaf_seed_criterion",
        "model": loaded.name,
        "image_shape": [h, w],
        "acceleration": args.acceleration,
        "images": int(cat["range_over_sigma"].numel()),
        "candidates_per_image": args.candidates,
        "walk_pixels": list(sampler.sizes[0]),
        "threshold": FnafObjective().effective_loss_threshold((h, w)),
        "range_over_sigma": _quantiles(cat["range_over_sigma"]),
        "distinct_pixels": _quantiles(cat["distinct_pixels"]),
        "ip_loss": _quantiles(cat["ip_loss"]),
        "ip_acceptance": float(cat["accepted"].mean()),
        "ip_summed": ip_sum,
        "seed_ip_summed": SEED_RANDOM_IP_LOSS * SEED_PIXELS,
        "seed_over_phantom_feature_energy": SEED_RANDOM_IP_LOSS * SEED_PIXELS / ip_sum,
        "recovery": _quantiles(cat["recovery"]),
        "rates": {k: float(v.mean()) for k, v in cat.items()
                  if k.endswith(("lost_seed", "lost_recovery", "alone_lost", "reaches_threshold"))},
        "in_threshold_units": {k: _quantiles(v) for k, v in cat.items()
                               if k.endswith(("feature_energy", "attack_loss", "baseline_loss"))},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
