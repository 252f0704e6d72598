"""Attacks on the measurements themselves: ℓ2 worst-case perturbations (Antun et al., PNAS 2020; Darestani et al.,
ICML 2021) beside random perturbations of the same norm, and the false-positive attack (the smallest measurement
change that makes a chosen feature appear).

A measurement perturbation ``e`` lives where the acquisition measures
(:meth:`~blindspot.physics.acquisition.Acquisition.project_measurements`): for MRI on the *sampled* k-space entries
of every coil (complex ``(B, C, H, W)``, the data's units), for CT on the low-dose input image (HU). It reaches the
network through the acquisition (:meth:`~blindspot.physics.acquisition.Acquisition.perturb_measurements`) and the
network's own calling convention (normalised image, image + mask, or k-space), so every network the audit accepts is
attacked the same way. Budgets are relative: ``‖e‖ ≤ ε · s`` with ``s`` the acquisition's
:meth:`~blindspot.physics.acquisition.Acquisition.measurement_scale` (MRI ``‖M ⊙ k‖``, the measured k-space's norm;
CT ``‖n‖``, the norm of the input's own noise, so ``ε = 1`` is "within the noise level").

The network's input is normalised with the *perturbed* input's own statistics by default (as a deployed network
normalises whatever it is given; ``normalization="clean"`` keeps the clean input's), and outputs are compared in the
data's units, on the network's grid.

* :class:`WorstCasePGD` — projected gradient ascent on ``‖x̂(e) − y‖²`` within each budget (random start, steps of
  ``step_factor · ε s / steps`` along the normalised gradient, best iterate kept), and ``random_draws`` random
  perturbations (complex Gaussian on the sampled entries, rescaled to norm exactly ``ε s``).
* :class:`FalsePositiveAttack` — for a feature ``φ`` (a disc by default, drawn per image like FNAF's features), PGD
  on the *appearance* ``a(e) = 1 − ‖T ⊙ (x̂(e) − x̂(0) − φ)‖² / ‖T ⊙ φ‖²`` within each budget of a ladder; the
  feature appears when ``a ≥ threshold`` (0.5: the reconstruction shows at least half of the feature's energy, the
  mirror image of FNAF's ``recovery`` criterion). Reported: the smallest budget that succeeds per image, the attack
  rate at a fixed budget, and the *honest* budget ``‖P(meas(y + φ) − meas(y))‖ / s`` — how large the feature's own
  trace in the measurements is — with the appearance the network gives that honest perturbation.

Everything is batched over (image, budget) items, chunked by ``chunk_size``; every random draw is keyed by (run seed,
image identity, acceleration), so results do not depend on batching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from blindspot.attacks.features import FeatureSampler, Region, candidate_keys, neighbourhood, string_key
from blindspot.attacks.fnaf import NORMALIZATIONS, AttackContext, FnafObjective
from blindspot.errors import BlindspotError
from blindspot.models.adapters import Network, as_network, eval_mode
from blindspot.physics.acquisition import Acquisition, Measurement
from blindspot.physics.mri import NormStats

WORST_CASE_COLUMNS: tuple[str, ...] = (
    "model", "key", "fname", "slice", "acceleration", "budget", "error_unit", "error_clean", "error_pgd",
    "error_random", "error_random_max", "change_pgd", "change_random", "gain_pgd", "gain_random", "norm",
)  # fmt: skip
FALSE_POSITIVE_COLUMNS: tuple[str, ...] = (
    "model", "key", "fname", "slice", "acceleration", "budget", "appearance", "success", "honest_budget",
    "honest_appearance", "row", "col", "intensity",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------------------------------------------
def prepare_measurements(model: "nn.Module | Network", batch: Any, physics: Any = None, seed: int = 0,
                         region: Region = Region()) -> AttackContext:
    """The batch's clean measurements, statistics and reconstruction (FNAF's :class:`AttackContext`: a CT input's
    noise is the one FNAF simulates for the same seed and image)."""
    return FnafObjective(reference=True, fuse_reference=False).prepare(model, batch, physics, region, seed)


def clean_output(ctx: AttackContext) -> Tensor:
    """``x̂(0)`` in the data's units ``(B, 1, h, w)``."""
    return ctx.stats.invert(ctx.clean_output)


