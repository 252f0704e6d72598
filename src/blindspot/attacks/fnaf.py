"""The FNAF objective: perturbed truth → physics → normalisation → model → attack loss, recovery and IP.

Notation (DESIGN.md §1.2): ``y`` the truth ``(B, 1, h, w)``, ``δ'`` a feature, ``y' = y + δ'``, ``A`` the
under-sampling (:class:`~blindspot.physics.mri.CartesianUndersampling`, mask drawn for the truth's width and seeded by
the file name), ``N`` the normalisation with the statistics of the *clean* zero-filled input ``A(y)``, ``f`` the model
(called only through :func:`blindspot.models.protocol.reconstruct`), ``T`` the neighbourhood of the feature.

* attack loss ``L_atk = mean_pixels((T ⊙ (f(N(x')) − N(y')))²)`` (whole-image mean, as the seed); lost when ≥ 1e-3.
* recovery ``1 − ‖T ⊙ (f(N(x')) − f(N(A(y))) − δ'/σ)‖² / ‖T ⊙ δ'/σ‖²``; lost when < 0.5.
* IP loss ``mean_pixels((N(x') − N(A(y)))²)``; the feature is in the measurements (accepted) when > 1e-4.

Everything is batched over candidates: ``evaluate`` takes any number of features for any images of the batch and runs
them through physics, model and scoring as one tensor batch on the model's device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from blindspot.attacks.features import Region, neighbourhood, string_key
from blindspot.data.sample import MRIBatch
from blindspot.errors import BlindspotError
from blindspot.models.protocol import reconstruct
from blindspot.physics.mri import CartesianUndersampling, MaskFunc, NormStats, normalize, resample_mask, zero_filled

CRITERIA: tuple[str, ...] = ("seed", "recovery")
#: What each FNAF criterion calls a lost feature (report and terminal headings).
CRITERION_TEXT = {
    "seed": "lost when the attack loss L_atk reaches the seed's 1e-3 (at 320×320, scaled to the image size)",
    "recovery": "lost when the reconstruction keeps less than half of the feature's energy",
}


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of the model's first parameter or buffer (``default`` for a parameter-free model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device(default)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model in eval mode (dropout, batch-norm statistics fixed), restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def attack_masks(batch: MRIBatch, physics: MaskFunc | CartesianUndersampling | Tensor | None) -> tuple[Tensor, Tensor]:
    """The column masks of the attack's acquisition for the truth's width ``w``.

    Args:
        batch: the images; only ``target`` ``(B, 1, h, w)``, ``fname`` and ``mask`` are used.
        physics: a mask function (drawn per image with ``mask_func(w, seed=fname)``, as fastMRI seeds by volume), an
            operator or a mask tensor (``(w,)``, ``(1, w)`` or ``(B, 1, 1, w)``), or ``None`` for the batch's own masks
            mapped onto ``w`` columns (:func:`~blindspot.physics.mri.resample_mask`).
    Returns:
        ``(masks, accelerations)``: float32 ``(B, 1, 1, w)`` on the target's device and float32 ``(B,)``.
    """
    B, _, _, w = batch.target.shape
    dev = batch.target.device
    if isinstance(physics, MaskFunc):
        drawn = [physics(w, seed=f) for f in batch.fname]  # host work once per image, never per candidate
        masks = torch.stack([d.mask.reshape(1, 1, w) for d in drawn]).to(dev)
        acc = torch.tensor([d.acceleration for d in drawn], dtype=torch.float32)
        return masks, acc
    if physics is None:
        m = resample_mask(batch.mask.to(dev).to(torch.float32), w).reshape(B, 1, 1, w)
        return m, batch.acceleration.detach().cpu().to(torch.float32)
    m = physics.mask if isinstance(physics, CartesianUndersampling) else torch.as_tensor(physics)
    m = m.to(device=dev, dtype=torch.float32)
    if m.shape[-1] != w:
        raise BlindspotError(None, f"the attack's mask has {m.shape[-1]} columns but the truth is {w} wide")
    m = m.reshape(-1, 1, 1, w).expand(B, 1, 1, w).contiguous()
    acc = w / m.flatten(1).sum(1).clamp_min(1.0)
    return m, acc.detach().cpu()


def subset_batch(batch: MRIBatch, idx: Sequence[int]) -> MRIBatch:
    """The images ``idx`` of a batch (every field indexed alike)."""
    i = torch.as_tensor(list(idx), dtype=torch.long)
    il = i.tolist()
    dev = batch.target.device
    di = i.to(dev)
    return MRIBatch(
        input=batch.input[di],
        target=batch.target[di],
        mask=batch.mask[i.to(batch.mask.device)],
        stats=batch.stats.index(i.to(batch.stats.mean.device)),
        fname=[batch.fname[k] for k in il],
        slice_num=[batch.slice_num[k] for k in il],
        max_value=batch.max_value[i.to(batch.max_value.device)],
        acceleration=batch.acceleration[i.to(batch.acceleration.device)],
    )


@dataclass
class AttackContext:
    """Everything about a batch of images that every candidate reuses (computed once per batch).

    Attributes:
        target: truths ``y`` ``(B, 1, h, w)`` on the model's device.
        mask: column masks ``(B, 1, 1, w)`` (also passed to models that need them).
        stats: normalisation statistics of the clean input ``A(y)``, ``(B, 1, 1, 1)`` each.
        clean_input: ``N(A(y))`` ``(B, 1, h, w)``.
        clean_output: ``f(N(A(y)))`` ``(B, 1, h, w)``, or ``None`` when the recovery criterion is off or until the
            first :meth:`FnafObjective.evaluate` of the batch computes it (``needs_reference``).
        dynamic_range: ``max(y) − min(y)`` per image ``(B,)``.
        region: allowed feature centres, bool ``(B, h, w)``.
        image_keys: int64 ``(B,)`` 32-bit keys of (run seed, image, acceleration) for counter-based sampling.
        keys, fname, slice_num: identities (host lists).
        acceleration: float32 ``(B,)`` (host).
        reference_queries: model queries spent on ``clean_output`` per image (0 or 1).
        needs_reference: ``clean_output`` is still to be computed, inside the next model call.
    """

    target: Tensor
    mask: Tensor
    stats: NormStats
    clean_input: Tensor
    clean_output: Tensor | None
    dynamic_range: Tensor
    region: Tensor
    image_keys: Tensor
    keys: list[str]
    fname: list[str]
    slice_num: list[int]
    acceleration: Tensor
    reference_queries: int
    needs_reference: bool = False

    def __len__(self) -> int:
        return int(self.target.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.target.shape[-2]), int(self.target.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.target.device

    def subset(self, idx: Sequence[int] | Tensor) -> "AttackContext":
        """The context of some of the images (e.g. those not yet recorded)."""
        i = torch.as_tensor(idx, dtype=torch.long)
        il = i.tolist()
        di = i.to(self.device)
        return replace(
            self,
            target=self.target[di],
            mask=self.mask[di],
            stats=self.stats.index(di),
            clean_input=self.clean_input[di],
            clean_output=None if self.clean_output is None else self.clean_output[di],
            dynamic_range=self.dynamic_range[di],
            region=self.region[di],
            image_keys=self.image_keys[di],
            keys=[self.keys[k] for k in il],
            fname=[self.fname[k] for k in il],
            slice_num=[self.slice_num[k] for k in il],
            acceleration=self.acceleration[i],
        )


@dataclass
class Evaluation:
    """Scores of ``C`` candidates, each ``(C,)`` on the model's device.

    Attributes:
        attack_loss: ``L_atk`` in normalised units² (whole-image mean).
        baseline_loss: the part of ``L_atk`` the network owes to no feature: ``MSE(T ⊙ f(N(A(y))), T ⊙ N(y))`` on the
            same ``T`` (NaN when the reference is off). When it alone reaches the seed threshold, the seed criterion
            calls the feature lost whatever the network does with it.
        recovery: kept fraction of the feature's energy in ``T`` (NaN when the reference is off).
        ip_loss: MSE between normalised perturbed and clean zero-filled inputs.
        accepted: ``ip_loss > ε`` (the feature is in the measurements).
        lost_seed: ``attack_loss ≥`` the (size-scaled) threshold; lost_recovery: ``recovery < threshold`` (regardless of IP).
        score: what searches maximise (differentiable): ``attack_loss`` (``seed``) or ``1 − recovery``.
        images: optional dict of ``(C, 1, h, w)`` tensors (``input``, ``truth``, ``output``, ``T`` — normalised).
    """

    attack_loss: Tensor
    baseline_loss: Tensor
    recovery: Tensor
    ip_loss: Tensor
    accepted: Tensor
    lost_seed: Tensor
    lost_recovery: Tensor
    score: Tensor
    images: dict[str, Tensor] | None = None

    @property
    def success_seed(self) -> Tensor:
        return self.accepted & self.lost_seed

    @property
    def success_recovery(self) -> Tensor:
        return self.accepted & self.lost_recovery

    def selection_key(self) -> Tensor:
        """A detached key whose maximum is the best candidate: accepted ones first, then by score."""
        s = torch.nan_to_num(self.score.detach(), nan=-1e30, posinf=1e30, neginf=-1e30).to(torch.float64)
        return torch.where(self.accepted, s, s - 1e31)

    @staticmethod
    def cat(items: Sequence["Evaluation"]) -> "Evaluation":
        return Evaluation(**{k: torch.cat([getattr(e, k) for e in items]) for k in EVALUATION_FIELDS})

    def index(self, idx) -> "Evaluation":
        return Evaluation(**{k: getattr(self, k)[idx] for k in EVALUATION_FIELDS})

    def map(self, fn) -> "Evaluation":
        """Apply ``fn`` to every score tensor (e.g. ``Tensor.detach`` or ``Tensor.cpu``)."""
        return Evaluation(**{k: fn(getattr(self, k)) for k in EVALUATION_FIELDS})

    @staticmethod
    def where(cond: Tensor, a: "Evaluation", b: "Evaluation") -> "Evaluation":
        """Per candidate, ``a``'s scores where ``cond`` else ``b``'s."""
        return Evaluation(**{k: torch.where(cond, getattr(a, k), getattr(b, k)) for k in EVALUATION_FIELDS})


#: The score tensors of an :class:`Evaluation` (every field but ``images``).
EVALUATION_FIELDS: tuple[str, ...] = (
    "attack_loss", "baseline_loss", "recovery", "ip_loss", "accepted", "lost_seed", "lost_recovery", "score",
)  # fmt: skip


@dataclass(frozen=True)
class FnafObjective:
    """The FNAF attack objective, configured once (DESIGN.md §1.2).

    Args:
        criterion: what searches maximise and what counts as an attack: ``"seed"`` (``L_atk ≥ loss_threshold``) or
            ``"recovery"`` (kept energy fraction ``< recovery_threshold``). Both are always reported.
        dilation: pixels by which the support is dilated into ``T``.
        loss_threshold: the seed's 1e-3 on ``L_atk``, for images of ``threshold_pixels`` pixels.
        threshold_pixels: the image size (in pixels) at which ``loss_threshold`` applies — the seed's 320×320. ``L_atk``
            is a whole-image mean, so the same lost energy gives a larger mean on a smaller image; the threshold is
            scaled by ``threshold_pixels / (h·w)`` so that a feature counts as lost at every size exactly when it
            would at 320×320 (at 320×320 it is the seed's criterion unchanged). ``None``: ``loss_threshold`` as is.
        recovery_threshold: 0.5 on the kept energy fraction.
        ip_threshold: the seed's ε = 1e-4 on the IP loss.
        reference: compute ``f(N(A(y)))`` (one extra model query per image) for the recovery criterion; forced on when
            ``criterion="recovery"``. Without it ``recovery`` is NaN and ``lost_recovery`` false.
        clamp: the normalisation's clamp (fastMRI: 6); ``None`` for none.
        fuse_reference: compute ``f(N(A(y)))`` inside the batch's first candidate call (the clean inputs ride along
            with the first chunk) rather than in a call of its own: the same work, one model launch fewer per batch,
            which matters for small images on a GPU where calls are launch-bound.
    """

    criterion: str = "seed"
    dilation: int = 3
    loss_threshold: float = 1e-3
    threshold_pixels: int | None = 320 * 320
    recovery_threshold: float = 0.5
    ip_threshold: float = 1e-4
    reference: bool = True
    clamp: float | None = 6.0
    fuse_reference: bool = True

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise BlindspotError(None, f"unknown criterion {self.criterion!r}; choose seed or recovery")
        if self.dilation < 0:
            raise BlindspotError(None, f"dilation must be >= 0, got {self.dilation}")

    def effective_loss_threshold(self, shape: tuple[int, int]) -> float:
        """The ``L_atk`` threshold for images of ``shape = (h, w)`` (see ``threshold_pixels``)."""
        if not self.threshold_pixels:
            return float(self.loss_threshold)
        return float(self.loss_threshold) * float(self.threshold_pixels) / float(shape[0] * shape[1])

    @property
    def uses_reference(self) -> bool:
        return self.reference or self.criterion == "recovery"

    # ------------------------------------------------------------------------------------------------------------
    def prepare(
        self,
        model: nn.Module,
        batch: MRIBatch,
        physics: MaskFunc | CartesianUndersampling | Tensor | None = None,
        region: Region = Region(),
        seed: int = 0,
    ) -> AttackContext:
        """Move a batch to the model's device and compute what all its candidates share.

        Args:
            model: any reconstruction ``nn.Module`` (called through ``reconstruct``).
            batch: the images; ``target`` ``(B, 1, h, w)`` is the truth ``y``.
            physics: how the attack acquires ``y'`` (see :func:`attack_masks`).
            region: where features may be centred.
            seed: the run's seed; with the image identity and acceleration it keys every random draw.
        """
        device = model_device(model, batch.target.device)
        y = batch.target.to(device=device, dtype=torch.float32)
        if y.ndim != 4 or y.shape[1] != 1:
            raise BlindspotError(None, f"the FNAF attack needs truths of shape (B, 1, h, w), got {tuple(y.shape)}")
        if not torch.isfinite(y).all():
            bad = [k for k, ok in zip(batch.keys, torch.isfinite(y).flatten(1).all(1).tolist()) if not ok]
            raise BlindspotError(bad[0] if bad else None, "ground truth contains NaN or Inf")
        mask, acc = attack_masks(replace(batch, target=y), physics)
        x0 = zero_filled(y, mask)  # the same operator as the candidates', so δ' = 0 gives an IP loss of exactly 0
        nx0, stats = normalize(x0, clamp=self.clamp)
        flat = y.flatten(1)
        dyn = flat.amax(1) - flat.amin(1)
        keys = list(batch.keys)
        image_keys = torch.tensor(
            [string_key(seed, k, f"{float(a):g}") for k, a in zip(keys, acc.tolist())], dtype=torch.int64
        ).to(device)
        clean_out = None
        if self.uses_reference and not self.fuse_reference:
            with torch.no_grad():
                clean_out = reconstruct(model, nx0, mask).detach()
        return AttackContext(
            target=y,
            mask=mask,
            stats=stats,
            clean_input=nx0,
            clean_output=clean_out,
            dynamic_range=dyn,
            region=region.masks(y),
            image_keys=image_keys,
            keys=keys,
            fname=list(batch.fname),
            slice_num=[int(s) for s in batch.slice_num],
            acceleration=acc,
            reference_queries=1 if self.uses_reference else 0,
            needs_reference=self.uses_reference and self.fuse_reference,
        )

    # ------------------------------------------------------------------------------------------------------------
    def evaluate(
        self,
        model: nn.Module,
        ctx: AttackContext,
        image_idx: Tensor,
        feature: Tensor,
        support: Tensor,
        return_images: bool = False,
    ) -> Evaluation:
        """Score ``C`` candidates in one batch: physics → normalisation → model → losses.

        Args:
            model: the network.
            ctx: the batch's context (:meth:`prepare`).
            image_idx: int64 ``(C,)`` — which image of the batch each candidate perturbs.
            feature: ``δ'`` float ``(C, 1, h, w)`` in the image's units (any sign is accepted, e.g. a null-space test).
            support: bool ``(C, 1, h, w)`` — ``S``; ``T`` is its dilation.
            return_images: also return the normalised input, truth, output and ``T``.
        Differentiable with respect to ``feature`` when grad mode is on. The first call on a context that still
        ``needs_reference`` also reconstructs the clean inputs, in the same model call, and stores them in ``ctx``.
        """
        idx = image_idx.to(ctx.device)
        y = ctx.target.index_select(0, idx)
        mask = ctx.mask.index_select(0, idx)
        stats = ctx.stats.index(idx)
        y_pert = y + feature
        x_pert = zero_filled(y_pert, mask)  # = CartesianUndersampling(mask)(y_pert), faster
        nx = stats.apply(x_pert)
        ny = stats.apply(y_pert)
        if ctx.needs_reference and ctx.clean_output is None:
            B = len(ctx)
            both = reconstruct(model, torch.cat([ctx.clean_input, nx]), torch.cat([ctx.mask, mask]))
            ctx.clean_output = both[:B].detach()
            ctx.needs_reference = False
            out = both[B:]
        else:
            out = reconstruct(model, nx, mask)
        T = neighbourhood(support, self.dilation)
        dims = (1, 2, 3)
        attack_loss = (T * (out - ny)).square().mean(dims)
        ip_loss = (nx - ctx.clean_input.index_select(0, idx)).square().mean(dims)
        if ctx.clean_output is not None:
            clean_out = ctx.clean_output.index_select(0, idx)
            baseline_loss = (T * (clean_out - stats.apply(y))).square().mean(dims).detach()  # N(y) is clamped
            nd = stats.scale(feature)
            den = (T * nd).square().sum(dims)
            num = (T * (out - clean_out - nd)).square().sum(dims)
            recovery = torch.where(den > 0, 1.0 - num / den.clamp_min(1e-30), torch.ones_like(den))
            lost_recovery = recovery.detach() < self.recovery_threshold
        else:
            recovery = torch.full_like(attack_loss, float("nan"))
            baseline_loss = torch.full_like(attack_loss, float("nan")).detach()
            lost_recovery = torch.zeros_like(attack_loss, dtype=torch.bool)
        score = attack_loss if self.criterion == "seed" else 1.0 - recovery
        images = None
        if return_images:
            images = {"input": nx.detach(), "truth": ny.detach(), "output": out.detach(), "T": T.detach()}
        return Evaluation(
            attack_loss=attack_loss,
            baseline_loss=baseline_loss,
            recovery=recovery,
            ip_loss=ip_loss,
            accepted=ip_loss.detach() > self.ip_threshold,
            lost_seed=attack_loss.detach() >= self.effective_loss_threshold(tuple(feature.shape[-2:])),
            lost_recovery=lost_recovery,
            score=score,
            images=images,
        )

    def success(self, ev: Evaluation) -> Tensor:
        """Bool ``(C,)``: accepted and lost under this objective's criterion."""
        return ev.success_seed if self.criterion == "seed" else ev.success_recovery
