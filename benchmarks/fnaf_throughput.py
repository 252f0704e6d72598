"""FNAF attack throughput against the bare network on the same batch; prints JSON.

For each image size: RS candidates per second (rendering → physics → normalisation → model → scoring, chunked), the
bare model's images per second on batches of the same shape (``reconstruct`` under ``no_grad``, same chunks), their
ratio, the same with the recovery reference pass switched off, the gradient search against the bare model's
forward + backward, a time breakdown of the non-network stages, and peak memory.

    python benchmarks/fnaf_throughput.py                      # U-Net (chans 32) at 320x320 and 64x64
    python benchmarks/fnaf_throughput.py --model irim --sizes 320 --images 8 --chunk-size 88
    python benchmarks/fnaf_throughput.py --sizes 64 --ct-model redcnn --ct-size 256   # the CT row: RS on a denoiser
    python benchmarks/fnaf_throughput.py --model varnet --coils 8 --sizes 320       # E2E-VarNet, multi-coil physics
    python benchmarks/fnaf_throughput.py --audit-like --sizes 320 --ct-size 0       # the audit's searches together

``BLINDSPOT_MALLOC=keep`` (as ``make demo`` sets it, :func:`blindspot.cli.keep_freed_memory`) lets glibc keep freed
memory for reuse here too; without it the attack's large temporary tensors cost page faults that the bare network's
calls mostly do not, which lowers the ratios by a few hundredths.

Ratios near 1 mean the attack costs what the network costs. The RS ratio counts candidates only, while each image also
costs one clean reference reconstruction for the recovery criterion, so with ``n`` candidates it is at most
``n / (n + 1)`` (0.917 at the seed's 11); ``query_ratio`` counts that pass and ``ratio_no_reference`` switches it off.

``--model varnet`` (fastMRI's E2E-VarNet, :mod:`blindspot.models.varnet`) attacks through the multi-coil acquisition
(:class:`blindspot.physics.acquisition.CartesianMRI` with smooth synthetic coil maps, ``--coils``): a feature enters
every coil's k-space. It reports the same RS ratio against the bare network on the clean measurements, peak memory and
the multi-coil physics' cost per candidate (perturbing every coil, the zero-filled input, the target and IP).

``--audit-like`` attacks as the audit does: RS, FD and the gradient search under both criteria (six searches) on one
batch, sharing one clean reference per image (:func:`blindspot.runs.fnaf.attack_setting`) and RS's candidate scores
across the two criteria (the same candidates), against the same searches run one by one (each with its own reference
pass and RS scored twice, as before they shared them). ``ratio`` is the network time the shared run's own model
passes need (forward passes; forward + backward for gradient steps) over the attack's wall time: at most about
``P / (P + 1)`` (``P`` = model passes per image besides the reference, ``passes_per_image``: 55 with the defaults,
the records' 66 queries less RS's 11 scored once for both criteria); ``ratio_one_by_one`` is the same network time
over the one-by-one run's wall time (``speedup_from_sharing`` their quotient).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from timing import median_time, median_times, peak_of


def _phantom_batch(n: int, size: int, mask_func):
    from blindspot.data.sample import KspaceTransform, collate_mri
    from blindspot.physics.mri import fft2c

    r = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    tf = KspaceTransform(mask_func)
    samples = []
    for i in range(n):
        c = size / 2 + (i % 7) - 3
        img = torch.sigmoid(6 * (1 - ((yy - c) / (0.38 * size)) ** 2 - ((xx - size / 2) / (0.3 * size)) ** 2))
        img = img + 0.6 * torch.sigmoid(6 * (1 - ((yy - c + size / 8) ** 2 + (xx - size / 2) ** 2) / (size / 9) ** 2))
        samples.append(tf(fft2c(img.to(torch.complex64)), None, f"bench{i}.h5", i))
    return collate_mri(samples)


def bench_size(model, size: int, args, device: torch.device) -> dict:
    from blindspot.attacks.features import FeatureSampler, candidate_keys
    from blindspot.attacks.fnaf import FnafObjective, eval_mode
    from blindspot.attacks.search import GradientSearch, RandomSearch
    from blindspot.models.adapters import reconstruct
    from blindspot.physics.mri import CartesianUndersampling, create_mask_func

    mask_func = create_mask_func("random", [4])
    batch = _phantom_batch(args.images, size, mask_func)
    n, B, cs = args.candidates, args.images, args.chunk_size
    sampler = FeatureSampler(args.family)
    rs = RandomSearch(sampler=sampler, n_candidates=n, chunk_size=cs)
    rs_noref = RandomSearch(sampler=sampler, n_candidates=n, chunk_size=cs, objective=FnafObjective(reference=False))
    grad = GradientSearch(sampler=sampler, steps=args.grad_steps, init_candidates=args.grad_init, chunk_size=cs)

    obj = FnafObjective()
    with eval_mode(model):
        ctx = obj.prepare(model, batch, mask_func)
    x_bare = ctx.clean_input.repeat_interleave(n, 0)  # B·n inputs, the RS batch's shape
    mask_bare = ctx.acquisition.mask.repeat_interleave(n, 0)

    def bare_forward():
        with torch.no_grad():
            for s in range(0, B * n, cs):
                reconstruct(model, x_bare[s : s + cs], mask_bare[s : s + cs])

    def bare_forward_backward():  # what one gradient step costs the network: forward + input gradient
        for s in range(0, B, cs):
            v = ctx.clean_input[s : s + cs].clone().requires_grad_(True)
            out = reconstruct(model, v, ctx.acquisition.mask[s : s + cs])
            torch.autograd.grad(out.square().sum(), v)

    model.eval()
    peak_bare = peak_of(bare_forward, device)
    peak_rs = peak_of(lambda: rs(model, batch, mask_func), device)
    timed = median_times(
        {
            "bare": bare_forward,
            "rs": lambda: rs(model, batch, mask_func),
            "rs_noref": lambda: rs_noref(model, batch, mask_func),
        },
        device,
        args.repeats,
        args.warmup,
    )
    t_bare, t_rs, t_rs_noref = timed["bare"], timed["rs"], timed["rs_noref"]

    # the non-network stages on their own (same chunking)
    feats = sampler.sample(candidate_keys(ctx.image_keys, range(n)), ctx.region, ctx.dynamic_range)
    idx = torch.arange(B, device=ctx.device).repeat_interleave(n)

    def render_only():
        for s in range(0, B * n, cs):
            feats[s : s + cs].render(ctx.shape)

    rendered = [feats[s : s + cs].render(ctx.shape) for s in range(0, B * n, cs)]

    def physics_only():
        with torch.no_grad():
            for k, s in enumerate(range(0, B * n, cs)):
                i = idx[s : s + cs]
                y = ctx.target[i] + rendered[k][0]
                ctx.stats.index(i).apply(CartesianUndersampling(ctx.acquisition.mask[i])(y))

    class _Echo(torch.nn.Module):  # a free "network": what remains is physics + scoring
        def forward(self, x):
            return x

    def pipeline_without_network():
        rs(_Echo(), batch, mask_func)

    t_render = median_time(render_only, device, args.repeats, args.warmup)
    t_physics = median_time(physics_only, device, args.repeats, args.warmup)
    t_overhead = median_time(pipeline_without_network, device, args.repeats, args.warmup)

    grad_entry = {}
    if args.grad_steps > 0:
        peak_grad = peak_of(lambda: grad(model, batch, mask_func), device)
        tg = median_times({"grad": lambda: grad(model, batch, mask_func), "fb": bare_forward_backward},
                          device, max(1, args.repeats // 2), 1)
        t_grad, t_fb = tg["grad"], tg["fb"]
        # the network's share of the gradient search: steps × (forward + backward) per image, plus forwards for the
        # random starts, the last iterate and the clean reference
        per_image_forward = t_bare / (B * n)
        ideal = args.grad_steps * t_fb + B * (args.grad_init + 2) * per_image_forward
        grad_entry = {
            "grad_steps": args.grad_steps,
            "grad_init_candidates": args.grad_init,
            "grad_seconds": t_grad,
            "bare_forward_backward_seconds": t_fb,
            "grad_ratio_vs_bare_forward_backward": ideal / t_grad,
            "peak_memory_mb_grad": peak_grad,
        }
    cand = B * n
    return {
        "size": [size, size],
        "images": B,
        "candidates_per_image": n,
        "chunk_size": cs,
        "rs_seconds": t_rs,
        "rs_candidates_per_s": cand / t_rs,
        "rs_model_queries_per_s": B * (n + 1) / t_rs,
        "bare_model_images_per_s": cand / t_bare,
        "ratio": (cand / t_rs) / (cand / t_bare),
        "query_ratio": (B * (n + 1) / t_rs) / (cand / t_bare),
        "ratio_no_reference": (cand / t_rs_noref) / (cand / t_bare),
        "max_ratio_with_reference": n / (n + 1),
        "breakdown_seconds": {
            "bare_model": t_bare,
            "rs": t_rs,
            "rs_no_reference": t_rs_noref,
            "render": t_render,
            "physics_and_normalisation": t_physics,
            "rs_with_a_free_network": t_overhead,
        },
        "overhead_share": t_overhead / t_rs,
        "peak_memory_mb_bare": peak_bare,
        "peak_memory_mb_rs": peak_rs,
        **grad_entry,
    }


def _coil_maps(coils: int, size: int) -> torch.Tensor:
    """Smooth synthetic sensitivities ``(1, C, size, size)`` complex64: Gaussian bumps around the image with linear
    phases, normalised to ``Σ_c |S_c|² = 1``."""
    r = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    maps = []
    for c in range(coils):
        a = 2 * torch.pi * c / coils
        mag = torch.exp(-((yy - 0.8 * torch.sin(torch.tensor(a))) ** 2 + (xx - 0.8 * torch.cos(torch.tensor(a))) ** 2))
        maps.append(mag * torch.exp(1j * (a + 0.5 * xx)))
    s = torch.stack(maps)
    return (s / s.abs().square().sum(0, keepdim=True).sqrt()).to(torch.complex64)[None]


def bench_varnet(model, size: int, args, device: torch.device) -> dict:
    """RS against E2E-VarNet through the multi-coil acquisition vs. the bare network on the clean measurements."""
    from blindspot.attacks.features import FeatureSampler, candidate_keys
    from blindspot.attacks.fnaf import FnafObjective, Truths, eval_mode
    from blindspot.attacks.search import RandomSearch
    from blindspot.models.adapters import as_network
    from blindspot.physics.mri import create_mask_func

    mask_func = create_mask_func("random", [4])
    B, n, cs = args.images, args.candidates, args.chunk_size
    target = _phantom_batch(B, size, mask_func).target
    truths = Truths(target, [f"bench{i}.h5" for i in range(B)], list(range(B)),
                    sens_maps=_coil_maps(args.coils, size).expand(B, -1, -1, -1).contiguous())
    net = as_network(model)
    sampler = FeatureSampler(args.family)
    rs = RandomSearch(sampler=sampler, n_candidates=n, chunk_size=cs)
    with eval_mode(model), torch.no_grad():
        ctx = FnafObjective(fuse_reference=False).prepare(net, truths, mask_func)
    idx = torch.arange(B, device=ctx.device).repeat_interleave(n)

    def bare_forward():
        with torch.no_grad():
            for s in range(0, B * n, cs):
                i = idx[s : s + cs]
                net(ctx.acquisition.select(i), ctx.measurement.select(i), ctx.clean_input[i], ctx.stats.index(i))

    feats = sampler.sample(candidate_keys(ctx.image_keys, range(n)), ctx.region, ctx.dynamic_range)
    rendered = [feats[s : s + cs].render(ctx.shape) for s in range(0, B * n, cs)]

    def physics_only():  # what the attack adds per candidate: perturb every coil, normalise, target, IP
        with torch.no_grad():
            for k, s in enumerate(range(0, B * n, cs)):
                i = idx[s : s + cs]
                acq, meas, stats = ctx.acquisition.select(i), ctx.measurement.select(i), ctx.stats.index(i)
                mp = acq.perturb(meas, rendered[k][0])
                stats.apply(mp.image)
                acq.target(ctx.target[i] + rendered[k][0], stats)
                acq.information(meas, mp, stats)

    model.eval()
    peak_bare = peak_of(bare_forward, device)
    with eval_mode(model):
        peak_rs = peak_of(lambda: rs(net, truths, mask_func), device)
    with eval_mode(model):
        timed = median_times({"bare": bare_forward, "rs": lambda: rs(net, truths, mask_func)}, device,
                             args.repeats, args.warmup)
    t_phys = median_time(physics_only, device, args.repeats, args.warmup)
    cand = B * n
    return {
        "size": [size, size], "coils": args.coils, "images": B, "candidates_per_image": n, "chunk_size": cs,
        "rs_seconds": timed["rs"], "bare_model_images_per_s": cand / timed["bare"],
        "rs_candidates_per_s": cand / timed["rs"], "ratio": timed["bare"] / timed["rs"],
        "query_ratio": timed["bare"] * (n + 1) / n / timed["rs"], "max_ratio_with_reference": n / (n + 1),
        "multicoil_physics_seconds_per_candidate": t_phys / cand,
        "multicoil_physics_share_of_bare_network": t_phys / timed["bare"],
        "peak_memory_mb_bare": peak_bare, "peak_memory_mb_rs": peak_rs,
    }


def bench_audit_like(model, size: int, args, device: torch.device) -> dict:
    """The audit's six searches (RS, FD, gradient × seed, recovery) on one batch: sharing one clean reference per
    image vs. one search at a time, both against the network time their own queries need.

    The network time is measured at the searches' own batch shapes: every model call of a run is recorded (batch size,
    and whether it needs the input gradient) and the bare network is timed on the same sequence of calls, in rounds
    alternating with the attacks; the searches' own share leaves out the clean images that ride along with the first
    call of each context."""
    from blindspot.attacks.fnaf import FnafObjective, eval_mode
    from blindspot.models.adapters import as_network, reconstruct
    from blindspot.physics.mri import create_mask_func
    from blindspot.runs.fnaf import AttackSetting, FnafConfig, attack_setting

    mask_func = create_mask_func("random", [4])
    batch = _phantom_batch(args.images, size, mask_func)
    B = args.images
    net = as_network(model)
    searches = [s for c in ("seed", "recovery") for s in FnafConfig(
        searches=("rs", "fd", "grad"), family=args.family, criterion=c, candidates=args.candidates,
        grad_steps=args.grad_steps, grad_init=args.grad_init, chunk_size=args.chunk_size).build("mri", c)]
    setting = AttackSetting(4.0, mask_func, None, None, "mri", batch_list=[batch])

    def shared():
        return attack_setting(net, searches, setting, B)

    def one_by_one():
        return [r for s in searches for r in s(net, batch, mask_func).rows(net.name)]

    def calls_of(fn) -> list[list]:
        calls: list[list] = []
        hook = model.register_forward_hook(lambda m, i, o: calls.append([int(i[0].shape[0]), torch.is_grad_enabled()]))
        out = fn()
        hook.remove()
        return calls, out

    calls_shared, rows = calls_of(shared)
    calls_alone, _ = calls_of(one_by_one)
    with eval_mode(model), torch.no_grad():
        x0 = FnafObjective().prepare(net, batch, mask_func)
    bare: dict[tuple[int, bool], float] = {}
    bare_call: dict[tuple[int, bool], object] = {}
    for n, g in {(n, g) for n, g in calls_shared + calls_alone}:
        x = x0.clean_input[:1].expand(n, -1, -1, -1).contiguous()
        m = x0.acquisition.mask[:1].expand(n, -1, -1, -1).contiguous()

        def call(x=x, m=m, g=g):
            if g:
                v = x.clone().requires_grad_(True)
                torch.autograd.grad(reconstruct(model, v, m).square().sum(), v)
            else:
                with torch.no_grad():
                    reconstruct(model, x, m)

        bare_call[(n, g)] = call
        bare[(n, g)] = median_time(call, device, 1, 0)
    first_n = calls_shared[0][0]  # the clean references ride along with the first call: count its candidates only
    own_fraction = (sum(bare[tuple(c)] for c in calls_shared[1:]) + bare[tuple(calls_shared[0])] * (first_n - B)
                    / first_n) / sum(bare[tuple(c)] for c in calls_shared)
    peak = peak_of(shared, device)

    def network_of(calls):  # the bare network on the same sequence of call shapes
        return lambda: [bare_call[tuple(c)]() for c in calls]

    # the attacks and the bare network's calls in alternating rounds, so that load drift hits all of them alike
    timed = median_times({"shared": shared, "one_by_one": one_by_one, "net_shared": network_of(calls_shared),
                          "net_alone": network_of(calls_alone)}, device, args.repeats, args.warmup)
    t_net_shared, t_net_alone = timed["net_shared"], timed["net_alone"]
    t_own = t_net_shared * own_fraction
    queries = sum(int(r["queries"]) - 1 for r in rows) / B  # per image, over all searches, without the reference
    passes = sum(n for n, _ in calls_shared) / B - 1  # model passes per image in the shared run, less the reference
    return {
        "size": [size, size], "images": B, "searches": [f"{s.name}/{s.objective.criterion}" for s in searches],
        "queries_per_image": queries, "gradient_steps_per_image": sum(int(r["gradients"]) for r in rows) / B,
        "model_calls_shared": len(calls_shared), "model_calls_one_by_one": len(calls_alone),
        "shared_seconds": timed["shared"], "one_by_one_seconds": timed["one_by_one"],
        "network_seconds_own_queries": t_own, "network_seconds_shared": t_net_shared,
        "network_seconds_one_by_one": t_net_alone,
        "ratio": t_own / timed["shared"], "ratio_one_by_one": t_own / timed["one_by_one"],
        "network_share_shared": t_net_shared / timed["shared"],
        "network_share_one_by_one": t_net_alone / timed["one_by_one"],
        "passes_per_image": passes, "max_ratio_shared": passes / (passes + 1),
        "speedup_from_sharing": timed["one_by_one"] / timed["shared"], "peak_memory_mb": peak,
    }


def bench_ct(args, device: torch.device) -> dict:
    """The CT row: RS against a CT denoiser (``--ct-model``, a bundled name or registered architecture) on phantom
    slices of ``--ct-size`` at its dose, against the bare denoiser on the same batches; also the per-candidate cost of
    the feature's path through the scanner (measured PSF vs. exact projection + FBP). ``ratio`` is the steady state
    (the searches of a run share each image's clean measurement); ``ratio_with_measurement`` also charges the one
    clean measurement per image (projection, Poisson noise and FBP at the network's dose) to this single search."""
    from blindspot.attacks.features import FeatureSampler
    from blindspot.attacks.search import RandomSearch
    from blindspot.models.adapters import eval_mode
    from blindspot.models.loading import load_model
    from blindspot.data.ldct import collate_ct
    from blindspot.physics.acquisition import LowDoseCTScan
    from blindspot.runs.fnaf import CT_INTENSITY_HU, ct_settings

    model = load_model(args.ct_model, device, warn=False)
    (setting,) = ct_settings(model, phantoms=args.images, size=args.ct_size)
    batch = collate_ct([setting.dataset[i] for i in range(args.images)])
    n, B = args.candidates, args.images
    cs = B * n
    rs = RandomSearch(sampler=FeatureSampler("disc", intensity_range=CT_INTENSITY_HU, absolute=True), n_candidates=n,
                      chunk_size=cs)
    net, acq = model.network, setting.physics
    x_bare = acq.norm.to_network(batch.low).to(device).repeat_interleave(n, 0)

    def bare_forward():
        with torch.no_grad():
            model.model(x_bare)

    with eval_mode(model.model):
        rs(net, batch, acq)  # warms the PSF and the clean-measurement cache, as a run's first batch does
        timed = median_times({"bare": bare_forward, "rs": lambda: rs(net, batch, acq)}, device, args.repeats,
                             args.warmup)
    # the clean measurement (projection, Poisson noise, one FBP of the noisy and noise-free sinograms) that each image
    # costs once per run, on first use; timed with the cache emptied
    def measure_cold():  # LowDoseCTScan.measure_seeded with nothing cached (batched where the projector allows)
        LowDoseCTScan(acq.ct, acq.dose, acq.norm).measure_seeded(batch.full.to(device), list(range(B)))

    t_measure = median_time(measure_cold, device, args.repeats, 0)
    delta = torch.zeros(cs, 1, args.ct_size, args.ct_size, device=device)
    delta[..., args.ct_size // 2 - 2 : args.ct_size // 2 + 2, args.ct_size // 2 - 2 : args.ct_size // 2 + 2] = 50.0
    with torch.no_grad():
        t_psf = median_time(lambda: acq.response(delta), device, args.repeats, args.warmup)
        t_exact = median_time(lambda: acq.exact_response(delta), device, 1, 0)
    return {
        "model": args.ct_model,
        "size": [args.ct_size, args.ct_size],
        "dose": acq.dose,
        "images": B,
        "candidates_per_image": n,
        "rs_seconds": timed["rs"],
        "bare_model_images_per_s": cs / timed["bare"],
        "rs_candidates_per_s": cs / timed["rs"],
        "ratio": timed["bare"] / timed["rs"],
        "max_ratio_with_reference": n / (n + 1),
        "clean_measurement_seconds_per_image": t_measure / B,
        "ratio_with_measurement": timed["bare"] / (timed["rs"] + t_measure),
        "feature_response_seconds_per_candidate": {"psf": t_psf / cs, "exact_projection_and_fbp": t_exact / cs},
        "psf_speedup": t_exact / t_psf,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="unet", help="registered architecture (random weights: speed only)")
    p.add_argument("--hparams", default="{}", help='JSON constructor arguments, e.g. \'{"chans": 32}\'')
    p.add_argument("--sizes", nargs="+", type=int, default=[320, 64])
    p.add_argument("--images", type=int, default=None, help="images per batch (default: 8 on GPU, 1 on CPU)")
    p.add_argument("--candidates", type=int, default=11)
    p.add_argument("--chunk-size", type=int, default=None, help="default: images × candidates (one model call)")
    p.add_argument("--family", default="walk")
    p.add_argument("--grad-steps", type=int, default=6, help="0 skips the gradient-search measurement")
    p.add_argument("--grad-init", type=int, default=4, help="random starts of the gradient search")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--ct-model", default="cnn10", help="CT denoiser of the CT row (bundled name or architecture)")
    p.add_argument("--ct-size", type=int, default=128, help="CT row image size (0 skips the CT row)")
    p.add_argument("--coils", type=int, default=8, help="varnet: receive coils of the multi-coil acquisition")
    p.add_argument("--audit-like", action="store_true",
                   help="the audit's six searches on one batch, sharing the clean reference vs. one by one")
    args = p.parse_args(argv)

    from blindspot.cli import keep_freed_memory
    from blindspot.models.registry import build_model

    keep_freed_memory()  # BLINDSPOT_MALLOC=keep, as the CLI honours it
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.images is None:
        args.images = 8 if device.type == "cuda" else 1
    if args.chunk_size is None:
        args.chunk_size = args.images * args.candidates
    torch.manual_seed(0)
    model = build_model(args.model, **json.loads(args.hparams)).to(device).eval()
    results = {
        "benchmark": "fnaf_throughput",
        "model": args.model,
        "hparams": json.loads(args.hparams),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "family": args.family,
        "mode": "audit-like" if args.audit_like else ("multi-coil" if args.model == "varnet" else "rs"),
        "sizes": [],
    }
    for size in args.sizes:
        if args.audit_like:
            entry = bench_audit_like(model, size, args, device)
        elif args.model == "varnet":
            entry = bench_varnet(model, size, args, device)
        else:
            entry = bench_size(model, size, args, device)
        results["sizes"].append(entry)
        print(f"# {size}x{size}: ratio {entry['ratio']:.3f}", file=sys.stderr)
    if args.ct_size:
        results["ct"] = bench_ct(args, device)
        print(f"# CT {args.ct_size}x{args.ct_size}: ratio {results['ct']['ratio']:.3f}", file=sys.stderr)
    results["min_ratio"] = min(e["ratio"] for e in results["sizes"])
    if not args.audit_like:
        results["min_query_ratio"] = min(e["query_ratio"] for e in results["sizes"])
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