@dataclass
class Items:
    """The acquisition, clean measurement and clean statistics of some items of a context (selected once, reused
    by every step of an attack)."""

    acquisition: Acquisition
    measurement: Measurement
    stats: NormStats

    @staticmethod
    def of(ctx: AttackContext, idx: Tensor) -> "Items":
        """Items ``idx`` (int64 ``(N,)``, indices into the context's images, repeats allowed)."""
        return Items(ctx.acquisition.select(idx), ctx.measurement.select(idx), ctx.stats.index(idx))


def reconstruct(net: Network, items: Items, e: Tensor, normalization: str = "perturbed") -> Tensor:
    """The network's output in the data's units ``(N, 1, h, w)`` when the items' measurements are perturbed by ``e``
    (shaped like the measurement vector; differentiable), normalised with the perturbed input's own statistics or
    the clean ones."""
    acq = items.acquisition
    meas = acq.perturb_measurements(items.measurement, e)
    stats = acq.normalization(meas) if normalization == "perturbed" else items.stats
    x, _ = acq.network_input(meas, stats)
    return stats.invert(net(acq, meas, x, stats))


def _norm(e: Tensor) -> Tensor:
    """Per-item ℓ2 norm ``(N,)`` of a real or complex ``(N, ...)`` tensor."""
    if e.is_complex():
        return (e.real.square() + e.imag.square()).flatten(1).sum(1).sqrt()
    return e.flatten(1).norm(dim=1)


def _to_ball(e: Tensor, radius: Tensor) -> Tensor:
    """Scale each item into the ℓ2 ball of its ``radius`` ``(N,)``."""
    n = _norm(e).clamp_min(1e-30)
    factor = torch.clamp(radius / n, max=1.0).reshape(-1, *([1] * (e.ndim - 1)))
    return e * factor.to(e.real.dtype)


def _rescale(e: Tensor, radius: Tensor) -> Tensor:
    """Scale each item to norm exactly ``radius`` ``(N,)`` (a zero item stays zero)."""
    factor = (radius / _norm(e).clamp_min(1e-30)).reshape(-1, *([1] * (e.ndim - 1)))
    return e * factor.to(e.real.dtype)


def _gaussian_like(vector: Tensor, keys: list[int]) -> Tensor:
    """One standard Gaussian per item, shaped like ``vector[0]`` (complex: independent real and imaginary parts),
    drawn on the CPU from a generator seeded by the item's key (the same draw whatever the batch)."""
    shape = tuple(vector.shape[1:])
    parts = []
    for k in keys:
        g = torch.Generator().manual_seed(int(k))
        if vector.is_complex():
            parts.append(torch.view_as_complex(torch.randn(*shape, 2, generator=g)))
        else:
            parts.append(torch.randn(*shape, generator=g))
    return torch.stack(parts).to(device=vector.device, dtype=vector.dtype)


