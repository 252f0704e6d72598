"""The FNAF objective: perturbed truth → acquisition → normalisation → network → attack loss, recovery and IP.

Notation (DESIGN.md §1.2): ``y`` the truth ``(B, 1, h, w)``, ``δ'`` a feature, ``y' = y + δ'``, ``A`` the
acquisition (:class:`~blindspot.physics.acquisition.Acquisition`: MRI under-sampling with masks seeded by the file
name, or low-dose CT), ``N`` the normalisation — by default with the statistics of the *perturbed* input ``A(y')``, as
the seed and as a deployed network sees a scan (``normalization="clean"``: those of the clean input ``A(y)``; see
:class:`FnafObjective`) — ``f`` the network
(called through its adapter, :class:`~blindspot.models.adapters.Network`: image, image + mask or k-space), ``T`` the
neighbourhood of the feature.

* attack loss ``L_atk = mean_pixels((T ⊙ (f(N(x')) − N(y')))²)`` (whole-image mean, as the seed); lost when ≥ 1e-3.
* recovery ``1 − ‖T ⊙ (f(N(x')) − f(N(A(y))) − δ'/σ)‖² / ‖T ⊙ δ'/σ‖²``; lost when < 0.5.
* IP: the acquisition's information statistic (MRI: the seed's ``mean_pixels((N(x') − N(A(y)))²)`` > 1e-4; CT: the
  feature's detectability ``d'`` in the low-dose input ≥ 5, see :mod:`blindspot.physics.acquisition`).

Everything is batched over candidates: ``evaluate`` takes any number of features for any images of the batch and runs
them through acquisition, network and scoring as one tensor batch on the network's device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from blindspot.attacks.features import Region, neighbourhood, string_key
from blindspot.data.ldct import AIR_HU, CTBatch
from blindspot.data.sample import MRIBatch
from blindspot.errors import BlindspotError
from blindspot.models.adapters import Network, as_network, check_finite_output, eval_mode, model_device
from blindspot.physics.acquisition import Acquisition, CartesianMRI, LowDoseCTScan, Measurement
from blindspot.physics.mri import (CartesianUndersampling, MaskFunc, NormStats, is_column_mask, low_frequencies_on_grid,
                                   mask_fits, mask_on_grid)

__all__ = ["CRITERIA", "CRITERION_TEXT", "NORMALIZATIONS", "AttackContext", "Evaluation", "FnafObjective", "Truths",
           "as_truths", "attack_acquisition", "eval_mode", "model_device", "subset_batch"]

CRITERIA: tuple[str, ...] = ("seed", "recovery")
#: Whose statistics normalise an attacked input: the perturbed input's own (the seed's) or the clean input's.
NORMALIZATIONS: tuple[str, ...] = ("perturbed", "clean")
#: What each FNAF criterion calls a lost feature (report and terminal headings).
CRITERION_TEXT = {
    "seed": "lost when the attack loss L_atk reaches the seed's 1e-3 (at 320×320, scaled to the image size)",
    "recovery": "lost when the reconstruction keeps less than half of the feature's energy",
}



@dataclass
class Truths:
    """The images an attack perturbs, with their identities.

    Attributes:
        image: truths ``(B, 1, H, W)`` in the data's units (MRI magnitude; CT full-dose HU).
        fname, slice_num: per-image identity (volume or patient, slice); ``keys`` are ``"fname:slice"``.
        observed: CT only: the scanner's low-dose images ``(B, 1, H, W)`` HU of a real pair (``None``: simulate).
        mask, acceleration: MRI only: the batch's own masks — columns ``(B, 1, 1, W)`` or 2-D ``(B, 1, H, W)`` on the
            k-space grid — and accelerations ``(B,)``.
        num_low_frequencies: MRI only: the masks' fully sampled centre lines ``(B,)`` int64, or ``None`` (unknown).
        sens_maps: multi-coil MRI only: complex coil sensitivities ``(B, C, H, W)`` on the truths' grid; the attack's
            acquisition is then multi-coil (a feature enters every coil as ``S_c · δ'``). ``None``: single coil.
        field: CT only: the reconstruction field of view, bool ``(B, 1, H, W)`` (``True`` = image), or ``None`` when
            every pixel is image. Outside it the truths hold air (:data:`~blindspot.data.ldct.AIR_HU`, set where the
            data are read: a scanner measured the air there, never the padding value, so the simulated projections
            see air); the attack never places a feature there and leaves those pixels out of ``T``, the dynamic range
            and the IP statistic.
    """

    image: Tensor
    fname: list[str]
    slice_num: list[int]
    observed: Tensor | None = None
    mask: Tensor | None = None
    acceleration: Tensor | None = None
    sens_maps: Tensor | None = None
    field: Tensor | None = None
    num_low_frequencies: Tensor | None = None

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def keys(self) -> list[str]:
        return [f"{f}:{s}" for f, s in zip(self.fname, self.slice_num)]

    def subset(self, idx: Sequence[int]) -> "Truths":
        i = torch.as_tensor(list(idx), dtype=torch.long)
        pick = lambda t: None if t is None else t[i.to(t.device)]  # noqa: E731
        il = i.tolist()
        return Truths(pick(self.image), [self.fname[k] for k in il], [self.slice_num[k] for k in il],
                      pick(self.observed), pick(self.mask), pick(self.acceleration), pick(self.sens_maps),
                      pick(self.field), pick(self.num_low_frequencies))


def as_truths(batch: "Truths | MRIBatch | CTBatch | Tensor") -> Truths:
    """Any batch an attack accepts as :class:`Truths`: an MRI batch (its ``target``, and its coil maps when the data
    set estimated them, :mod:`blindspot.data.sample`: multi-coil data then get a multi-coil acquisition), a CT batch
    (``full`` with its ``low`` as the observed input and its field of view), or a bare tensor ``(B, 1, H, W)``
    (images named ``image-0``, …)."""
    if isinstance(batch, Truths):
        return batch
    if isinstance(batch, MRIBatch):
        return Truths(batch.target, list(batch.fname), [int(s) for s in batch.slice_num], None, batch.mask,
                      batch.acceleration, batch.sens_maps, num_low_frequencies=batch.num_low_frequencies)
    if isinstance(batch, CTBatch):
        return Truths(batch.full, list(batch.patient), [int(i) for i in batch.index], batch.low, field=batch.field)
    if isinstance(batch, Tensor):
        return Truths(batch, [f"image-{i}" for i in range(batch.shape[0])], [0] * batch.shape[0])
    raise BlindspotError(None, f"cannot attack a {type(batch).__name__}; give Truths, an MRI or CT batch or a tensor")


def subset_batch(batch: "Truths | MRIBatch | CTBatch | Tensor", idx: Sequence[int]) -> Truths:
    """The images ``idx`` of a batch."""
    return as_truths(batch).subset(idx)


def attack_acquisition(truths: Truths, physics: Any) -> Acquisition:
    """The attack's acquisition for these truths (on their device), one set of parameters per image.

    Args:
        truths: the images (``image`` ``(B, 1, h, w)``), with their coil maps ``(B, C, h, w)`` when multi-coil.
        physics: an :class:`Acquisition` (used as it is; a one-mask MRI acquisition serves every image), a mask
            function (drawn per image on the truths' ``h × w`` grid with ``mask_func(w, seed=fname)``, 2-D mask
            functions with ``height=h`` too, as fastMRI seeds by volume), an operator or mask tensor (column masks
            ``(w,)``, ``(1, w)``, ``(B, 1, 1, w)``; 2-D masks ``(h, w)``, ``(B, 1, h, w)``), or ``None`` for the
            batch's own masks mapped onto the truths' grid (:func:`~blindspot.physics.mri.mask_on_grid`).

    Unless ``physics`` is an :class:`Acquisition`, the MRI acquisition is multi-coil, ``CartesianMRI(mask,
    sens_maps=truths.sens_maps)``, when the truths carry coil maps, and single-coil otherwise. It works on the
    truths' grid (the crop the network sees): the maps are cropped like the truths and the mask is mapped onto its
    columns, as for single-coil data.
    """
    B, _, h, w = truths.image.shape
    dev = truths.image.device
    if isinstance(physics, Acquisition):
        acq = physics.to(dev)
        return acq.select(torch.arange(B)) if isinstance(acq, CartesianMRI) and len(acq) == 1 else acq
    maps = None
    if truths.sens_maps is not None:
        maps = truths.sens_maps.to(dev)
        if maps.ndim != 4 or maps.shape[0] != B or tuple(maps.shape[-2:]) != tuple(truths.image.shape[-2:]):
            raise BlindspotError(None, f"coil maps {tuple(maps.shape)} do not match truths {tuple(truths.image.shape)}"
                                       " (expected (B, coils, h, w))")
    if isinstance(physics, MaskFunc):
        return CartesianMRI.from_mask_func(physics, w, truths.fname, height=h, sens_maps=maps).to(dev)
    if physics is None:
        if truths.mask is None:
            raise BlindspotError(None, "no acquisition given and the batch carries no sampling masks")
        m = mask_on_grid(truths.mask.to(dev), (h, w), B)
        return CartesianMRI(m, sens_maps=maps, accelerations=truths.acceleration.detach().cpu().to(torch.float32),
                            num_low_frequencies=low_frequencies_on_grid(truths.mask, (h, w),
                                                                        truths.num_low_frequencies))
    m = physics.mask if isinstance(physics, CartesianUndersampling) else torch.as_tensor(physics)
    m = m.to(device=dev, dtype=torch.float32)
    if not mask_fits(m, (h, w)):
        size = f"{m.shape[-2]}x{m.shape[-1]}" if not is_column_mask(m) else f"{m.shape[-1]} columns"
        raise BlindspotError(None, f"the attack's mask is {size} but the truth is {h}x{w}")
    return CartesianMRI(mask_on_grid(m, (h, w), B), sens_maps=maps)


@dataclass
class AttackContext:
    """Everything about a batch of images that every candidate reuses (computed once per batch).

    Attributes:
        target: truths ``y`` ``(B, 1, h, w)`` on the network's device.
        acquisition: the acquisition, one set of parameters per image (MRI masks).
        measurement: the clean measurement ``A(y)`` (CT: with its noise realisation, shared by every candidate).
        stats: normalisation statistics of the clean input, ``(B, 1, 1, 1)`` each (those of every candidate under
            ``normalization="clean"``; the units of ``clean_output`` and of the recovery criterion in both modes).
        clean_input: ``N(A(y))`` ``(B, 1, h, w)``.
        clean_output: ``f(N(A(y)))`` ``(B, 1, h, w)``, or ``None`` when the recovery criterion is off or until the
            first :meth:`FnafObjective.evaluate` of the batch computes it (``needs_reference``).
        dynamic_range: ``max(y) − min(y)`` per image ``(B,)``, over the field of view when there is one.
        region: allowed feature centres, bool ``(B, h, w)`` (with a field of view: only centres whose feature and
            its dilation ``T`` lie wholly inside it).
        image_keys: int64 ``(B,)`` 32-bit keys of (run seed, image, acceleration) for counter-based sampling.
        keys, fname, slice_num: identities (host lists).
        acceleration: float32 ``(B,)`` (host): MRI acceleration, CT dose-reduction factor ``1/dose``.
        reference_queries: model queries spent on ``clean_output`` per image (0 or 1).
        needs_reference: ``clean_output`` is still to be computed, inside the next model call.
        field: CT only: the field of view, bool ``(B, 1, h, w)`` on the device (``True`` = image), or ``None``.
            :meth:`FnafObjective.evaluate` counts no pixel outside it in ``T`` and does not accept a feature whose
            support leaves it; the clean measurement carries it, so the CT noise level of the IP statistic is
            measured inside it.
        shared: what several searches of this context compute alike (e.g. RS's candidate scores, the same under
            both criteria), keyed by the search's settings; :meth:`subset` starts it empty.
    """

    target: Tensor
    acquisition: Acquisition
    measurement: Measurement
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
    field: Tensor | None = None
    shared: dict = dataclass_field(default_factory=dict, repr=False, compare=False)

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
            acquisition=self.acquisition.select(di),
            measurement=self.measurement.select(di),
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
            field=None if self.field is None else self.field[di],
            shared={},
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
        ip_threshold: the IP threshold; ``None`` takes the acquisition's (MRI: the seed's ε = 1e-4 on the IP
            loss; CT: detectability ``d' ≥ 5``).
        reference: compute ``f(N(A(y)))`` (one extra model query per image) for the recovery criterion; forced on when
            ``criterion="recovery"``. Without it ``recovery`` is NaN and ``lost_recovery`` false.
        clamp: the normalisation's clamp (fastMRI: 6); ``None`` for none.
        fuse_reference: compute ``f(N(A(y)))`` inside the batch's first candidate call (the clean inputs ride along
            with the first chunk) rather than in a call of its own: the same work, one model launch fewer per batch,
            which matters for small images on a GPU where calls are launch-bound.
        normalization: whose statistics normalise an attacked input and its truth ``y'``:

            * ``"perturbed"`` (default) — the perturbed input's own, ``N'(x) = (x − μ(x'))/σ(x')``, as the seed's code
              does and as a deployed network normalises whatever scan it is given: the feature also shifts the
              normalisation, which is part of what the network does to it. ``L_atk`` compares ``f(N'(x'))`` with
              ``N'(y')``; the recovery criterion maps the output back to the clean statistics' units,
              ``(σ'·f(N'(x')) + μ' − μ)/σ``, before comparing it with ``f(N(A(y)))``, so that a pure shift of the
              statistics is not counted as a change of the reconstruction.
            * ``"clean"`` — the clean input's statistics for every candidate (blindspot's earlier behaviour): the
              network's input then depends linearly on the feature, which isolates the network's own response.

            For seed-sized features the two differ little (a 10-pixel walk moves ``μ`` and ``σ`` by about 1e-3 of
            their values at 128×128); the default follows the seed because the attack should measure the pipeline
            a scan goes through. The IP statistic compares both inputs under the clean statistics in either mode
            (it measures the feature's trace in the measurements, not the normalisation's shift). CT's
            normalisation is a fixed HU scaling, so both modes coincide there.
    """

    criterion: str = "seed"
    dilation: int = 3
    loss_threshold: float = 1e-3
    threshold_pixels: int | None = 320 * 320
    recovery_threshold: float = 0.5
    ip_threshold: float | None = None
    reference: bool = True
    clamp: float | None = 6.0
    fuse_reference: bool = True
    normalization: str = "perturbed"

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise BlindspotError(None, f"unknown criterion {self.criterion!r}; choose seed or recovery")
        if self.normalization not in NORMALIZATIONS:
            raise BlindspotError(None, f"unknown normalisation {self.normalization!r}; choose perturbed or clean")
        if self.dilation < 0:
            raise BlindspotError(None, f"dilation must be >= 0, got {self.dilation}")

    def score_of(self, attack_loss: Tensor, recovery: Tensor) -> Tensor:
        """What the searches maximise under this criterion: ``L_atk`` (``seed``) or ``1 − recovery``."""
        return attack_loss if self.criterion == "seed" else 1.0 - recovery

    def rescore(self, ev: "Evaluation") -> "Evaluation":
        """``ev``, scored under any criterion, with this objective's score (the rest does not depend on it)."""
        return replace(ev, score=self.score_of(ev.attack_loss, ev.recovery))

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
        model: "nn.Module | Network",
        batch: "Truths | MRIBatch | CTBatch | Tensor",
        physics: Any = None,
        region: Region = Region(),
        seed: int = 0,
        reach: int = 0,
    ) -> AttackContext:
        """Move a batch to the network's device and compute what all its candidates share.

        Args:
            model: any network (an ``nn.Module``, adapted by :func:`~blindspot.models.adapters.as_network`, or a
                :class:`~blindspot.models.adapters.Network`).
            batch: the truths (:func:`as_truths`).
            physics: the acquisition (see :func:`attack_acquisition`).
            region: where features may be centred.
            seed: the run's seed; with the image identity and acceleration it keys every random draw (the CT noise
                of a simulated low-dose input too).
            reach: pixels a feature's support may extend from its centre
                (:attr:`~blindspot.attacks.features.FeatureSampler.reach`): with a field of view (CT truths that
                carry one), centres are kept ``reach + dilation`` pixels inside it, so neither the feature nor ``T``
                touches a pixel that is not image.
        """
        net = as_network(model)
        truths = as_truths(batch)
        device = model_device(net.module, truths.image.device)
        y = truths.image.to(device=device, dtype=torch.float32)
        if y.ndim != 4 or y.shape[1] != 1:
            raise BlindspotError(None, f"the FNAF attack needs truths of shape (B, 1, h, w), got {tuple(y.shape)}")
        if not torch.isfinite(y).all():
            bad = [k for k, ok in zip(truths.keys, torch.isfinite(y).flatten(1).all(1).tolist()) if not ok]
            raise BlindspotError(bad[0] if bad else None, "ground truth contains NaN or Inf")
        field = None
        if truths.field is not None:
            field = truths.field.to(device=device, dtype=torch.bool)
            if tuple(field.shape) != tuple(y.shape):
                raise BlindspotError(None, f"field of view {tuple(field.shape)} does not fit truths {tuple(y.shape)}")
            if bool(field.all()):
                field = None
            else:  # out-of-field pixels are air (idempotent for data read by blindspot.data.ldct)
                y = torch.where(field, y, torch.full_like(y, AIR_HU))
                if truths.observed is not None:
                    observed = torch.where(field, truths.observed.to(y), torch.full_like(y, AIR_HU))
                    truths = replace(truths, observed=observed)
        truths = replace(truths, image=y, field=field)
        acq = attack_acquisition(truths, physics)
        net.check(acq)
        keys = truths.keys
        acc = acq.accelerations.expand(len(keys)) if len(acq.accelerations) == 1 else acq.accelerations
        image_keys_host = [string_key(seed, k, f"{float(a):g}") for k, a in zip(keys, acc.tolist())]
        meas = self._measure(acq, truths, image_keys_host)
        if field is not None:
            meas = replace(meas, field=field)  # the CT noise level (IP statistic) is measured inside the field
        stats = acq.normalization(meas)
        nx0 = stats.apply(meas.image)
        flat = y.flatten(1)
        if field is None:
            dyn = flat.amax(1) - flat.amin(1)
        else:
            inside = field.flatten(1)
            dyn = flat.masked_fill(~inside, float("-inf")).amax(1) - flat.masked_fill(~inside, float("inf")).amin(1)
        allowed = region.masks(y, field, int(reach) + self.dilation)
        if field is not None and not bool(allowed.flatten(1).any(1).all()):
            bad = [k for k, ok in zip(keys, allowed.flatten(1).any(1).tolist()) if not ok]
            raise BlindspotError(bad[0], f"no place in its field of view for a feature reaching {int(reach)} px "
                                 f"plus the {self.dilation} px neighbourhood T")
        clean_out = None
        if self.uses_reference and not self.fuse_reference:
            with torch.no_grad():
                clean_out = net(acq, meas, nx0, stats).detach()
            check_finite_output(clean_out, net.name, "the clean input")  # once per batch
        return AttackContext(
            target=y,
            acquisition=acq,
            measurement=meas,
            stats=stats,
            clean_input=nx0,
            clean_output=clean_out,
            dynamic_range=dyn,
            region=allowed,
            image_keys=torch.tensor(image_keys_host, dtype=torch.int64).to(device),
            keys=keys,
            fname=list(truths.fname),
            slice_num=[int(s) for s in truths.slice_num],
            acceleration=acc.detach().cpu().to(torch.float32),
            reference_queries=1 if self.uses_reference else 0,
            needs_reference=self.uses_reference and self.fuse_reference,
            field=field,
        )

    @staticmethod
    def _measure(acq: Acquisition, truths: Truths, image_keys: list[int]) -> Measurement:
        """The clean measurement: a real pair's observed low dose, a per-image seeded CT simulation (the same noise
        whatever the batch), or the MRI under-sampling."""
        if isinstance(acq, LowDoseCTScan):
            if truths.observed is not None:
                return acq.observed(truths.image, truths.observed.to(truths.image))
            return acq.measure_seeded(truths.image, image_keys)
        return acq.measure(truths.image)

    def ip_cut(self, acquisition: Acquisition) -> float:
        """The IP threshold in force: the objective's, else the acquisition's (MRI 1e-4, CT d' ≥ 5)."""
        return float(acquisition.ip_threshold if self.ip_threshold is None else self.ip_threshold)

    def perturbed_input(self, acquisition: Acquisition, clean: Measurement, clean_stats: NormStats,
                        feature: Tensor) -> tuple[Measurement, NormStats, Tensor]:
        """The attacked input of features ``δ'`` ``(C, 1, h, w)`` (data units) on clean measurements of the same
        ``C`` items: ``(A(y + δ'), its statistics under this objective's normalisation, the normalised input
        (C, 1, h, w))``. Differentiable with respect to ``feature``."""
        meas_p = acquisition.perturb(clean, feature)
        stats = acquisition.normalization(meas_p) if self.normalization == "perturbed" else clean_stats
        return meas_p, stats, stats.apply(meas_p.image)

    # ------------------------------------------------------------------------------------------------------------
    def evaluate(
        self,
        model: "nn.Module | Network",
        ctx: AttackContext,
        image_idx: Tensor,
        feature: Tensor,
        support: Tensor,
        return_images: bool = False,
    ) -> Evaluation:
        """Score ``C`` candidates in one batch: acquisition → normalisation → network → losses.

        Args:
            model: the network.
            ctx: the batch's context (:meth:`prepare`).
            image_idx: int64 ``(C,)`` — which image of the batch each candidate perturbs.
            feature: ``δ'`` float ``(C, 1, h, w)`` in the image's units (any sign is accepted, e.g. a null-space test).
            support: bool ``(C, 1, h, w)`` — ``S``; ``T`` is its dilation.
            return_images: also return the normalised input, truth, output and ``T``.
        Differentiable with respect to ``feature`` when grad mode is on. The first call on a context that still
        ``needs_reference`` also reconstructs the clean inputs, in the same network call, and stores them in ``ctx``.
        """
        net = as_network(model)
        idx = image_idx.to(ctx.device)
        y = ctx.target.index_select(0, idx)
        acq = ctx.acquisition.select(idx)
        meas = ctx.measurement.select(idx)
        stats = ctx.stats.index(idx)
        meas_p, stats_p, nx = self.perturbed_input(acq, meas, stats, feature)
        ny = acq.target(y + feature, stats_p)
        if ctx.needs_reference and ctx.clean_output is None:
            B = len(ctx)
            all_idx = torch.cat([torch.arange(B, device=ctx.device), idx])
            both = net(ctx.acquisition.select(all_idx), Measurement.cat([ctx.measurement, meas_p]),
                       torch.cat([ctx.clean_input, nx]), _cat_stats(ctx.stats, stats_p))
            ctx.clean_output = both[:B].detach()
            ctx.needs_reference = False
            check_finite_output(ctx.clean_output, net.name, "the clean input")  # once per batch
            out = both[B:]
        else:
            out = net(acq, meas_p, nx, stats_p)
        T = acq.crop_image(neighbourhood(support, self.dilation))
        in_field = None
        if ctx.field is not None:  # CT field of view: no out-of-field pixel in T; a feature must lie inside it
            fld = ctx.field.index_select(0, idx)
            T = T * fld
            in_field = ~(support.to(torch.bool) & ~fld).flatten(1).any(1)
        dims = (1, 2, 3)
        attack_loss = (T * (out - ny)).square().mean(dims)
        ip_loss = acq.information(meas, meas_p, stats)
        if ctx.clean_output is not None:
            clean_out = ctx.clean_output.index_select(0, idx)
            baseline_loss = (T * (clean_out - acq.target(y, stats))).square().mean(dims).detach()  # N(y) is clamped
            nd = stats.scale(acq.crop_image(feature))
            den = (T * nd).square().sum(dims)
            out_c = out if stats_p is stats else stats.apply(stats_p.invert(out), clamp=False)
            num = (T * (out_c - clean_out - nd)).square().sum(dims)
            recovery = torch.where(den > 0, 1.0 - num / den.clamp_min(1e-30), torch.ones_like(den))
            lost_recovery = recovery.detach() < self.recovery_threshold
        else:
            recovery = torch.full_like(attack_loss, float("nan"))
            baseline_loss = torch.full_like(attack_loss, float("nan")).detach()
            lost_recovery = torch.zeros_like(attack_loss, dtype=torch.bool)
        score = self.score_of(attack_loss, recovery)
        accepted = ip_loss.detach() > self.ip_cut(acq)
        if in_field is not None:
            accepted = accepted & in_field
        images = None
        if return_images:
            images = {"input": nx.detach(), "truth": ny.detach(), "output": out.detach(), "T": T.detach()}
        return Evaluation(
            attack_loss=attack_loss,
            baseline_loss=baseline_loss,
            recovery=recovery,
            ip_loss=ip_loss,
            accepted=accepted,
            lost_seed=attack_loss.detach() >= self.effective_loss_threshold(tuple(T.shape[-2:])),
            lost_recovery=lost_recovery,
            score=score,
            images=images,
        )

    def success(self, ev: Evaluation) -> Tensor:
        """Bool ``(C,)``: accepted and lost under this objective's criterion."""
        return ev.success_seed if self.criterion == "seed" else ev.success_recovery


def _cat_stats(a: NormStats, b: NormStats) -> NormStats:
    """The statistics of two batches stacked (``a``'s items first)."""
    return NormStats(torch.cat([a.mean, b.mean]), torch.cat([a.std, b.std]), a.clamp)
