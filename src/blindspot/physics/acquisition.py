"""Acquisition objects: one interface from a true image to what a network is given, for every modality.

An :class:`Acquisition` owns the physics of one set-up (masks and crop, coil sensitivities, dose and the low-dose
simulation) and the network's input normalisation. Every attack is written against this interface and a network
adapter (:mod:`blindspot.models.adapters`), so FNAF, invariances and the audit run on either modality:

================  =================================================================================================
``measure(y)``    truths ``(B, 1, H, W)`` → :class:`Measurement` (batched, differentiable in ``y``)
``perturb(m, δ)`` the measurement of ``y + δ`` given that of ``y``: exact for MRI (k-space is linear in ``y``); for
                  CT the noise realisation of ``y`` is kept and ``δ`` enters through the noise-free physics
``network_input`` measurement → ``(x, stats)``: the normalised image a network sees and the statistics used
``target``        truths in the network's units (same statistics), for losses and metrics
``adjoint/pinv``  back to images, where the acquisition has them
``null_space``    the part of an image the acquisition cannot see (MRI: ``F⁻¹(1 − M)F``), or ``None``
``information``   the information-preservation statistic of a feature (the seed's IP loss for MRI, a detectability
                  index for CT; see below) and ``ip_threshold``, the value above which the feature is in the input
================  =================================================================================================

Per-item parameters (one mask per image) follow the batch: :meth:`Acquisition.select` picks the items that a batch
of attack candidates perturbs. Shapes are ``(B, C, H, W)``; complex data are ``complex64``.

**MRI** (DESIGN.md §1.1): ``A(y) = |F⁻¹(M ⊙ F(S y))|`` (root-sum-of-squares over coils ``c`` with sensitivity maps
``S_c``; single coil: ``S = 1``), cropped, normalised as fastMRI's U-Net with the statistics of the zero-filled input.
The IP statistic is the seed's: the whole-image MSE between the normalised perturbed and clean inputs; a feature
is in the measurements when it exceeds ε = 1e-4.

**CT** (DESIGN.md §1.4): ``A(y) = FBP(−log(N / (I0·dose)))`` with ``N ~ Poisson(I0·dose·exp(−P μ(y)))``, HU in and
out, normalised by the network's fixed HU affine map. The measurement keeps the noise realisation in the image
domain, ``n = A(y) − FBP(P(y))``. A feature then enters as ``A(y + δ) = A(y) + FBP(P(δ))``: exact for the
deterministic part (``μ`` is affine in HU and FBP∘P is linear; the clamp of ``μ`` at air only matters for a
feature in air), approximate for the noise, which in reality changes slightly on the rays through the feature (a
10-pixel, 100 HU feature changes those rays' counts, hence their noise variance, by about 1 %).
``FBP(P(δ))`` is computed by default as ``h ⊛ δ`` with ``h`` the scanner's point-spread function, measured once per
acquisition as the mean response of the discretised projector and FBP to a grid of single-pixel impulses
(``feature_response="psf"``; ``"exact"`` projects and reconstructs every feature). Continuous FBP∘P is
shift-invariant; the discretised simulator is not quite (a pixel's response depends on where its centre falls
between detector bins): against the exact simulation the PSF response of discs of radius 1.5–5 px has the same
energy to within 5 % and differs by 5–10 % (relative ℓ2) pixel by pixel, which is the simulator's own
position-to-position spread (``tests/test_acquisition.py`` checks it). It is 100–1000× cheaper, which makes the CT
attack cost the network's cost.

*CT information preservation.* The low-dose input is noisy, so the question is not whether the feature changed the
input (it always does) but whether it is still *detectable* above the noise there. The statistic is the
matched-filter detectability index for a known signal in white noise,
``d' = ‖A(y + δ) − A(y)‖₂ / σ_n = ‖FBP(P(δ))‖₂ / σ_n`` with ``σ_n`` the per-pixel standard deviation (HU) of the
input's noise ``n``; the feature is in the input when ``d' ≥ 5`` (the Rose criterion, the classical threshold for
a signal to be detected reliably against noise). FBP noise is not white (it is high-pass), so ``d'`` is a
conservative-to-neutral summary; it is what a radiologist's "visible above the noise" means in one number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from blindspot.errors import BlindspotError
from blindspot.physics.ct import WINDOWS, HUNormalization, LowDoseCT
from blindspot.physics.mri import (MaskFunc, NormStats, center_crop, draw_mask, fft2c, ifft2c, masked_image,
                                   normalize, resample_mask, rss)

#: The Rose criterion: a known signal is reliably detectable in white noise when its SNR reaches 5.
ROSE_DETECTABILITY = 5.0
#: The seed's IP threshold on the MSE between normalised perturbed and clean zero-filled inputs.
SEED_IP_THRESHOLD = 1e-4


@dataclass
class Measurement:
    """What an acquisition produced from a batch of ``B`` truths.

    Attributes:
        image: the acquisition's image in the data's units, real ``(B, 1, h, w)``: the zero-filled magnitude
            (MRI, RSS over coils, cropped) or the low-dose FBP image in HU (CT). Image-domain networks see its
            normalisation.
        coil_images: MRI only, complex ``(B, C, H, W)``: ``F⁻¹(M ⊙ F(S_c y))`` per coil, uncropped (the masked
            k-space is ``fft2c(coil_images)``); ``None`` for CT.
        mask: MRI only, the masks ``(B, 1, 1, W)`` over columns or ``(B, 1, H, W)`` (2-D masks), 0/1 float.
        noise: CT only, the noise realisation in the image domain, HU ``(B, 1, H, W)``.
        field: CT only, the reconstruction field of view, bool ``(B, 1, H, W)`` (``True`` = image), or ``None`` when
            every pixel is image: the noise level and the detectability are measured inside it.
    """

    image: Tensor
    coil_images: Tensor | None = None
    mask: Tensor | None = None
    noise: Tensor | None = None
    field: Tensor | None = None

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def kspace(self) -> Tensor:
        """The masked k-space ``(B, C, H, W)`` complex (MRI)."""
        if self.coil_images is None:
            raise BlindspotError(None, "this acquisition has no k-space (it is not an MRI acquisition)")
        return fft2c(self.coil_images)

    def select(self, idx: Tensor) -> "Measurement":
        """The measurements of items ``idx`` (int64 ``(n,)``, repeats allowed)."""
        pick = lambda t: None if t is None else t.index_select(0, idx.to(t.device))  # noqa: E731
        return Measurement(pick(self.image), pick(self.coil_images), pick(self.mask), pick(self.noise),
                           pick(self.field))

    def detach(self) -> "Measurement":
        f = lambda t: None if t is None else t.detach()  # noqa: E731
        return Measurement(f(self.image), f(self.coil_images), f(self.mask), f(self.noise), self.field)

    @staticmethod
    def cat(items: Sequence["Measurement"]) -> "Measurement":
        def c(name):
            vals = [getattr(m, name) for m in items]
            return None if vals[0] is None else torch.cat(vals)

        fields = None if all(m.field is None for m in items) else torch.cat(
            [m.field if m.field is not None else torch.ones_like(m.image, dtype=torch.bool) for m in items])
        return Measurement(c("image"), c("coil_images"), c("mask"), c("noise"), fields)


class Acquisition:
    """The interface every attack uses (see the module docs). Subclasses: :class:`CartesianMRI`, :class:`LowDoseCTScan`.

    Attributes:
        modality: ``"mri"`` or ``"ct"``.
        ip_threshold: the value of :meth:`information` above which a feature is in the network's input.
        ip_text: how the IP statistic is defined, for reports.
    """

    modality: str = ""
    ip_threshold: float = 0.0
    ip_text: str = ""

    def __len__(self) -> int:
        """Number of items with their own parameters (1 when one set serves every item)."""
        return 1

    def measure(self, truth: Tensor, generator: torch.Generator | None = None) -> Measurement:
        raise NotImplementedError

    def perturb(self, measurement: Measurement, delta: Tensor) -> Measurement:
        """The measurement of ``y + δ`` given that of ``y`` (``δ`` ``(B, 1, H, W)`` in the truth's units)."""
        raise NotImplementedError

    def normalization(self, measurement: Measurement) -> NormStats:
        """The statistics that map this measurement's image to the network's units."""
        raise NotImplementedError

    def network_input(self, measurement: Measurement, stats: NormStats | None = None) -> tuple[Tensor, NormStats]:
        """``(x, stats)``: the normalised image ``(B, 1, h, w)`` an image-domain network sees, and the statistics
        (its own unless ``stats`` is given, e.g. a clean image's statistics for a perturbed one)."""
        stats = self.normalization(measurement) if stats is None else stats
        return stats.apply(measurement.image), stats

    def target(self, truth: Tensor, stats: NormStats) -> Tensor:
        """Truths ``(B, 1, h, w)`` in the network's units (cropped like the input)."""
        return stats.apply(self.crop_image(truth))

    def crop_image(self, image: Tensor) -> Tensor:
        """An image of the truth's grid on the network's grid (identity unless the acquisition crops)."""
        return image

    def select(self, idx: Tensor) -> "Acquisition":
        """The acquisition of items ``idx`` (int64 ``(n,)``)."""
        return self

    def to(self, device: torch.device | str) -> "Acquisition":
        return self

    def adjoint(self, measurement: Measurement) -> Tensor | None:
        return None

    def pinv(self, measurement: Measurement) -> Tensor:
        """An image estimate from the measurements alone (MRI: zero-filled; CT: the FBP image)."""
        return measurement.image

    def null_space(self, image: Tensor) -> Tensor | None:
        """The part of ``image`` the acquisition cannot see, or ``None`` when it has no null space."""
        return None

    def information(self, clean: Measurement, perturbed: Measurement, stats: NormStats) -> Tensor:
        """The IP statistic ``(B,)`` of a feature (see the module docs)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON-able description for run settings and reports."""
        return {"modality": self.modality}

    def display_range(self, stats: NormStats) -> Tensor | None:
        """Grey-scale limits ``(B, 2)`` in the network's units for showing images, or ``None`` for each image's own
        range (CT: the abdomen window, where a low-contrast feature is visible)."""
        return None

    # ---- measurement perturbations and the measured / unmeasured split (issue 15; blindspot.attacks.measurement,
    # ---- blindspot.attacks.hallucination). Additions only: nothing above calls them.
    def measurement_vector(self, measurement: Measurement) -> Tensor:
        """The measurements as one tensor, the space that measurement perturbations live in: MRI the masked k-space
        per coil, complex ``(B, C, H, W)``; CT the low-dose image in HU ``(B, 1, H, W)``."""
        raise NotImplementedError

    def project_measurements(self, e: Tensor) -> Tensor:
        """``e`` (shaped like :meth:`measurement_vector`) restricted to what the acquisition measures (MRI: the
        sampled k-space entries; CT: every pixel of the low-dose image). An orthogonal projection."""
        return e

    def perturb_measurements(self, measurement: Measurement, e: Tensor) -> Measurement:
        """The measurement plus a perturbation ``e`` of the measurements themselves (projected first), as the network
        would receive it; differentiable in ``e``."""
        raise NotImplementedError

    def measurement_scale(self, measurement: Measurement) -> Tensor:
        """The per-item norm ``(B,)`` that relative perturbation budgets multiply: MRI ``‖M ⊙ k‖`` (the measured
        k-space over all coils); CT ``‖n‖`` (the low-dose noise realisation: budget 1 is the noise's own norm)."""
        raise NotImplementedError

    def measured_split(self, image: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(measured, unmeasured)`` parts of images ``(B, 1, h, w)`` on the acquisition's measurement grid, or
        ``None`` when the acquisition has no null space (see :meth:`CartesianMRI.measured_split`)."""
        return None


# ----------------------------------------------------------------------------------------------------------------
# MRI
# ----------------------------------------------------------------------------------------------------------------
class CartesianMRI(Acquisition):
    """Cartesian MRI, single- or multi-coil: column or 2-D masks, optional coil sensitivities and crop.

    Args:
        mask: 0/1 column masks ``(B, 1, 1, W)`` (one per item) or ``(1, W)`` / ``(W,)`` (one for all); or 2-D masks
            over both phase-encode axes, ``(B, 1, H, W)`` or ``(H, W)`` (one for all; ``H`` the truths' height).
        crop: central ``(h, w)`` crop of the zero-filled image the network sees, or ``None``.
        sens_maps: complex coil sensitivities ``(B, C, H, W)`` (or ``(1, C, H, W)``), or ``None`` for one coil of
            unit sensitivity. Maps are expected to satisfy ``Σ_c |S_c|² = 1`` where the object is, so that the RSS
            of the fully sampled coil images returns the magnitude truth.
        accelerations: float32 ``(B,)`` nominal acceleration per item (for records), or ``None`` to compute
            ``samples in the mask / sampled ones``.
        clamp: the normalisation's clamp (fastMRI: 6).
        num_low_frequencies: int64 ``(B,)`` (or ``(1,)``): the mask function's fully sampled centre columns per
            item (fastMRI's ``num_low_frequencies``, passed to k-space networks), or ``None`` when unknown.

    Truths are real ``(B, 1, H, W)`` magnitudes whose width ``W`` matches the mask (or complex images).
    """

    modality = "mri"
    ip_threshold = SEED_IP_THRESHOLD
    ip_text = "MSE between normalised perturbed and clean zero-filled inputs (seed), > 1e-4"

    def __init__(self, mask: Tensor, crop: tuple[int, int] | None = None, sens_maps: Tensor | None = None,
                 accelerations: Tensor | None = None, clamp: float | None = 6.0,
                 num_low_frequencies: Tensor | None = None) -> None:
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.ndim == 1:
            mask = mask.reshape(1, 1, 1, -1)
        elif mask.ndim == 2:
            mask = mask.reshape(1, 1, *mask.shape)
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise BlindspotError(None, f"mask must be (W,), (1, W), (B, 1, 1, W) or 2-D (H, W), (B, 1, H, W), got "
                                       f"{tuple(mask.shape)}")
        if sens_maps is not None:
            if sens_maps.ndim != 4 or not sens_maps.is_complex():
                raise BlindspotError(None, f"coil sensitivities must be complex (B, C, H, W), got "
                                           f"{tuple(sens_maps.shape)} {sens_maps.dtype}")
            if sens_maps.shape[-1] != mask.shape[-1] or mask.shape[-2] not in (1, sens_maps.shape[-2]):
                raise BlindspotError(None, f"coil sensitivities are {sens_maps.shape[-2]}x{sens_maps.shape[-1]} but "
                                           f"the mask is {mask.shape[-2]}x{mask.shape[-1]}")
        self.mask = mask
        self.crop = None if crop is None else (int(crop[0]), int(crop[1]))
        self.sens_maps = sens_maps
        if accelerations is None:
            accelerations = mask[0].numel() / mask.flatten(1).sum(1).clamp_min(1.0)
        # on the mask's device, so that selecting items never waits for the device
        self.accelerations = torch.as_tensor(accelerations, dtype=torch.float32).reshape(-1).to(mask.device)
        self.clamp = clamp
        self.num_low_frequencies = (None if num_low_frequencies is None else
                                    torch.as_tensor(num_low_frequencies, dtype=torch.long).reshape(-1).to(mask.device))

    @classmethod
    def from_mask_func(cls, mask_func: MaskFunc, width: int, seeds: Sequence[str | int], height: int | None = None,
                       **kwargs) -> "CartesianMRI":
        """One mask per item drawn by ``mask_func`` for ``width`` columns (and ``height`` rows: 2-D mask functions
        need it), seeded per item (fastMRI seeds by file name, so the same volume always gets the same mask). The
        masks' ``num_low_frequencies`` are kept for k-space networks."""
        drawn = [draw_mask(mask_func, width, height, s) for s in seeds]
        masks = torch.stack([d.mask.reshape(1, -1, width) for d in drawn])
        acc = torch.tensor([d.acceleration for d in drawn], dtype=torch.float32)
        low = torch.tensor([d.num_low_frequencies for d in drawn], dtype=torch.long)
        return cls(masks, accelerations=acc, num_low_frequencies=low, **kwargs)

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @property
    def coils(self) -> int:
        return 1 if self.sens_maps is None else int(self.sens_maps.shape[1])

    @property
    def two_dimensional(self) -> bool:
        """Whether the masks are 2-D ``(B, 1, H, W)`` rather than column masks."""
        return self.mask.shape[-2] > 1

    def __repr__(self) -> str:
        return f"CartesianMRI(mask={tuple(self.mask.shape)}, crop={self.crop}, coils={self.coils})"

    def describe(self) -> dict:
        return {"modality": "mri", "coils": "single" if self.sens_maps is None else "multi",
                "n_coils": self.coils, "crop": list(self.crop) if self.crop else None,
                "mask": "2-D" if self.two_dimensional else "columns"}

    def select(self, idx: Tensor) -> "CartesianMRI":
        n = len(self)
        i = idx.to(self.mask.device)
        mask = self.mask.index_select(0, i) if n > 1 else self.mask.expand(len(idx), -1, -1, -1)
        sens = self.sens_maps
        if sens is not None and sens.shape[0] > 1:
            sens = sens.index_select(0, idx.to(sens.device))
        acc = (self.accelerations.index_select(0, idx.to(self.accelerations.device)) if n > 1
               else self.accelerations.expand(len(idx)))
        low = self.num_low_frequencies
        if low is not None:
            low = low.index_select(0, idx.to(low.device)) if low.numel() > 1 else low.expand(len(idx))
        return CartesianMRI(mask, self.crop, sens, acc, self.clamp, low)

    def to(self, device: torch.device | str) -> "CartesianMRI":
        sens = None if self.sens_maps is None else self.sens_maps.to(device)
        low = None if self.num_low_frequencies is None else self.num_low_frequencies.to(device)
        return CartesianMRI(self.mask.to(device), self.crop, sens, self.accelerations.to(device), self.clamp, low)

    def _mask_for(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.mask.shape[-1] or self.mask.shape[-2] not in (1, x.shape[-2]):
            raise BlindspotError(None, f"the mask is {self.mask.shape[-2]}x{self.mask.shape[-1]} but the image is "
                                       f"{x.shape[-2]}x{x.shape[-1]}")
        return self.mask.to(device=x.device, dtype=x.real.dtype)

    def _masked_columns(self, images: Tensor) -> Tensor:
        """``F⁻¹(M ⊙ F(images))`` for complex or real ``(B, C, H, W)`` (:func:`~blindspot.physics.mri.masked_image`:
        1-D transforms along the rows for column masks, 2-D for 2-D masks)."""
        return masked_image(images, self._mask_for(images))

    def coil_images_of(self, truth: Tensor) -> Tensor:
        """``S_c · y``: coil images ``(B, C, H, W)`` of truths ``(B, 1, H, W)`` (the truth itself for one coil)."""
        if self.sens_maps is None:
            return truth
        return self.sens_maps.to(truth.device) * truth

    def _image(self, coil_images: Tensor) -> Tensor:
        img = coil_images if self.crop is None else center_crop(coil_images, self.crop)
        return rss(img, dim=1) if img.shape[1] > 1 else img.abs()

    def measure(self, truth: Tensor, generator: torch.Generator | None = None) -> Measurement:
        if truth.ndim != 4 or truth.shape[1] != 1:
            raise BlindspotError(None, f"MRI truths must be (B, 1, H, W), got {tuple(truth.shape)}")
        mask = self._mask_for(truth).expand(truth.shape[0], -1, -1, -1)
        coils = self._masked_columns(self.coil_images_of(truth))
        return Measurement(self._image(coils), coils, mask)

    def perturb(self, measurement: Measurement, delta: Tensor) -> Measurement:
        coils = measurement.coil_images + self._masked_columns(self.coil_images_of(delta))
        return Measurement(self._image(coils), coils, measurement.mask)

    def normalization(self, measurement: Measurement) -> NormStats:
        return normalize(measurement.image, clamp=self.clamp)[1]

    def crop_image(self, image: Tensor) -> Tensor:
        return image if self.crop is None else center_crop(image, self.crop)

    def adjoint(self, measurement: Measurement) -> Tensor:
        """``Σ_c conj(S_c) F⁻¹(M k_c)``: complex ``(B, 1, H, W)`` (the zero-filled complex image for one coil)."""
        if self.sens_maps is None:
            return measurement.coil_images
        return (self.sens_maps.to(measurement.coil_images.device).conj() * measurement.coil_images).sum(1, True)

    def pinv(self, measurement: Measurement) -> Tensor:
        return measurement.image

    def null_space(self, image: Tensor) -> Tensor:
        """``F⁻¹((1 − M) ⊙ F(image))`` (complex, same shape): invisible to the mask; orthogonal to the rest.

        This is the acquisition's null space for one coil (and, for column masks, for coil maps that vary only along
        the rows). With maps that vary across the sampled axes, multiplying by ``S_c`` moves part of such a change
        into sampled k-space: the multi-coil null space is then smaller, and this projector only bounds it."""
        return image - self._masked_columns(image)

    def information(self, clean: Measurement, perturbed: Measurement, stats: NormStats) -> Tensor:
        return (stats.apply(perturbed.image) - stats.apply(clean.image)).square().mean((1, 2, 3))

    def network_mask(self, width: int, height: int | None = None) -> Tensor:
        """The masks mapped onto a ``width``-column (and, for 2-D masks, ``height``-row) image grid (for networks that
        take the mask with a cropped image, like I-RIM), ``(B, 1, 1, width)`` or ``(B, 1, height, width)``."""
        return resample_mask(self.mask, width, height)

    # ---- measurement perturbations and the measured / unmeasured split (issue 15). Additions only. -------------
    def measurement_vector(self, measurement: Measurement) -> Tensor:
        return measurement.kspace

    def sampling_pattern(self, like: Tensor) -> Tensor:
        """The sampled k-space entries as a 0/1 tensor broadcasting against ``like`` ``(B, C, H, W)`` (centred like
        :func:`~blindspot.physics.mri.fft2c`)."""
        return self.mask.to(device=like.device, dtype=like.real.dtype)

    def project_measurements(self, e: Tensor) -> Tensor:
        """``M ⊙ e``: only sampled k-space entries carry a measurement perturbation."""
        return e * self.sampling_pattern(e)

    def perturb_measurements(self, measurement: Measurement, e: Tensor) -> Measurement:
        """k-space ``k + M ⊙ e`` (``e`` complex ``(B, C, H, W)``, data units): coil images ``+ F⁻¹(M ⊙ e)``, then the
        zero-filled image as usual, so every network convention (image, image + mask, k-space) sees it."""
        coils = measurement.coil_images + ifft2c(self.project_measurements(e))
        return Measurement(self._image(coils), coils, measurement.mask)

    def measurement_scale(self, measurement: Measurement) -> Tensor:
        """``‖M ⊙ k‖`` over coils ``(B,)`` (= ‖coil images‖ by Parseval)."""
        c = measurement.coil_images
        return (c.real.square() + c.imag.square()).flatten(1).sum(1).sqrt() if c.is_complex() else \
            c.flatten(1).norm(dim=1)

    def measured_split(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """The image's measured and unmeasured parts on the coil k-space grid, complex ``(B, C, H, W)`` each.

        Every coil image ``S_c · z`` is split by the sampling mask: ``r_c = F⁻¹(M F(S_c z))`` (what the scanner
        measures of ``z``) and ``n_c = F⁻¹((1 − M) F(S_c z))`` (what it cannot see); ``r_c + n_c = S_c z`` and the two
        are orthogonal, so ``Σ_c ‖r_c‖² + Σ_c ‖n_c‖² = Σ_c ‖S_c z‖²`` (``= ‖z‖²`` where ``Σ_c |S_c|² = 1``). For one
        coil this is the range / null-space decomposition of the acquisition ``z ↦ M F z``. For several coils,
        ``Σ_c ‖r_c‖² = ‖E z‖²`` exactly for the forward operator ``E z = (M F S_c z)_c``, so a change with no measured
        part is in the null space of ``E``; the unmeasured part is what the coil k-space grid leaves open (with coil
        maps that vary across the columns it bounds ``E``'s null space from above). Images are on this acquisition's
        grid (no crop: the attacks' acquisitions work on the network's grid).
        """
        if self.crop is not None:
            raise BlindspotError(None, "the measured / unmeasured split needs images on the acquisition's own grid "
                                       "(an acquisition without a crop)")
        coils = self.coil_images_of(image.to(torch.complex64) if not image.is_complex() else image)
        measured = self._masked_columns(coils)
        return measured, coils - measured


# ----------------------------------------------------------------------------------------------------------------
# CT
# ----------------------------------------------------------------------------------------------------------------
class LowDoseCTScan(Acquisition):
    """Low-dose CT: projection-domain Poisson noise at ``I0 · dose``, FBP back to HU, the network's HU normalisation.

    Args:
        ct: the scanner model (:class:`~blindspot.physics.ct.LowDoseCT`: geometry, ``I0``, filter).
        dose: the dose fraction of the network's input (e.g. 0.25).
        normalization: the network's HU affine map (its checkpoint's).
        feature_response: ``"psf"`` (default) or ``"exact"``: how a change of the truth reaches the input (see the
            module docs).
        psf_radius: half-width in pixels of the measured point-spread function.

    :meth:`perturb` keeps the clean image's noise realisation. A feature adding at most ``Δp_max`` to a ray's line
    integral multiplies each ray's log-count variance by a factor in ``[1, exp(Δp_max)]``, so the true noise
    standard deviation of ``y + δ`` is at most ``exp(Δp_max / 2)`` times the kept one (at 512², 0.74 mm pixels: a
    100 HU disc of radius 10 px gives ``Δp_max = 0.028``, at most 1.4 %). Measured (``benchmarks/ct_lowdose.py
    --feature-noise``, 128², radius 6 px, 64 noise draws): noise std ratio 0.99 at 100 HU (bound 1.035, below the
    sampling error) and 1.33 at 1000 HU (bound 1.41).
    """

    modality = "ct"
    CACHE_SIZE = 256
    SEEDED_BATCH = 8
    ip_threshold = ROSE_DETECTABILITY
    ip_text = "detectability d' = ‖FBP(P(δ))‖ / σ_noise of the feature in the low-dose input, ≥ 5 (Rose)"

    def __init__(self, ct: LowDoseCT, dose: float, normalization: HUNormalization, feature_response: str = "psf",
                 psf_radius: int = 10) -> None:
        if not (0 < float(dose) <= 1) or not math.isfinite(float(dose)):
            raise BlindspotError(None, f"dose must be in (0, 1], got {dose}")
        if feature_response not in ("psf", "exact"):
            raise BlindspotError(None, f"feature response must be psf or exact, got {feature_response!r}")
        self.ct = ct
        self.dose = float(dose)
        self.norm = normalization
        self.feature_response = feature_response
        self.psf_radius = int(min(psf_radius, (min(ct.image_shape) - 3) // 2))
        self._psf: dict[str, Tensor] = {}
        self._measured: dict[tuple, Measurement] = {}

    def __repr__(self) -> str:
        return f"LowDoseCTScan(shape={self.ct.image_shape}, dose={self.dose:g}, i0={self.ct.i0:g})"

    def describe(self) -> dict:
        return {"modality": "ct", "dose": self.dose, "i0": self.ct.i0, "image_shape": list(self.ct.image_shape),
                "normalization": self.norm.as_dict()}

    @property
    def accelerations(self) -> Tensor:
        """The dose-reduction factor ``1/dose`` (records keep it in their ``acceleration`` column)."""
        return torch.tensor([1.0 / self.dose], dtype=torch.float32)

    def _check(self, truth: Tensor) -> None:
        if truth.ndim != 4 or truth.shape[1] != 1:
            raise BlindspotError(None, f"CT truths must be (B, 1, H, W) in HU, got {tuple(truth.shape)}")
        if tuple(truth.shape[-2:]) != tuple(self.ct.image_shape):
            raise BlindspotError(None, f"the CT acquisition is for {self.ct.image_shape[0]}x{self.ct.image_shape[1]} "
                                       f"images, got {truth.shape[-2]}x{truth.shape[-1]}")

    def exact_response(self, delta_hu: Tensor) -> Tensor:
        """``FBP(P(δ))`` in HU ``(B, 1, H, W)`` through the discretised projector and FBP."""
        p = self.ct.projector
        return p.fbp(p.project(delta_hu))

    def psf(self, device: torch.device | str = "cpu") -> Tensor:
        """The point-spread function of FBP∘P, ``(2r+1, 2r+1)`` for ``r = psf_radius``: the mean response to a grid
        of single-pixel impulses ``2r + 4`` pixels apart (at most 7×7 of them, around the centre), so that it
        averages over where a pixel falls between detector bins, scaled to unit sum."""
        key = str(device)
        if key not in self._psf:
            r = self.psf_radius
            H, W = self.ct.image_shape
            step = 2 * r + 4
            rows = [i for i in range(H // 2 - 3 * step, H // 2 + 3 * step + 1, step) if r <= i < H - r]
            cols = [j for j in range(W // 2 - 3 * step, W // 2 + 3 * step + 1, step) if r <= j < W - r]
            impulses = torch.zeros(1, 1, H, W, dtype=torch.float64)
            for i in rows:
                impulses[..., i, cols] = 1.0
            with torch.no_grad():
                resp = self.exact_response(impulses)[0, 0]
            patches = torch.stack([resp[i - r : i + r + 1, j - r : j + r + 1] for i in rows for j in cols])
            kernel = patches.mean(0)
            kernel = kernel / kernel.sum()  # FBP∘P has unit gain at zero frequency; the cut tails must not bias it
            self._psf[key] = kernel.to(device=device, dtype=torch.float32)
        return self._psf[key]

    def response(self, delta_hu: Tensor) -> Tensor:
        """``FBP(P(δ))`` in HU ``(B, 1, H, W)``: how a change of the truth reaches the low-dose image (linear); by the
        measured point-spread function unless ``feature_response="exact"``."""
        if self.feature_response == "exact":
            return self.exact_response(delta_hu)
        H, W = delta_hu.shape[-2:]
        r = self.psf_radius
        size = (H + 2 * r, W + 2 * r)  # linear (not circular) convolution: pad by the kernel's half-width
        spec = torch.fft.rfft2(delta_hu, s=size) * self._psf_spectrum(delta_hu.device, size)
        return torch.fft.irfft2(spec, s=size)[..., :H, :W].to(delta_hu.dtype)

    def _psf_spectrum(self, device: torch.device, size: tuple[int, int]) -> Tensor:
        """The PSF's 2-D real FFT on a ``size`` grid, the kernel's centre at the origin (cached per device)."""
        key = f"spectrum:{device}:{size}"
        if key not in self._psf:
            r = self.psf_radius
            kernel = torch.zeros(size, device=device)
            kernel[: 2 * r + 1, : 2 * r + 1] = self.psf(device)
            self._psf[key] = torch.fft.rfft2(torch.roll(kernel, (-r, -r), dims=(0, 1)))
        return self._psf[key]

    def measure(self, truth: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None
                ) -> Measurement:
        """Simulate the low-dose input of full-dose truths in HU; ``generator`` (on the truth's device) seeds the
        photon counts, or one generator per image (as in :meth:`~blindspot.physics.ct.LowDoseCT.simulate`). Not
        differentiable (a Poisson draw); :meth:`perturb` is.

        The noise realisation ``n = A(y) − FBP(P(y))`` needs the noise-free reconstruction as well as the noisy one
        (the truth itself is no substitute: FBP∘P blurs its edges by tens of HU RMS, more than the noise); both are
        reconstructed in one batched FBP, which shares the back-projection's sampling geometry between them."""
        self._check(truth)
        with torch.no_grad():
            images = self.ct.simulate(truth, (self.dose,), generator, noise_free=True)
            low = images[self.dose]
            noise = low - images[0.0]
        return Measurement(low, noise=noise)

    def measure_seeded(self, truth: Tensor, seeds: Sequence[int]) -> Measurement:
        """Simulate each image with its own seed (so an image's noise does not depend on its batch), remembering the
        last :attr:`CACHE_SIZE` images: the searches of one run share every image's clean measurement. An image's
        measurement is bit for bit the same in any batch: the images not yet measured are simulated together (up to
        :attr:`SEEDED_BATCH` at a time) where the projector computes each image alone
        (:meth:`~blindspot.physics.ct.ParallelBeamProjector.computes_images_alone`: its CPU kernels; at 512² about 3×
        faster than one by one, ``benchmarks/ct_lowdose.py``, ``ct_measure``), else one by one (a batched
        ``grid_sample`` FBP agrees only to float rounding)."""
        sums = truth.detach().flatten(1).sum(1).tolist()  # tells apart two images given the same seed (one sync)
        keys = [(int(seed), str(truth.device), sums[i]) for i, seed in enumerate(seeds)]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}  # an image given twice is simulated once
        missing = sorted(i for key, i in first.items() if key not in self._measured)
        step = self.SEEDED_BATCH if self.ct.projector.computes_images_alone(truth) else 1
        for start in range(0, len(missing), step):
            rows = missing[start : start + step]
            gens = [torch.Generator(device=truth.device).manual_seed(keys[i][0]) for i in rows]
            batch = self.measure(truth[rows], gens)
            for j, i in enumerate(rows):
                self._measured[keys[i]] = batch.select(torch.tensor([j]))
        parts = [self._measured[key] for key in keys]
        while len(self._measured) > self.CACHE_SIZE:
            self._measured.pop(next(iter(self._measured)))
        return Measurement.cat(parts)

    def observed(self, truth: Tensor, low_dose: Tensor) -> Measurement:
        """The measurement of a real pair: the scanner's low-dose image ``(B, 1, H, W)`` HU of full-dose ``truth``.
        Its noise is taken as ``low − full``: for nested doses (real LDCT data, blindspot's simulations) that is the
        noise the low dose adds to the full-dose image's own, ``√(1 − dose)`` of its total standard deviation when
        both are Poisson-limited (e.g. 87 % at 25 % dose), so ``d'`` reads slightly high."""
        if low_dose.shape != truth.shape:
            raise BlindspotError(None, f"low-dose images {tuple(low_dose.shape)} and truths {tuple(truth.shape)} "
                                       "differ in shape")
        return Measurement(low_dose, noise=(low_dose - truth).detach())

    def perturb(self, measurement: Measurement, delta: Tensor) -> Measurement:
        return Measurement(measurement.image + self.response(delta), noise=measurement.noise)

    def normalization(self, measurement: Measurement) -> NormStats:
        B = len(measurement)
        dev = measurement.image.device
        mean = torch.full((B, 1, 1, 1), self.norm.mean, device=dev)
        std = torch.full((B, 1, 1, 1), self.norm.std, device=dev)
        return NormStats(mean, std, clamp=None)

    def display_range(self, stats: NormStats) -> Tensor:
        w = WINDOWS["abdomen"]
        hu = torch.tensor([w.lower, w.upper], device=stats.mean.device).reshape(1, 1, 1, 2)
        return stats.apply(hu, clamp=False).reshape(-1, 2)

    def noise_sigma(self, measurement: Measurement) -> Tensor:
        """Per-item standard deviation (HU) of the input's noise, ``(B,)``, inside the measurement's field of view
        when it carries one (out-of-field pixels were never measured)."""
        if measurement.noise is None:
            raise BlindspotError(None, "this CT measurement carries no noise realisation")
        n = measurement.noise.flatten(1)
        if measurement.field is None:
            return n.std(dim=1)
        w = measurement.field.flatten(1).to(n.dtype)
        count = w.sum(1)
        mean = (n * w).sum(1) / count.clamp_min(1.0)
        return (((n - mean[:, None]) * w).square().sum(1) / (count - 1.0).clamp_min(1.0)).sqrt()

    def information(self, clean: Measurement, perturbed: Measurement, stats: NormStats) -> Tensor:
        change = perturbed.image - clean.image
        if clean.field is not None:  # only what reaches the image inside the field of view
            change = change * clean.field
        signal = change.flatten(1).norm(dim=1)
        return signal / self.noise_sigma(clean).clamp_min(1e-6)

    # ---- measurement perturbations (issue 15). Additions only. --------------------------------------------------
    def measurement_vector(self, measurement: Measurement) -> Tensor:
        return measurement.image

    def perturb_measurements(self, measurement: Measurement, e: Tensor) -> Measurement:
        """The low-dose input plus ``e`` (HU ``(B, 1, H, W)``), the noise realisation kept."""
        return Measurement(measurement.image + e, noise=measurement.noise)

    def measurement_scale(self, measurement: Measurement) -> Tensor:
        """``‖n‖`` (HU), the norm of the input's noise realisation ``(B,)``: budget 1 is a change as large as the
        noise already in the input."""
        if measurement.noise is None:
            raise BlindspotError(None, "this CT measurement carries no noise realisation")
        return measurement.noise.flatten(1).norm(dim=1)


__all__ = ["Acquisition", "CartesianMRI", "LowDoseCTScan", "Measurement", "ROSE_DETECTABILITY",
           "SEED_IP_THRESHOLD"]