def pgd_l2(objective: Callable[[Tensor], tuple[Tensor, Tensor]], start: Tensor, radius: Tensor, steps: int,
           step_factor: float, project: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Projected gradient *ascent* on ``objective`` in the ℓ2 balls ``‖e‖ ≤ radius``.

    Args:
        objective: ``e (N, ...) → (values (N,), output (N, ...))``: the values to maximise, differentiable in ``e``
            (real or complex), and what the caller wants back of the best iterate (e.g. the reconstruction).
        start: the first iterate ``(N, ...)`` (projected and scaled into the ball here).
        radius: ``(N,)`` ball radii.
        steps: gradient steps (``steps`` forward + backward passes, then one forward pass for the last iterate).
        step_factor: each step moves ``step_factor · radius / steps`` along the normalised (projected) gradient.
        project: the projection onto the perturbation's subspace (e.g. the sampled k-space entries).
    Returns:
        ``(best e, best value, its output)`` per item over every iterate, detached.
    """
    e = _to_ball(project(start.detach()), radius)
    view = (-1, *([1] * (e.ndim - 1)))
    best_e, best_v, best_out = e.clone(), torch.full_like(radius, -math.inf), None
    alpha = (step_factor * radius / max(steps, 1)).reshape(view)
    for t in range(steps + 1):
        last = t == steps
        with torch.set_grad_enabled(not last):
            var = e.clone().requires_grad_(not last)
            value, out = objective(var)
            if not last:
                (g,) = torch.autograd.grad(value.sum(), var)
        v = torch.nan_to_num(value.detach(), nan=-math.inf)
        better = v > best_v
        best_v = torch.where(better, v, best_v)
        best_e = torch.where(better.reshape(view), e, best_e)
        out = out.detach()
        best_out = out if best_out is None else torch.where(better.reshape(-1, *([1] * (out.ndim - 1))), out,
                                                            best_out)
        if not last:
            g = project(g)  # complex tensors: PyTorch's gradient is the ascent direction of a real objective
            gn = _norm(g).clamp_min(1e-30).reshape(view).to(g.real.dtype)
            e = _to_ball(project(e + alpha.to(g.real.dtype) * g / gn), radius).detach()
    return best_e.detach(), best_v, best_out


def _check(normalization: str, budgets: tuple[float, ...], steps: int, chunk_size: int) -> None:
    if normalization not in NORMALIZATIONS:
        raise BlindspotError(None, f"unknown normalisation {normalization!r}; choose perturbed or clean")
    if not budgets or any(not (b > 0 and math.isfinite(b)) for b in budgets):
        raise BlindspotError(None, f"budgets must be positive and finite, got {list(budgets)}")
    if steps < 1 or chunk_size < 1:
        raise BlindspotError(None, "PGD needs steps >= 1 and chunk_size >= 1")


def _identity(ctx: AttackContext) -> list[dict[str, Any]]:
    return [{"key": k, "fname": f, "slice": int(s), "acceleration": float(a)}
            for k, f, s, a in zip(ctx.keys, ctx.fname, ctx.slice_num, ctx.acceleration.tolist())]


# ----------------------------------------------------------------------------------------------------------------
# ℓ2 worst case against random noise of the same norm
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class WorstCaseResult:
    """Per (image, budget) records (:data:`WORST_CASE_COLUMNS`, without ``model``) and the worst perturbations.

    ``error_*``: MRI ``‖x̂ − y‖ / ‖y‖``; CT RMSE in HU (``error_unit``). ``change_*``: ``‖x̂(e) − x̂(0)‖`` in the
    same unit. ``gain_*``: ``‖x̂(e) − x̂(0)‖ / ‖e‖`` (data units over data units: how much the network amplifies a
    measurement change; 1 for a change passed through unchanged). ``error_random`` is the mean over draws,
    ``error_random_max`` the largest.
    """

    rows: list[dict[str, Any]]
    perturbations: Tensor | None = None

    def records(self, model: str) -> list[dict[str, Any]]:
        return [{"model": model, **r} for r in self.rows]


@dataclass
class WorstCasePGD:
    """ℓ2 worst-case measurement perturbation by PGD, beside random perturbations of the same norm.

    Args:
        budgets: relative budgets ``ε`` (``‖e‖ ≤ ε · measurement_scale``).
        steps: PGD steps per budget (forward + backward passes each).
        step_factor: step length as a multiple of ``ε s / steps``.
        random_draws: random perturbations per (image, budget).
        normalization: ``"perturbed"`` or ``"clean"`` statistics for the perturbed input.
        chunk_size: most (image, budget) items per network call.
        seed: keys the random start and the random draws.
        keep_perturbations: return the worst perturbations (CPU) for figures.
    """

    budgets: tuple[float, ...] = (0.01, 0.03)
    steps: int = 10
    step_factor: float = 2.5
    random_draws: int = 4
    normalization: str = "perturbed"
    chunk_size: int = 32
    seed: int = 0
    keep_perturbations: bool = False

    def __post_init__(self) -> None:
        _check(self.normalization, tuple(self.budgets), self.steps, self.chunk_size)
        if self.random_draws < 0:
            raise BlindspotError(None, "random_draws must be >= 0")

    def __call__(self, model: "nn.Module | Network", batch: Any, physics: Any = None) -> WorstCaseResult:
        net = as_network(model)
        with eval_mode(net.module):
            with torch.no_grad():
                ctx = prepare_measurements(net, batch, physics, self.seed)
            return self.run(net, ctx)

    def run(self, net: Network, ctx: AttackContext) -> WorstCaseResult:
        B, nb = len(ctx), len(self.budgets)
        dev = ctx.device
        acq = ctx.acquisition
        y = acq.crop_image(ctx.target)
        x0 = clean_output(ctx)
        ct = acq.modality == "ct"
        unit = "HU (RMSE)" if ct else "relative l2"
        pixels = float(y[0].numel())

        def err(out: Tensor, i: Tensor) -> Tensor:
            d = (out - y.index_select(0, i)).flatten(1).norm(dim=1)
            return d / math.sqrt(pixels) if ct else d / y.index_select(0, i).flatten(1).norm(dim=1).clamp_min(1e-30)

        def dist(out: Tensor, i: Tensor) -> Tensor:
            d = (out - x0.index_select(0, i)).flatten(1).norm(dim=1)
            return d / math.sqrt(pixels) if ct else d / y.index_select(0, i).flatten(1).norm(dim=1).clamp_min(1e-30)

        def raw_change(out: Tensor, i: Tensor) -> Tensor:
            return (out - x0.index_select(0, i)).flatten(1).norm(dim=1)

        vector = acq.measurement_vector(ctx.measurement)
        scale = acq.measurement_scale(ctx.measurement).detach()
        img = torch.arange(B, device=dev).repeat_interleave(nb)  # items: image-major, then budget
        eps = torch.tensor(self.budgets, device=dev, dtype=torch.float32).repeat(B)
        radius = eps * scale.index_select(0, img).to(torch.float32)
        acc = ctx.acceleration.tolist()
        item_keys = [string_key(self.seed, ctx.keys[i], f"{acc[i]:g}", "worst-case-start", self.budgets[j])
                     for i in range(B) for j in range(nb)]
        with torch.no_grad():
            e_clean = err(x0, torch.arange(B, device=dev))
        out_rows: list[dict[str, Any]] = []
        ident = _identity(ctx)
        kept = []
        for s in range(0, B * nb, self.chunk_size):
            sl = slice(s, min(B * nb, s + self.chunk_size))
            i, r = img[sl], radius[sl]
            items = Items.of(ctx, i)
            sub = items.acquisition
            noise = _gaussian_like(vector.index_select(0, i), item_keys[sl])
            start = _rescale(sub.project_measurements(noise), 0.5 * r)  # a random start at half the budget
            yi = y.index_select(0, i)

            def objective(e: Tensor, items: Items = items, yi: Tensor = yi) -> tuple[Tensor, Tensor]:
                out = reconstruct(net, items, e, self.normalization)
                return (out - yi).square().flatten(1).sum(1), out

            best_e, _, out = pgd_l2(objective, start, r, self.steps, self.step_factor, sub.project_measurements)
            with torch.no_grad():
                e_pgd, c_pgd, g_pgd = err(out, i), dist(out, i), raw_change(out, i) / _norm(best_e).clamp_min(1e-30)
                rnd_err, rnd_chg, rnd_gain = [], [], []
                for d in range(self.random_draws):
                    keys = [string_key(self.seed, ctx.keys[int(a)], f"{acc[int(a)]:g}", "worst-case-random", d)
                            for a in i.tolist()]
                    noise = sub.project_measurements(_gaussian_like(vector.index_select(0, i), keys))
                    noise = _rescale(noise, r)
                    o = reconstruct(net, items, noise, self.normalization)
                    rnd_err.append(err(o, i))
                    rnd_chg.append(dist(o, i))
                    rnd_gain.append(raw_change(o, i) / _norm(noise).clamp_min(1e-30))
            nan = torch.full_like(e_pgd, float("nan"))
            re = torch.stack(rnd_err) if rnd_err else nan[None]
            rc = torch.stack(rnd_chg) if rnd_chg else nan[None]
            rg = torch.stack(rnd_gain) if rnd_gain else nan[None]
            for k, item in enumerate(range(sl.start, sl.stop)):
                im, b = divmod(item, nb)
                out_rows.append({**ident[im], "budget": float(self.budgets[b]), "error_unit": unit,
                                 "error_clean": float(e_clean[im]), "error_pgd": float(e_pgd[k]),
                                 "error_random": float(re[:, k].mean()), "error_random_max": float(re[:, k].max()),
                                 "change_pgd": float(c_pgd[k]), "change_random": float(rc[:, k].mean()),
                                 "gain_pgd": float(g_pgd[k]), "gain_random": float(rg[:, k].mean()),
                                 "norm": float(_norm(best_e)[k] / scale[im].clamp_min(1e-30))})
            if self.keep_perturbations:
                kept.append(best_e.detach().cpu())
        return WorstCaseResult(out_rows, torch.cat(kept) if kept else None)


# ----------------------------------------------------------------------------------------------------------------
# False positives: the smallest measurement change that makes a feature appear
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FalsePositiveResult:
    """Per (image, budget) records (:data:`FALSE_POSITIVE_COLUMNS`, without ``model``).

    ``appearance``: ``1 − ‖T ⊙ (x̂(e) − x̂(0) − φ)‖² / ‖T ⊙ φ‖²`` of the best perturbation within ``budget``;
    ``success``: ``appearance ≥ threshold``; ``honest_budget``: the relative norm of the feature's own measurement
    change; ``honest_appearance``: the appearance when the measurements change by exactly that (the network shown a
    real feature); ``row``, ``col``, ``intensity``: the feature (pixels, data units).
    """

    rows: list[dict[str, Any]]
    images: dict[str, Tensor] = field(default_factory=dict)

    def records(self, model: str) -> list[dict[str, Any]]:
        return [{"model": model, **r} for r in self.rows]


@dataclass
class FalsePositiveAttack:
    """Make a chosen feature appear in the reconstruction with the smallest measurement perturbation.

    Args:
        sampler: the feature (family, size and intensity ranges; a disc by default), drawn per image and keyed by
            (seed, image, acceleration) like FNAF's candidates.
        region: where the feature is placed.
        budgets: the ladder of relative budgets searched (each gets its own PGD run).
        steps, step_factor: PGD settings per budget.
        threshold: the appearance at which the feature counts as present (0.5).
        dilation: pixels by which the feature's support is dilated into ``T``.
        normalization: ``"perturbed"`` or ``"clean"``.
        chunk_size: most (image, budget) items per network call.
        seed: keys the features.
        keep_images: return CPU images of the smallest successful (else the largest-budget) attack per image:
            ``truth``, ``clean_output``, ``output``, ``feature`` ``(B, 1, h, w)``.
    """

    sampler: FeatureSampler = FeatureSampler("disc")
    region: Region = Region()
    budgets: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05)
    steps: int = 10
    step_factor: float = 2.5
    threshold: float = 0.5
    dilation: int = 3
    normalization: str = "perturbed"
    chunk_size: int = 32
    seed: int = 0
    keep_images: bool = False

    def __post_init__(self) -> None:
        _check(self.normalization, tuple(self.budgets), self.steps, self.chunk_size)
        if not 0 < self.threshold <= 1:
            raise BlindspotError(None, f"the appearance threshold must be in (0, 1], got {self.threshold}")

    def __call__(self, model: "nn.Module | Network", batch: Any, physics: Any = None) -> FalsePositiveResult:
        net = as_network(model)
        with eval_mode(net.module):
            with torch.no_grad():
                ctx = prepare_measurements(net, batch, physics, self.seed, self.region)
            return self.run(net, ctx)

    def features(self, ctx: AttackContext) -> tuple[Tensor, Tensor, Any]:
        """``(φ, T, features)``: the feature of every image in the data's units ``(B, 1, h, w)`` on the truth's grid,
        its neighbourhood on the network's grid, and its parameters."""
        keys = candidate_keys(_feature_stream(ctx.image_keys), range(1))
        feats = self.sampler.sample(keys, ctx.region, ctx.dynamic_range)
        values, support = feats.render(ctx.shape)
        return values, ctx.acquisition.crop_image(neighbourhood(support, self.dilation)), feats

    def run(self, net: Network, ctx: AttackContext) -> FalsePositiveResult:
        B, nb = len(ctx), len(self.budgets)
        dev = ctx.device
        acq = ctx.acquisition
        phi, T, feats = self.features(ctx)
        phi_net = acq.crop_image(phi)
        x0 = clean_output(ctx)
        den = (T * phi_net).square().flatten(1).sum(1).clamp_min(1e-30)

        def appearance(out: Tensor, i: Tensor) -> Tensor:
            miss = T.index_select(0, i) * (out - x0.index_select(0, i) - phi_net.index_select(0, i))
            return 1.0 - miss.square().flatten(1).sum(1) / den.index_select(0, i)

        scale = acq.measurement_scale(ctx.measurement).detach()
        with torch.no_grad():
            honest = acq.measurement_vector(acq.perturb(ctx.measurement, phi)) - acq.measurement_vector(ctx.measurement)
            honest = acq.project_measurements(honest)
            all_i = torch.arange(B, device=dev)
            honest_app = appearance(reconstruct(net, Items.of(ctx, all_i), honest, self.normalization), all_i)
        honest_rel = _norm(honest) / scale.clamp_min(1e-30)
        img = all_i.repeat_interleave(nb)
        eps = torch.tensor(self.budgets, device=dev, dtype=torch.float32).repeat(B)
        radius = eps * scale.index_select(0, img).to(torch.float32)
        app = torch.empty(B * nb, device=dev)
        best_all = []
        for s in range(0, B * nb, self.chunk_size):
            sl = slice(s, min(B * nb, s + self.chunk_size))
            i, r = img[sl], radius[sl]

            items = Items.of(ctx, i)

            def objective(e: Tensor, i: Tensor = i, items: Items = items) -> tuple[Tensor, Tensor]:
                out = reconstruct(net, items, e, self.normalization)
                return appearance(out, i), out

            # start along the feature's own measurement change (scaled into the ball)
            _, best_v, best_out = pgd_l2(objective, honest.index_select(0, i), r, self.steps, self.step_factor,
                                         items.acquisition.project_measurements)
            app[sl] = best_v
            if self.keep_images:
                best_all.append(best_out.cpu())
        app_h = app.reshape(B, nb).cpu()
        ok = app_h >= self.threshold
        rows = []
        ident = _identity(ctx)
        centers = feats.center.cpu().tolist()
        for im in range(B):
            for b in range(nb):
                rows.append({**ident[im], "budget": float(self.budgets[b]), "appearance": float(app_h[im, b]),
                             "success": bool(ok[im, b]), "honest_budget": float(honest_rel[im]),
                             "honest_appearance": float(honest_app[im]), "row": float(centers[im][0]),
                             "col": float(centers[im][1]), "intensity": float(feats.intensity[im])})
        images: dict[str, Tensor] = {}
        if self.keep_images and best_all:
            outs = torch.cat(best_all).reshape(B, nb, *best_all[0].shape[1:])
            pick = torch.tensor([int(torch.nonzero(ok[im]).min()) if ok[im].any() else nb - 1 for im in range(B)])
            images = {"truth": acq.crop_image(ctx.target).cpu(), "clean_output": x0.cpu(),
                      "output": outs[torch.arange(B), pick], "feature": phi_net.cpu(),
                      "budget": torch.tensor([self.budgets[int(p)] for p in pick])}
        return FalsePositiveResult(rows, images)


def _feature_stream(image_keys: Tensor) -> Tensor:
    """The false-positive feature's stream of image keys (distinct from FNAF's candidate streams)."""
    return candidate_keys(image_keys, [0x46505F])[:, 0]  # "FP_": a stream of its own


__all__ = ["FALSE_POSITIVE_COLUMNS", "WORST_CASE_COLUMNS", "FalsePositiveAttack",
           "FalsePositiveResult", "Items", "WorstCasePGD", "WorstCaseResult", "clean_output", "pgd_l2",
           "prepare_measurements", "reconstruct"]
