"""FNAF-robust training (DESIGN.md §1.2): the seed's min-max recipe, ``E[max_δ L(θ, x + δ, y + δ')]`` — training
pairs whose truth carries a feature drawn, or searched, on the fly, so that the worst case is part of the training
distribution — with the FNAF attack loss on the feature's neighbourhood added.

At every feature step, for a seeded share ``fraction`` of the batch's images:

1. features are drawn exactly as the attack draws them (:class:`~blindspot.attacks.features.FeatureSampler` over the
   attack's :class:`~blindspot.attacks.features.Region`, intensities in each truth's own range), cycling through the
   configured ``families``; walks have the seed's robust-training lengths, 10–99 steps
   (:data:`~blindspot.attacks.features.SEED_TRAINING_WALK_STEPS`; ``walk_steps``);
2. optionally the worst of ``candidates`` random features is kept, by the attack's own
   :class:`~blindspot.attacks.search.RandomSearch` (scored with the model in eval mode and no parameter gradients),
   or refined by ``grad_steps`` signed gradient steps on its pixel intensities inside its support by the attack's
   :class:`~blindspot.attacks.search.GradientSearch` (the best iterate kept);
3. those images' pairs are **replaced** in the batch by the perturbed pairs ``(N(A(y + δ')), N(y + δ'))``, normalised
   as the attack normalises them (:meth:`~blindspot.attacks.fnaf.FnafObjective.perturbed_input`), and the batch goes
   through the network in one call of the usual batch size — no forward or backward beyond a standard step's; the
   loss is ``usual(mixed batch) + weight · L_atk(perturbed rows)`` with ``L_atk = mean((T ⊙ (f(N(x')) − N(y')))²)``
   on the feature's neighbourhood ``T`` — the attack's own definition
   (:meth:`~blindspot.attacks.fnaf.FnafObjective.evaluate`).

``mixing`` chooses the feature steps: ``"batch"`` (default) — every step, the chosen share of each batch is replaced;
``"alternate"`` — the seed's mixing, a clean step (the usual loss on the unchanged batch) then a feature step, in turn
(use ``fraction=1`` for the seed's all-perturbed feature steps). The only cost beyond a standard step is the search's
scoring (``rs``: ``candidates`` forward passes without gradients per chosen image; ``draw``: none) and the
acquisition of the features (FFTs).

Every random draw is keyed by (run seed, step, image identity), so a run is reproducible and resumes exactly, on
one process or under ``torchrun``.

Python API::

    from blindspot.training.robust import RobustConfig, fnaf_robust_loss
    from blindspot.training.mri import mri_loss
    loss_fn = fnaf_robust_loss(mri_loss("l1"), RobustConfig(fraction=0.5, weight=1.0, search="rs", candidates=4))
    train_mri(model, "unet", hparams, train_set, val_set, config, "runs/robust", loss_fn=loss_fn)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from blindspot.attacks.features import CENTER_FRACTION, FAMILIES, SEED_TRAINING_WALK_STEPS, FeatureSampler, Region
from blindspot.attacks.search import GradientSearch, RandomSearch, Search
from blindspot.attacks.fnaf import AttackContext, FnafObjective, subset_batch
from blindspot.data.sample import MRIBatch
from blindspot.errors import BlindspotError
from blindspot.models.adapters import as_network, eval_mode, network_convention, reconstruct
from blindspot.physics.mri import NormStats, mask_on_grid

ROBUST_SEARCHES: tuple[str, ...] = ("draw", "rs", "grad")
#: Which steps carry FNAF examples: every step (``batch``) or every other one, after a clean step (``alternate``).
ROBUST_MIXINGS: tuple[str, ...] = ("batch", "alternate")


@dataclass
class RobustConfig:
    """How FNAF examples are made during training.

    Attributes:
        fraction: share of each batch's images that also get an FNAF example (at least one image when > 0).
        families: feature families, cycled over the chosen images (see :data:`blindspot.attacks.features.FAMILIES`).
        weight: weight of the attack loss added to the usual loss.
        search: ``"draw"`` (one random feature), ``"rs"`` (worst of ``candidates``) or ``"grad"`` (worst of
            ``candidates`` then ``grad_steps`` signed gradient steps on the feature's intensities).
        candidates: random features scored per image for ``rs`` / ``grad``.
        grad_steps: gradient steps for ``grad``.
        grad_step_size: step as a fraction of the largest allowed intensity.
        dilation: pixels by which the support is dilated into ``T`` (as the attack).
        region_fraction: side of the central crop where features are centred (as the attack; seed: 120/320).
        walk_steps: ``(min, max)`` pixels of a walk (the seed's robust training: 10–99).
        mixing: ``"batch"`` (every step replaces ``fraction`` of the batch by FNAF examples) or ``"alternate"`` (the
            seed's: a clean step, then a feature step).
    """

    fraction: float = 0.5
    families: tuple[str, ...] = ("walk",)
    weight: float = 1.0
    search: str = "rs"
    candidates: int = 4
    grad_steps: int = 2
    grad_step_size: float = 0.2
    dilation: int = 3
    region_fraction: float = CENTER_FRACTION
    walk_steps: tuple[int, int] = SEED_TRAINING_WALK_STEPS
    mixing: str = "batch"

    def __post_init__(self) -> None:
        self.families = tuple(self.families)
        self.walk_steps = (int(self.walk_steps[0]), int(self.walk_steps[1]))
        if not 1 <= self.walk_steps[0] <= self.walk_steps[1]:
            raise BlindspotError(None, f"walk steps must satisfy 1 <= min <= max, got {self.walk_steps}")
        if self.mixing not in ROBUST_MIXINGS:
            raise BlindspotError(None, f"unknown robust mixing {self.mixing!r}; choose from "
                                       f"{', '.join(ROBUST_MIXINGS)}")
        if not 0.0 <= self.fraction <= 1.0:
            raise BlindspotError(None, f"--robust-fraction must lie in [0, 1], got {self.fraction}")
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise BlindspotError(None, f"unknown feature family {bad[0] if bad else ''!r}; choose from "
                                       f"{', '.join(FAMILIES)}")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise BlindspotError(None, f"--robust-weight must be a finite number >= 0, got {self.weight}")
        if self.search not in ROBUST_SEARCHES:
            raise BlindspotError(None, f"unknown robust search {self.search!r}; choose from {', '.join(ROBUST_SEARCHES)}")
        if self.candidates < 1 or self.grad_steps < 0 or self.grad_step_size <= 0 or self.dilation < 0:
            raise BlindspotError(None, "robust training needs candidates >= 1, grad steps >= 0, step size > 0 and "
                                       "dilation >= 0")
        if not 0.0 < self.region_fraction <= 1.0:
            raise BlindspotError(None, f"region fraction must lie in (0, 1], got {self.region_fraction}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["families"] = list(self.families)
        d["walk_steps"] = list(self.walk_steps)
        return d

    def sampler(self, family: str) -> FeatureSampler:
        """The attack's sampler of ``family``, walks with ``walk_steps`` pixels."""
        if family == "walk":
            lo, hi = self.walk_steps
            return FeatureSampler("walk", size_range=((float(lo), float(hi)), (0.0, 0.0)))
        return FeatureSampler(family)

    def feature_step(self, step: int) -> bool:
        """Whether optimisation step ``step`` (0-based) carries FNAF examples."""
        return self.fraction > 0 and (self.mixing == "batch" or step % 2 == 1)


class _Fixed:
    """A stand-in "model" that returns outputs already computed (so the usual loss and the attack loss can reuse one
    joint forward pass through :func:`~blindspot.models.adapters.reconstruct`)."""

    def __init__(self, output: Tensor, uses_mask: bool) -> None:
        self.output, self.uses_mask = output, uses_mask

    def __call__(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if x.shape != self.output.shape:
            raise RuntimeError(f"internal: cached output {tuple(self.output.shape)} for input {tuple(x.shape)}")
        return self.output


@dataclass
class FnafExamples:
    """The FNAF examples of one step.

    Attributes:
        ctx: the attack context of the chosen images (truths, masks, clean-input statistics).
        image_idx: int64 ``(C,)`` rows of ``ctx`` (``C`` = number of chosen images; one feature each).
        feature: ``δ'`` float ``(C, 1, h, w)`` in the image's units (detached).
        support: bool ``(C, 1, h, w)``.
        chosen: int64 ``(C,)`` positions of the chosen images in the batch.
    """

    ctx: AttackContext
    image_idx: Tensor
    feature: Tensor
    support: Tensor
    chosen: Tensor


def make_examples(model: nn.Module, batch: MRIBatch, config: RobustConfig, objective: FnafObjective,
                  generator: torch.Generator, seed: int) -> FnafExamples | None:
    """Draw (and optionally search) one FNAF per chosen image of ``batch``.

    Args:
        model: the bare network (not DDP-wrapped); only run in eval mode, without parameter gradients.
        batch: the training batch (``target`` ``(B, 1, h, w)``; its own masks are the acquisition).
        config: see :class:`RobustConfig`.
        objective: the attack objective (``reference=False``).
        generator: picks the images (a per-step generator, e.g. :attr:`StepContext.generator`).
        seed: keys the feature draws (mix the run seed and the step so every step draws new features).
    Returns:
        :class:`FnafExamples`, or ``None`` when ``fraction`` is 0.
    """
    B = len(batch)
    n = 0 if config.fraction <= 0 else max(1, min(B, round(config.fraction * B)))
    if n == 0:
        return None
    perm = torch.randperm(B, generator=generator, device=generator.device)[:n].sort().values.cpu()
    sub = subset_batch(batch, perm.tolist())
    region = Region("center", fraction=config.region_fraction)
    net = as_network(model)
    ctx = objective.prepare(net, sub, None, region, seed)
    dev, shape = ctx.device, ctx.shape
    values = torch.zeros(n, 1, *shape, device=dev)
    support = torch.zeros(n, 1, *shape, dtype=torch.bool, device=dev)
    with eval_mode(model):
        for j, family in enumerate(config.families):
            rows = torch.arange(j, n, len(config.families), device=dev)  # images of this family
            if len(rows) == 0:
                continue
            sampler = config.sampler(family)
            search = robust_search(config, sampler, objective, region, chunk=len(rows) * config.candidates)
            part = ctx.subset(rows.cpu())
            if search is None:  # "draw": one random feature each, not scored
                v, s = Search(sampler, objective, region).sample(part, range(1)).render(shape)
            else:
                result = search.run(net, part)
                v, s = result.feature, result.support
            values[rows] = v.detach()
            support[rows] = s
    return FnafExamples(ctx, torch.arange(n, device=dev), values, support, perm)


def robust_search(config: RobustConfig, sampler: FeatureSampler, objective: FnafObjective, region: Region,
                  chunk: int) -> Search | None:
    """The attack's own search object that makes a step's examples: RS for ``rs``, the gradient search for ``grad``
    (worst of ``candidates`` random features, then ``grad_steps`` signed steps, the best iterate kept), ``None`` for
    ``draw``."""
    common = dict(sampler=sampler, objective=objective, region=region, chunk_size=max(1, chunk))
    if config.search == "rs":
        return RandomSearch(n_candidates=config.candidates, **common)
    if config.search == "grad":
        return GradientSearch(steps=config.grad_steps, step_size=config.grad_step_size,
                              init_candidates=config.candidates, **common)
    return None


def fnaf_robust_loss(base_loss: Callable, config: RobustConfig, objective: FnafObjective | None = None) -> Callable:
    """Wrap an MRI loss (e.g. :func:`blindspot.training.mri.mri_loss`) into the FNAF-robust loss.

    Args:
        base_loss: ``(model, batch, ctx) -> loss`` or ``(loss, extras)``, calling the model through
            :func:`~blindspot.models.adapters.reconstruct` once on ``batch.normalized()[0]`` and comparing with
            ``batch.stats.apply(batch.target)`` (as :func:`~blindspot.training.mri.mri_loss` does).
        config: :class:`RobustConfig`.
        objective: the attack objective (default: the attack's, ``dilation`` from ``config``, no reference).
    Returns:
        ``loss(model, batch, ctx) -> (usual + weight · L_atk, extras)`` for the
        :class:`~blindspot.training.engine.Trainer`, where ``usual`` is ``base_loss`` on the batch whose chosen rows
        are replaced by their FNAF pairs; extras add ``fnaf_loss`` (mean ``L_atk`` of the examples), ``fnaf_lost``
        (share of accepted examples lost under the seed criterion) and ``base_loss``. Clean steps (``mixing=
        "alternate"``) return ``base_loss`` on the unchanged batch.
    """
    if objective is None:
        objective = FnafObjective(dilation=config.dilation, reference=False, fuse_reference=False)

    def loss_fn(model: nn.Module, batch: MRIBatch, ctx) -> tuple[Tensor, dict[str, Any]]:
        if not config.feature_step(int(ctx.step)):
            return _split(base_loss(model, batch, ctx))
        inner = getattr(model, "module", model)
        seed = (int(ctx.seed) * 1_000_003 + int(ctx.step)) & 0x7FFFFFFF
        ex = make_examples(inner, batch, config, objective, ctx.generator, seed)
        if ex is None:
            return _split(base_loss(model, batch, ctx))
        mixed, mask = perturbed_batch(batch, ex, objective)
        out = reconstruct(model, mixed.stats.apply(mixed.input), mask)  # the step's only forward pass
        flag = network_convention(model) == "image+mask"
        base, extras = _split(base_loss(_Fixed(out, flag), mixed, ctx))
        rows = ex.chosen.to(out.device)
        ev = objective.evaluate(_Fixed(out.index_select(0, rows), flag), ex.ctx, ex.image_idx, ex.feature,
                                ex.support)
        atk = ev.attack_loss.mean()
        extras = dict(extras)
        extras.update({
            "base_loss": base.detach(),
            "fnaf_loss": atk.detach(),
            "fnaf_lost": (ev.success_seed.float().mean()).detach(),
        })
        return base + config.weight * atk, extras

    return loss_fn


def perturbed_batch(batch: MRIBatch, ex: FnafExamples, objective: FnafObjective) -> tuple[MRIBatch, Tensor]:
    """The batch with its chosen rows replaced by their FNAF pairs, and the column masks for the network.

    Row ``ex.chosen[i]`` gets the zero-filled input of ``y + δ'_i`` (data units, on the truth's grid, the attack's
    acquisition), the truth ``y + δ'_i`` and the statistics the attack normalises it with
    (:meth:`~blindspot.attacks.fnaf.FnafObjective.perturbed_input`); the other rows are unchanged.

    Returns:
        ``(mixed batch, masks)`` — the masks on the image's grid as the attack maps them
        (:func:`~blindspot.physics.mri.mask_on_grid`): ``(B, 1, 1, w)`` column masks or ``(B, 1, h, w)`` 2-D masks.
    """
    fctx = ex.ctx
    acq = fctx.acquisition.select(ex.image_idx)
    meas_p, stats_p, _ = objective.perturbed_input(acq, fctx.measurement.select(ex.image_idx),
                                                   fctx.stats.index(ex.image_idx), ex.feature)
    dev = batch.input.device
    rows = ex.chosen.to(dev)
    stats = NormStats(batch.stats.mean.index_copy(0, rows, stats_p.mean.to(batch.stats.mean)),
                      batch.stats.std.index_copy(0, rows, stats_p.std.to(batch.stats.std)), batch.stats.clamp)
    target_p = fctx.target.index_select(0, ex.image_idx) + ex.feature
    mixed = replace(batch, input=batch.input.index_copy(0, rows, meas_p.image.to(batch.input)),
                    target=batch.target.index_copy(0, rows, target_p.to(batch.target)), stats=stats)
    return mixed, mask_on_grid(batch.mask.to(dev), tuple(batch.input.shape[-2:]), len(batch))


def _split(out) -> tuple[Tensor, Mapping[str, Any]]:
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, {}
