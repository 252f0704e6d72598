"""FNAF searches: random search (RS), finite differences (FD), gradient ascent, and replay of saved features.

Each search is an object configured once and called on ``(model, batch, physics)``; it returns a
:class:`~blindspot.attacks.records.FnafResult` with the best feature of every image (accepted features first, then the
highest score — ``L_atk`` for the ``seed`` criterion, ``1 − recovery`` for ``recovery``).

Candidates are processed in chunks of at most ``chunk_size``: a chunk is rendered, acquired, normalised, reconstructed
and scored as one batch on the model's device, so memory is bounded by the chunk and the cost is the network's.

Candidate ``j`` of an image is a function of (seed, image identity, acceleration, ``j``) only
(:func:`~blindspot.attacks.features.candidate_keys`): results do not depend on batch size, chunk size or on how a run
was interrupted, and RS with more candidates evaluates a superset of the candidates of RS with fewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor, nn

from blindspot.attacks.features import Features, FeatureSampler, Region, candidate_keys
from blindspot.attacks.fnaf import EVALUATION_FIELDS, AttackContext, Evaluation, FnafObjective, subset_batch
from blindspot.attacks.records import FnafResult, SavedFeatures
from blindspot.errors import BlindspotError
from blindspot.models.adapters import Network, as_network, eval_mode

SEARCHES: tuple[str, ...] = ("rs", "fd", "grad")
_BOOL_FIELDS = ("accepted", "lost_seed", "lost_recovery")



class _Best:
    """Running best candidate per image (selection key, parameters, scores, optionally the feature image)."""

    def __init__(self, n_images: int, device: torch.device):
        self.key = torch.full((n_images,), -math.inf, dtype=torch.float64, device=device)
        self.features: Features | None = None
        self.ev: Evaluation | None = None
        self.values: Tensor | None = None
        self.support: Tensor | None = None

    def update(self, features: Features, ev: Evaluation, per_image: int, values: Tensor | None = None,
               support: Tensor | None = None) -> None:
        """Offer ``B·per_image`` candidates laid out image-major; ties keep the earlier candidate."""
        B = self.key.shape[0]
        key = ev.selection_key().reshape(B, per_image)
        j = key.argmax(1)  # first maximum
        k = key.gather(1, j[:, None])[:, 0]
        cand = torch.arange(B, device=key.device) * per_image + j
        f, e = features[cand], ev.index(cand).map(Tensor.detach)
        v = None if values is None else values[cand].detach()
        s = None if support is None else support[cand]
        if self.features is None:
            self.key, self.features, self.ev, self.values, self.support = k, f, e, v, s
            return
        better = k > self.key
        self.key = torch.where(better, k, self.key)
        self.features = f.where(better, self.features)
        self.ev = Evaluation.where(better, e, self.ev)
        if v is not None and self.values is not None:
            b4 = better.reshape(-1, 1, 1, 1)
            self.values = torch.where(b4, v, self.values)
            self.support = torch.where(b4, s, self.support)


@dataclass
class Search:
    """Base of the FNAF searches.

    Args:
        sampler: the feature family and its size / intensity ranges.
        objective: losses, criteria and thresholds.
        region: where features are centred.
        chunk_size: most candidates per model call (bounds memory).
        seed: the run's seed; the same seed gives the same records.
    """

    sampler: FeatureSampler = FeatureSampler()
    objective: FnafObjective = FnafObjective()
    region: Region = Region()
    chunk_size: int = 64
    seed: int = 0

    name = "search"

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise BlindspotError(None, f"chunk size must be >= 1, got {self.chunk_size}")

    def __call__(self, model: "nn.Module | Network", batch, physics=None) -> FnafResult:
        """Attack every image of ``batch``.

        Args:
            model: any network, MRI or CT (an ``nn.Module`` in its declared convention, or a
                :class:`~blindspot.models.adapters.Network`); run in eval mode, its mode restored afterwards.
            batch: the truths (:func:`~blindspot.attacks.fnaf.as_truths`: an MRI or CT batch, or ``Truths``).
            physics: the acquisition (:func:`~blindspot.attacks.fnaf.attack_acquisition`): an ``Acquisition``, or
                for MRI a mask function (drawn per image, seeded by file name), an operator or mask, or ``None`` for
                the batch's own masks.
        """
        net = as_network(model)
        with eval_mode(net.module):
            return self.run(net, self.prepare(net, batch, physics))

    def prepare(self, model: "nn.Module | Network", batch, physics=None) -> AttackContext:
        """The batch's :class:`~blindspot.attacks.fnaf.AttackContext` for this search (``batch`` and ``physics`` as
        in ``__call__``). Searches with equal :meth:`context_key` may share one context, and with it the clean
        reference ``f(N(A(y)))`` that the first of them computes."""
        return self.objective.prepare(as_network(model), batch, physics, self.region, self.seed, self.sampler.reach)

    def context_key(self) -> tuple:
        """What :meth:`prepare` depends on besides the batch and the acquisition: equal keys, equal contexts. The
        criterion does not enter a context (only whether it needs the clean reference), so searches under both
        criteria share one."""
        o, r = self.objective, self.region
        return (replace(o, criterion="seed", reference=o.uses_reference), r.kind, r.fraction, r.threshold, id(r.mask),
                self.seed, self.sampler.reach)

    def run(self, model: nn.Module, ctx: AttackContext) -> FnafResult:  # pragma: no cover - abstract
        raise NotImplementedError

    # helpers ------------------------------------------------------------------------------------------------------
    def sample(self, ctx: AttackContext, indices: range) -> Features:
        """Candidates ``indices`` of every image: ``B·len(indices)`` features, image-major."""
        keys = candidate_keys(ctx.image_keys, torch.arange(indices.start, indices.stop, dtype=torch.int64))
        return self.sampler.sample(keys, ctx.region, ctx.dynamic_range)

    def score(self, model: nn.Module, ctx: AttackContext, image_idx: Tensor, features: Features | None = None,
              values: Tensor | None = None, support: Tensor | None = None) -> Evaluation:
        """Score candidates chunk by chunk without gradients: ``features`` (rendered one chunk at a time, so memory
        stays at one chunk's images) or already rendered ``values`` / ``support`` ``(C, 1, h, w)``."""
        n = len(features) if features is not None else values.shape[0]
        out = []
        for s in range(0, n, self.chunk_size):
            e = s + self.chunk_size
            v, m = features[s:e].render(ctx.shape) if features is not None else (values[s:e], support[s:e])
            with torch.no_grad():
                out.append(self.objective.evaluate(model, ctx, image_idx[s:e], v, m).map(Tensor.detach))
        return Evaluation.cat(out)

    def allowed_max(self, ctx: AttackContext) -> Tensor:
        """Upper bound of feature intensities per image ``(B,)``: the sampler's ``hi`` (× the dynamic range unless
        the sampler's intensities are absolute)."""
        return self.sampler.intensities[1] * self.sampler.unit(ctx.dynamic_range)

    def result(self, ctx: AttackContext, best: _Best, queries: int, gradients: int = 0) -> FnafResult:
        """The search's outcome: ``best`` per image of ``ctx``, after ``queries`` model queries per image (plus the
        clean reference) and ``gradients`` backward passes."""
        B = len(ctx)
        values, support = (best.values, best.support) if best.values is not None else best.features.render(ctx.shape)
        return FnafResult(
            search=self.name,
            criterion=self.objective.criterion,
            keys=list(ctx.keys),
            fname=list(ctx.fname),
            slice_num=list(ctx.slice_num),
            acceleration=ctx.acceleration,
            features=best.features,
            feature=values,
            support=support,
            evaluation=best.ev,
            queries=torch.full((B,), queries + ctx.reference_queries, dtype=torch.int64),
            gradients=torch.full((B,), gradients, dtype=torch.int64),
            loss_threshold=self.objective.effective_loss_threshold(ctx.shape),
            ip_threshold=self.objective.ip_cut(ctx.acquisition),
            modality=ctx.acquisition.modality,
        )


@dataclass
class RandomSearch(Search):
    """RS: ``n_candidates`` random features per image, keep the worst case (the seed evaluates with 11)."""

    n_candidates: int = 11
    name = "rs"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_candidates < 1:
            raise BlindspotError(None, f"RS needs at least 1 candidate, got {self.n_candidates}")

    def run(self, model: nn.Module, ctx: AttackContext) -> FnafResult:
        n, B = self.n_candidates, len(ctx)
        feats = self.sample(ctx, range(n))
        # the candidates and their scores do not depend on the criterion: RS under both shares one set of model calls
        shared_key = ("rs", n, self.sampler, replace(self.objective, criterion="seed"), self.chunk_size)
        ev = ctx.shared.get(shared_key)
        if ev is None:
            idx = torch.arange(B, device=ctx.device).repeat_interleave(n)
            ev = ctx.shared[shared_key] = self.score(model, ctx, idx, feats)
        ev = self.objective.rescore(ev)
        best = _Best(B, ctx.device)
        best.update(feats, ev, n)
        return self.result(ctx, best, queries=n)


@dataclass
class FiniteDifferenceSearch(Search):
    """FD: finite-difference ascent on the feature's location (and its intensity), from ``restarts`` random starts.

    Each iteration probes every coordinate at ``±step/2`` (central differences), then moves the location by
    ``move`` pixels along the normalised gradient (locations are kept inside the image's region: a step that would
    leave it is not taken) and the intensity by a factor ``exp(±intensity_step)`` (sign
    ascent in log-intensity, kept within ``(0, hi × range]``). Every probe is itself a candidate; the best of all
    is kept. The intensity is searched only when ``"intensity"`` is in ``coordinates`` and the family's intensity
    range is not a single value (the seed's walk has its per-pixel values drawn from the image's range, so the
    default FD on walks is the seed's: location only, 2 iterations, 11 queries per image).

    Args:
        iterations: ascent steps (seed: 2).
        restarts: random starting features per image.
        location_step: probe spacing in pixels (``None`` → 10 px at 320 px, scaled with the image, at least 1).
        move: pixels moved per iteration (``None`` → twice the probe spacing).
        intensity_step: log-intensity probe spacing and step.
        coordinates: any of ``"location"`` and ``"intensity"``.
    """

    iterations: int = 2
    restarts: int = 1
    location_step: float | None = None
    move: float | None = None
    intensity_step: float = 0.25
    coordinates: tuple[str, ...] = ("location", "intensity")
    name = "fd"

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = set(self.coordinates) - {"location", "intensity"}
        if bad or not self.coordinates:
            raise BlindspotError(None, f"FD coordinates must be location and/or intensity, got {self.coordinates}")
        if self.iterations < 0 or self.restarts < 1:
            raise BlindspotError(None, "FD needs iterations >= 0 and restarts >= 1")

    def _coords(self) -> list[str]:
        out = []
        if "location" in self.coordinates:
            out += ["row", "col"]
        lo, hi = self.sampler.intensities
        if "intensity" in self.coordinates and hi > lo:
            out.append("intensity")
        return out

    @staticmethod
    def _region_boxes(region: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image bounding boxes of the allowed centres: ``(lo, hi)``, each float ``(B, 2)`` (row, col)."""
        h, w = region.shape[-2:]
        rows, cols = region.any(2), region.any(1)  # (B, h), (B, w)
        ar_h = torch.arange(h, device=region.device, dtype=torch.float32)
        ar_w = torch.arange(w, device=region.device, dtype=torch.float32)
        big = float(max(h, w))
        lo = torch.stack([torch.where(rows, ar_h, big).amin(1), torch.where(cols, ar_w, big).amin(1)], 1)
        hi = torch.stack([torch.where(rows, ar_h, -1.0).amax(1), torch.where(cols, ar_w, -1.0).amax(1)], 1)
        return lo, hi

    def run(self, model: nn.Module, ctx: AttackContext) -> FnafResult:
        B, r = len(ctx), self.restarts
        h, w = ctx.shape
        dev = ctx.device
        lo, hi = self._region_boxes(ctx.region)
        lo, hi = lo.repeat_interleave(r, 0), hi.repeat_interleave(r, 0)

        rows_img = torch.arange(B, device=dev).repeat_interleave(r)

        def inside(f: Features, prev: Features) -> Features:
            """Centres clamped to the region's box; one whose pixel is outside the region (e.g. a CT field of
            view's margin) stays where it was (``prev``)."""
            c = torch.maximum(torch.minimum(f.center, hi), lo)
            pix = c.round().long()
            ok = ctx.region[rows_img, pix[:, 0].clamp(0, h - 1), pix[:, 1].clamp(0, w - 1)]
            return replace(f, center=torch.where(ok[:, None], c, prev.center))

        step = self.location_step if self.location_step is not None else max(1.0, 10.0 * min(h, w) / 320.0)
        move = self.move if self.move is not None else 2.0 * step
        coords = self._coords()
        k = len(coords)
        cur = self.sample(ctx, range(r))  # (B·r)
        img = torch.arange(B, device=dev).repeat_interleave(r)
        vmax = self.allowed_max(ctx).repeat_interleave(r)
        vmin = 1e-3 * vmax
        best = _Best(B, dev)
        ev = self.score(model, ctx, img, cur)
        best.update(cur, ev, r)
        queries = r
        for _ in range(self.iterations):
            if k == 0:
                break
            # probes, ordered (image, restart, coordinate, sign)
            probes = []
            for c in coords:
                for sign in (-1.0, 1.0):
                    if c == "intensity":
                        probes.append(cur.with_intensity((cur.intensity * math.exp(sign * self.intensity_step / 2))
                                                         .clamp(vmin, vmax)))
                    else:
                        off = torch.zeros(len(cur), 2, device=dev)
                        off[:, 0 if c == "row" else 1] = sign * step / 2
                        probes.append(inside(cur.moved(off, (h, w)), cur))
            stacked = Features.cat(probes)  # (2k·B·r) ordered (probe, image, restart)
            order = torch.arange(len(stacked), device=dev).reshape(2 * k, B * r).t().reshape(-1)
            stacked = stacked[order]  # (image, restart, probe)
            ev_p = self.score(model, ctx, img.repeat_interleave(2 * k), stacked)
            best.update(stacked, ev_p, r * 2 * k)
            s = torch.nan_to_num(ev_p.score, nan=0.0).reshape(B * r, k, 2)
            grad = (s[..., 1] - s[..., 0])  # (B·r, k): differences over the probe spacing
            nxt = cur
            if "row" in coords:
                g = grad[:, :2] / step
                norm = g.norm(dim=1, keepdim=True)
                direction = torch.where(norm > 0, g / norm.clamp_min(1e-30), torch.zeros_like(g))
                nxt = inside(nxt.moved(direction * move, (h, w)), nxt)
            if "intensity" in coords:
                gi = grad[:, coords.index("intensity")]
                nxt = nxt.with_intensity((nxt.intensity * torch.exp(torch.sign(gi) * self.intensity_step))
                                         .clamp(vmin, vmax))
            cur = nxt
            ev = self.score(model, ctx, img, cur)
            best.update(cur, ev, r)
            queries += r * (2 * k + 1)
        return self.result(ctx, best, queries=queries)


@dataclass
class GradientSearch(Search):
    """Gradient ascent on the feature's pixel intensities inside its support, through the differentiable physics and
    model, projected onto ``[0, hi × range]`` (signed steps: projected gradient ascent under a box constraint).

    The support (shape and place) is what the gradient cannot move, and it matters most (a 90-pixel walk beats a
    15-pixel one at any intensity), so the search first picks the best of ``init_candidates`` random features (RS)
    and then spends the rest of its budget on ``steps`` ascent steps of ``step_size × hi × range``, evaluating the last
    iterate too. Queries per image: ``init_candidates`` (when > 1) ``+ steps + 1`` — the defaults (4 + 6 + 1) match
    RS with the seed's 11 candidates — and ``steps`` backward passes. Every iterate is a candidate; the best is kept.
    """

    steps: int = 6
    step_size: float = 0.2
    init_candidates: int = 4
    name = "grad"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 0 or self.init_candidates < 1 or self.step_size <= 0:
            raise BlindspotError(None, "gradient search needs steps >= 0, init_candidates >= 1 and step_size > 0")

    def run(self, model: nn.Module, ctx: AttackContext) -> FnafResult:
        B, n = len(ctx), self.init_candidates
        dev = ctx.device
        queries = 0
        init = self.sample(ctx, range(n))
        if n > 1:
            ev = self.score(model, ctx, torch.arange(B, device=dev).repeat_interleave(n), init)
            pick = _Best(B, dev)
            pick.update(init, ev, n)
            start = pick.features
            queries += n
        else:
            start = init
        vmax_all = self.allowed_max(ctx)
        best = _Best(B, dev)
        for s in range(0, B, self.chunk_size):
            idx = torch.arange(s, min(B, s + self.chunk_size), device=dev)
            f = start[idx]
            values, support = f.render(ctx.shape)
            sup = support.to(values.dtype)
            vmax = vmax_all[idx].reshape(-1, 1, 1, 1)
            v = values.detach()
            chunk_best = _Best(len(idx), dev)
            for t in range(self.steps + 1):
                last = t == self.steps
                with torch.set_grad_enabled(not last):
                    var = v.clone().requires_grad_(not last)
                    ev = self.objective.evaluate(model, ctx, idx, var * sup, support)
                    if not last:
                        (g,) = torch.autograd.grad(ev.score.sum(), var)
                chunk_best.update(f, ev, 1, values=v * sup, support=support)
                if not last:
                    v = torch.minimum((v + self.step_size * vmax * torch.sign(g) * sup).clamp_min(0.0), vmax).detach()
            if best.features is None:
                best = chunk_best
            else:
                best.key = torch.cat([best.key, chunk_best.key])
                best.features = Features.cat([best.features, chunk_best.features])
                best.ev = Evaluation.cat([best.ev, chunk_best.ev])
                best.values = torch.cat([best.values, chunk_best.values])
                best.support = torch.cat([best.support, chunk_best.support])
        queries += self.steps + 1
        return self.result(ctx, best, queries=queries, gradients=self.steps)


@dataclass
class ReplaySearch(Search):
    """Replay saved features (found against another model) on this model: the transferability experiment.

    Args:
        saved: features loaded with :func:`~blindspot.attacks.records.load_features`.
        source_search: which search's features to replay (``None``: the only one saved).

    Images without a saved feature (for their key and acceleration) are left out of the result.
    """

    saved: SavedFeatures | None = None
    source_search: str | None = None
    name = "replay"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.saved is None or len(self.saved) == 0:
            raise BlindspotError(None, "nothing to replay: no saved features")
        searches = self.saved.searches()
        if self.source_search is None:
            if len(searches) != 1:
                raise BlindspotError(None, f"saved features come from several searches ({', '.join(searches)}); "
                                           "choose one")
            self.source_search = searches[0]
        elif self.source_search not in searches:
            raise BlindspotError(None, f"no saved features from search {self.source_search!r} "
                                       f"(saved: {', '.join(searches)})")
        self.name = f"replay-{self.source_search}"

    def entries(self, ctx: AttackContext) -> tuple[list[int], Features | None, Tensor | None, Tensor | None]:
        """The saved features of the images of ``ctx``: ``(kept image indices, parameters, values, support)``, the
        last three ``None`` when no image has one; values ``(n, 1, h, w)`` and support on the context's device."""
        found = [self.saved.get(k, a, self.source_search) for k, a in zip(ctx.keys, ctx.acceleration.tolist())]
        keep = [i for i, e in enumerate(found) if e is not None]
        entries = [found[i] for i in keep]
        if not entries:
            return keep, None, None, None
        families = {e.family for e in entries}
        if len(families) != 1:
            raise BlindspotError(None, f"saved features mix families {sorted(families)}")
        for e in entries:
            if tuple(e.feature.shape[-2:]) != ctx.shape:
                raise BlindspotError(e.key, f"saved feature is {tuple(e.feature.shape[-2:])} but the image is "
                                            f"{ctx.shape}")
        dev = ctx.device
        values = torch.stack([e.feature for e in entries]).to(dev)
        support = torch.stack([e.support for e in entries]).to(dev)
        p = {name: torch.stack([e.params[name] for e in entries]).to(dev) for name in entries[0].params}
        feats = Features(entries[0].family, p["center"], p["size"], p["angle"], p["intensity"], p["seed"])
        return keep, feats, values, support

    def finish(self, ctx: AttackContext, keep: list[int], feats: Features | None, values: Tensor | None,
               support: Tensor | None, ev: Evaluation | None) -> FnafResult:
        """The result of the replayed features (:meth:`entries`) scored as ``ev`` (one candidate per kept image)."""
        sub = ctx.subset(keep)
        dev = ctx.device
        best = _Best(len(keep), dev)
        if feats is None:
            best.features = Features("walk", *(torch.zeros(0, 2, device=dev),) * 2, torch.zeros(0, device=dev),
                                     torch.zeros(0, device=dev), torch.zeros(0, dtype=torch.int64, device=dev))
            best.ev = Evaluation(**{k: torch.zeros(0, device=dev, dtype=torch.bool if k in _BOOL_FIELDS else None)
                                    for k in EVALUATION_FIELDS})
            best.values = torch.zeros(0, 1, *ctx.shape, device=dev)
            best.support = best.values.bool()
            return self.result(sub, best, queries=1)
        best.update(feats, ev, 1, values, support)  # one candidate per image: it is the result
        return self.result(sub, best, queries=1)

    def run(self, model: nn.Module, ctx: AttackContext) -> FnafResult:
        keep, feats, values, support = self.entries(ctx)
        ev = None
        if feats is not None:
            ev = self.score(model, ctx, torch.tensor(keep, dtype=torch.long, device=ctx.device), values=values,
                            support=support)
        return self.finish(ctx, keep, feats, values, support, ev)


def replay_together(model: "nn.Module | Network", ctx: AttackContext,
                    replays: Sequence[ReplaySearch]) -> list[FnafResult]:
    """Several replays on one batch (e.g. the features of every source network, search and criterion of an audit)
    scored in shared model calls of at most the first replay's ``chunk_size`` candidates: what each
    ``replay.run(model, ctx)`` returns, up to floating-point batching. Replays whose objectives differ in more than the
    criterion are scored separately (the criterion only changes the ``score`` each evaluation carries)."""
    net = as_network(model)
    found = [r.entries(ctx) for r in replays]
    groups: dict[FnafObjective, list[int]] = {}
    for j, r in enumerate(replays):
        if found[j][1] is not None:
            o = r.objective
            groups.setdefault(replace(o, criterion="seed", reference=o.uses_reference), []).append(j)
    evs: dict[int, Evaluation] = {}
    for objective, js in groups.items():
        first = replays[js[0]]
        idx = torch.cat([torch.tensor(found[j][0], dtype=torch.long) for j in js]).to(ctx.device)
        values = torch.cat([found[j][2] for j in js])
        support = torch.cat([found[j][3] for j in js])
        ev = replace(first, objective=objective).score(net, ctx, idx, values=values, support=support)
        start = 0
        for j in js:
            n = len(found[j][0])
            e = ev.index(slice(start, start + n))
            start += n
            if replays[j].objective.criterion != "seed":
                e = replace(e, score=1.0 - e.recovery)
            evs[j] = e
    return [r.finish(ctx, *found[j], evs.get(j)) for j, r in enumerate(replays)]


def check_searches(names: Sequence[str]) -> None:
    """A one-line error unless ``names`` is a non-empty list of known searches (:data:`SEARCHES`)."""
    bad = [s for s in names if s not in SEARCHES]
    if bad or not names:
        raise BlindspotError(None, f"unknown search {bad[0] if bad else ''!r}; choose from {', '.join(SEARCHES)}")


def build_search(name: str, **kwargs) -> Search:
    """A search by name (``rs``, ``fd``, ``grad``) with its keyword configuration."""
    classes = {"rs": RandomSearch, "fd": FiniteDifferenceSearch, "grad": GradientSearch}
    if name not in classes:
        raise BlindspotError(None, f"unknown search {name!r}; choose from {', '.join(SEARCHES)}")
    return classes[name](**kwargs)


def example_images(
    model: "nn.Module | Network",
    batch,
    physics,
    result: FnafResult,
    objective: FnafObjective,
    which: list[int],
    seed: int = 0,
) -> list[dict]:
    """The images behind some records, for figures: re-runs the chosen features (one query each, plus the clean
    reference) and returns, per record, CPU tensors ``(h, w)`` ``input`` ``N(x')``, ``truth`` ``N(y')``, ``output``
    ``f(N(x'))``, ``clean_output``, ``feature`` ``δ'/σ`` and ``T``, with the record's ``key`` and scores; ``seed`` is
    the run's (it keys a simulated CT input's noise)."""
    if not which:
        return []
    net = as_network(model)
    pos = [batch.keys.index(result.keys[i]) for i in which]
    obj = replace(objective, reference=True)
    with eval_mode(net.module), torch.no_grad():
        ctx = obj.prepare(net, subset_batch(batch, pos), physics, seed=seed)
        feat = result.feature[which].to(ctx.device)
        sup = result.support[which].to(ctx.device)
        ev = obj.evaluate(net, ctx, torch.arange(len(which), device=ctx.device), feat, sup, return_images=True)
        scaled = ctx.stats.scale(feat)
        display = ctx.acquisition.display_range(ctx.stats)
    out = []
    for j, i in enumerate(which):
        extra = {} if display is None else {"display": display[j].cpu()}
        out.append({**extra,
            "key": result.keys[i],
            "input": ev.images["input"][j, 0].cpu(),
            "truth": ev.images["truth"][j, 0].cpu(),
            "output": ev.images["output"][j, 0].cpu(),
            "clean_output": ctx.clean_output[j, 0].cpu(),
            "feature": scaled[j, 0].cpu(),
            "T": ev.images["T"][j, 0].cpu(),
            "attack_loss": float(ev.attack_loss[j]),
            "recovery": float(ev.recovery[j]),
            "ip_loss": float(ev.ip_loss[j]),
        })
    return out
