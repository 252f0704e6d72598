"""MRI acquisition physics: centred orthonormal FFT, fastMRI Cartesian masks, under-sampling, normalisation.

Conventions (DESIGN.md §1.1):

* k-space of an image is ``F(y) = fftshift(fft2(ifftshift(y), norm="ortho"))`` over the last two axes, so the DC
  sample sits at index ``(H // 2, W // 2)`` and Parseval holds: ``‖F(y)‖ = ‖y‖``.
* Masks select phase-encode columns (the last axis) with fastMRI's semantics and seeding (a file name or an int).
* The zero-filled input is ``A(y) = |F⁻¹(M ⊙ F(y))|``, root-sum-of-squares over coils for multi-coil data.
* ``N(x) = clamp((x − μ_x) / σ_x, −6, 6)`` with the statistics of the zero-filled input; targets and features are
  normalised with the *same* statistics (:class:`NormStats`).

Everything here is batched torch code that runs on the tensors' device and is differentiable with respect to the
image, so attacks can back-propagate through the acquisition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from blindspot.errors import BlindspotError

Seed = Union[int, str, Sequence[int], None]

#: The fastMRI challenge settings: (acceleration, centre fraction).
STANDARD_SETTINGS: dict[int, float] = {4: 0.08, 8: 0.04}


# ----------------------------------------------------------------------------------------------------------------
# Fourier transforms
# ----------------------------------------------------------------------------------------------------------------
def fft2c(image: Tensor) -> Tensor:
    """Centred, orthonormal 2-D DFT over the last two axes.

    Args:
        image: complex (or real, promoted to complex) tensor ``(..., H, W)``.
    Returns:
        k-space, complex tensor ``(..., H, W)`` with DC at ``(H // 2, W // 2)``.
    """
    if not image.is_complex():
        image = image.to(torch.complex64 if image.dtype != torch.float64 else torch.complex128)
    x = torch.fft.ifftshift(image, dim=(-2, -1))
    x = torch.fft.fft2(x, dim=(-2, -1), norm="ortho")
    return torch.fft.fftshift(x, dim=(-2, -1))


def ifft2c(kspace: Tensor) -> Tensor:
    """Inverse of :func:`fft2c`: complex k-space ``(..., H, W)`` → complex image ``(..., H, W)``."""
    if not kspace.is_complex():
        raise TypeError("ifft2c expects complex k-space")
    x = torch.fft.ifftshift(kspace, dim=(-2, -1))
    x = torch.fft.ifft2(x, dim=(-2, -1), norm="ortho")
    return torch.fft.fftshift(x, dim=(-2, -1))


def rss(coil_images: Tensor, dim: int = 1) -> Tensor:
    """Root-sum-of-squares of complex or real coil images over ``dim`` (kept, size 1).

    Computed as ``sqrt(Σ re² + im²)`` (5x faster than ``linalg.vector_norm`` on complex CPU tensors); the sum is
    floored at 1e-30 before the square root so the gradient stays finite where every coil is exactly zero.
    """
    if coil_images.is_complex():
        power = (coil_images.real**2 + coil_images.imag**2).sum(dim=dim, keepdim=True)
    else:
        power = (coil_images**2).sum(dim=dim, keepdim=True)
    return torch.sqrt(power.clamp_min(1e-30))


def center_crop(x: Tensor, shape: tuple[int, int]) -> Tensor:
    """Central ``(h, w)`` crop of the last two axes; the crop must fit (fastMRI's rounding: offset ``(H - h) // 2``)."""
    h, w = int(shape[0]), int(shape[1])
    H, W = x.shape[-2], x.shape[-1]
    if not (0 < h <= H and 0 < w <= W):
        raise ValueError(f"crop {h}x{w} does not fit inside {H}x{W}")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top : top + h, left : left + w]


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------
def seed_to_rng(seed: Seed) -> np.random.RandomState:
    """fastMRI's seeding: a file name seeds with the tuple of its character codes; an int seeds directly."""
    if isinstance(seed, str):
        seed = tuple(map(ord, seed))
    return np.random.RandomState(seed)


@dataclass(frozen=True)
class Mask:
    """A sampled Cartesian mask.

    Attributes:
        mask: float32 tensor ``(1, W)`` of 0/1 over phase-encode columns; broadcasts against ``(..., H, W)``.
        acceleration: the nominal acceleration ``R`` that was drawn.
        center_fraction: the centre fraction that was drawn.
        num_low_frequencies: number of fully sampled central columns, ``round(W * center_fraction)``.
    """

    mask: Tensor
    acceleration: float
    center_fraction: float
    num_low_frequencies: int

    @property
    def sampled_fraction(self) -> float:
        return float(self.mask.mean())


class MaskFunc:
    """Base of fastMRI-style column mask functions.

    Args:
        center_fractions: one or more centre fractions (fastMRI's first argument).
        accelerations: the matching accelerations ``R`` (same length); pair ``i`` is drawn with probability
            ``1/len`` on each call, as in fastMRI.
        seed: seed of the function's own generator, used when a call passes no seed.

    The argument order is fastMRI's, ``RandomMaskFunc([0.08], [4])``; keywords work too
    (``RandomMaskFunc(accelerations=[4], center_fractions=[0.08])``). Arguments given in the other order
    (accelerations first) are a one-line error that says so.

    Calling ``mask_func(width, seed=...)`` returns a :class:`Mask`; the same seed (a file name or an int) gives the
    same mask as fastMRI's mask function of the same name (``EquispacedMaskFunc``: fastMRI's
    ``EquispacedMaskFractionFunc``, the equispaced masks of the public multi-coil data), and the function's own
    generator state is left untouched by a seeded call.
    """

    def __init__(self, center_fractions: Iterable[float], accelerations: Iterable[float], seed: Seed = None):
        self.center_fractions = [float(c) for c in center_fractions]
        self.accelerations = [float(a) for a in accelerations]
        name = type(self).__name__
        if (self.center_fractions and self.accelerations and all(c >= 1 for c in self.center_fractions)
                and all(a < 1 for a in self.accelerations)):
            raise BlindspotError(
                None,
                f"{name} takes (center_fractions, accelerations) in fastMRI's order, got center fractions "
                f"{self.center_fractions} and accelerations {self.accelerations}: swap them or use keywords",
            )
        if not self.accelerations or len(self.accelerations) != len(self.center_fractions):
            raise BlindspotError(
                None,
                f"need one centre fraction per acceleration, got center_fractions {self.center_fractions} "
                f"and accelerations {self.accelerations}",
            )
        for a, c in zip(self.accelerations, self.center_fractions):
            if a < 1:
                raise BlindspotError(None, f"acceleration must be >= 1, got {a}")
            if not 0 < c <= 1 or c > 1 / a + 1e-12:
                raise BlindspotError(
                    None, f"centre fraction {c} must lie in (0, 1/R] for acceleration {a}"
                )
        self.rng = seed_to_rng(seed)

    def __call__(self, width: int, seed: Seed = None) -> Mask:
        rng = self.rng if seed is None else seed_to_rng(seed)
        choice = rng.randint(len(self.accelerations))
        acceleration, center_fraction = self.accelerations[choice], self.center_fractions[choice]
        num_low = int(round(width * center_fraction))
        columns = self._outer_columns(rng, width, acceleration, num_low)
        pad = (width - num_low + 1) // 2
        columns[pad : pad + num_low] = True
        mask = torch.from_numpy(columns.astype(np.float32)).reshape(1, width)
        return Mask(mask, acceleration, center_fraction, num_low)

    def _outer_columns(self, rng: np.random.RandomState, width: int, acceleration: float, num_low: int) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(center_fractions={self.center_fractions}, "
            f"accelerations={self.accelerations})"
        )


class RandomMaskFunc(MaskFunc):
    """Central ``round(W·cf)`` columns, others independently with ``p = (W/R − n_low)/(W − n_low)``.

    The expected number of sampled columns is ``W/R`` (fastMRI's ``RandomMaskFunc``).
    """

    def _outer_columns(self, rng, width, acceleration, num_low):
        prob = (width / acceleration - num_low) / (width - num_low) if width > num_low else 0.0
        return rng.uniform(size=width) < prob


class EquispacedMaskFunc(MaskFunc):
    """Central block plus equally spaced columns at a random offset, the spacing adjusted so the total is ``W/R``.

    Follows fastMRI's fraction-preserving equispaced mask (``EquispacedMaskFractionFunc``): spacing
    ``R·(n_low − W)/(n_low·R − W)``, sample positions rounded to the nearest column.
    """

    def _outer_columns(self, rng, width, acceleration, num_low):
        columns = np.zeros(width, dtype=bool)
        denom = num_low * acceleration - width
        if denom == 0:
            return columns
        spacing = acceleration * (num_low - width) / denom
        if spacing <= 0:
            return columns
        offset = rng.randint(0, max(1, round(spacing)))
        positions = np.around(np.arange(offset, width - 1, spacing)).astype(np.int64)
        columns[positions[positions < width]] = True
        return columns


MASK_TYPES = {"random": RandomMaskFunc, "equispaced": EquispacedMaskFunc}


def create_mask_func(
    mask_type: str,
    accelerations: Iterable[float],
    center_fractions: Iterable[float] | None = None,
    seed: Seed = None,
) -> MaskFunc:
    """A mask function by name (``"random"`` or ``"equispaced"``).

    This helper takes the accelerations first (fastMRI's ``create_mask_for_mask_type`` and the mask classes take the
    centre fractions first); it passes both to the class by keyword. Without ``center_fractions``, each acceleration
    takes its standard fraction (4x → 0.08, 8x → 0.04) or, for other accelerations, ``0.32 / R``.
    """
    if mask_type not in MASK_TYPES:
        raise BlindspotError(None, f"unknown mask type {mask_type!r}; choose from {sorted(MASK_TYPES)}")
    accelerations = [float(a) for a in accelerations]
    if center_fractions is None:
        center_fractions = [STANDARD_SETTINGS.get(int(a), 0.32 / a) if a == int(a) else 0.32 / a for a in accelerations]
    return MASK_TYPES[mask_type](center_fractions=center_fractions, accelerations=accelerations, seed=seed)


def zero_filled(image: Tensor, mask: Tensor) -> Tensor:
    """``|F⁻¹(M ⊙ F(y))|`` per channel for a column mask, with 1-D FFTs along the columns only.

    Equal to the 2-D centred form at about a quarter of the cost: a mask that depends only on the column frequency
    commutes with the row transform, so the row FFT and its inverse cancel; and ``y ↦ F⁻¹(M ⊙ F y)`` is a circular
    convolution, so the centring shifts of :func:`fft2c` / :func:`ifft2c` cancel too once the mask itself is
    un-centred (``ifftshift``).

    Args:
        image: real or complex ``(B, C, h, w)``.
        mask: 0/1 float ``(B, 1, 1, w)``, ``(1, w)`` or ``(w,)`` over columns, centred like this module's masks.
    Returns:
        real ``(B, C, h, w)`` magnitudes; differentiable with respect to ``image``.
    """
    m = torch.fft.ifftshift(mask.to(device=image.device, dtype=image.real.dtype), dim=-1)
    k = torch.fft.fft(image, dim=-1, norm="ortho")
    return torch.fft.ifft(k * m, dim=-1, norm="ortho").abs()


# ----------------------------------------------------------------------------------------------------------------
# Under-sampling operator
# ----------------------------------------------------------------------------------------------------------------
class CartesianUndersampling:
    """The acquisition ``A``: owns the column mask(s) and the output crop.

    Args:
        mask: float tensor of 0/1 over columns, ``(W,)``, ``(1, W)`` (one mask for the batch) or ``(B, 1, 1, W)``
            (one mask per batch item; broadcasts over channels/coils and rows).
        crop: ``(h, w)`` central crop of the zero-filled image, or ``None`` for no crop.

    Shapes: images and k-space are ``(B, C, H, W)``; ``C`` is 1 for single-coil or magnitude images and the number of
    coils for multi-coil k-space. Zero-filled outputs are real ``(B, 1, h, w)``.
    """

    def __init__(self, mask: Tensor, crop: tuple[int, int] | None = None):
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.ndim == 1:
            mask = mask.reshape(1, -1)
        if mask.ndim not in (2, 4) or mask.shape[-2] != 1:
            raise ValueError(f"mask must be (W,), (1, W) or (B, 1, 1, W), got {tuple(mask.shape)}")
        self.mask = mask
        self.crop = None if crop is None else (int(crop[0]), int(crop[1]))

    @classmethod
    def from_masks(cls, masks: Sequence[Tensor], crop: tuple[int, int] | None = None) -> "CartesianUndersampling":
        """Stack per-item masks (each ``(1, W)`` or ``(W,)``) into one ``(B, 1, 1, W)`` operator."""
        stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32).reshape(1, 1, -1) for m in masks])
        return cls(stacked, crop)

    def to(self, device: torch.device | str) -> "CartesianUndersampling":
        return CartesianUndersampling(self.mask.to(device), self.crop)

    @property
    def width(self) -> int:
        return int(self.mask.shape[-1])

    def _mask_for(self, kspace: Tensor) -> Tensor:
        if kspace.shape[-1] != self.width:
            raise BlindspotError(
                None, f"mask has {self.width} columns but k-space has {kspace.shape[-1]}"
            )
        return self.mask.to(device=kspace.device, dtype=kspace.real.dtype)

    def apply_mask(self, kspace: Tensor) -> Tensor:
        """``M ⊙ k`` for complex k-space ``(B, C, H, W)``."""
        return kspace * self._mask_for(kspace)

    def kspace_to_image(self, masked_kspace: Tensor) -> Tensor:
        """Complex k-space ``(B, C, H, W)`` → real zero-filled magnitude ``(B, 1, h, w)`` (RSS over ``C``, cropped)."""
        image = ifft2c(masked_kspace)
        if self.crop is not None:
            image = center_crop(image, self.crop)
        return rss(image, dim=1) if image.shape[1] > 1 else image.abs()

    def from_kspace(self, kspace: Tensor) -> tuple[Tensor, Tensor]:
        """Fully sampled k-space ``(B, C, H, W)`` → (masked k-space ``(B, C, H, W)``, zero-filled ``(B, 1, h, w)``)."""
        masked = self.apply_mask(kspace)
        return masked, self.kspace_to_image(masked)

    def __call__(self, image: Tensor) -> Tensor:
        """``A(y)``: image ``(B, C, H, W)`` (real magnitude or complex coil images) → zero-filled ``(B, 1, h, w)``.

        Differentiable with respect to ``image``. For a magnitude ground truth the k-space is simulated as
        ``F(y)``, as the FNAF attack does.
        """
        if image.shape[-1] != self.width:
            raise BlindspotError(None, f"mask has {self.width} columns but the image has {image.shape[-1]}")
        if image.shape[1] == 1:  # single channel: the column-only transform (see zero_filled), then crop
            out = zero_filled(image, self.mask)
            return out if self.crop is None else center_crop(out, self.crop)
        return self.from_kspace(fft2c(image))[1]

    def null_space_part(self, image: Tensor) -> Tensor:
        """The part of ``image`` the mask cannot see: ``F⁻¹((1 − M) ⊙ F(image))`` (complex, uncropped)."""
        k = fft2c(image)
        return ifft2c(k - self.apply_mask(k))

    def __repr__(self) -> str:
        return f"CartesianUndersampling(mask={tuple(self.mask.shape)}, crop={self.crop})"


# ----------------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormStats:
    """Per-item statistics of a zero-filled input, ``mean`` and ``std`` each ``(B, 1, 1, 1)``.

    ``apply`` normalises any image of the same item (the target, a feature) with them; ``invert`` undoes it.
    """

    mean: Tensor
    std: Tensor
    clamp: float | None = 6.0

    def apply(self, x: Tensor, clamp: bool = True) -> Tensor:
        """``(x − μ)/σ``, clamped to ``±clamp`` when ``clamp`` is true. ``x``: ``(B, C, H, W)``."""
        out = (x - self.mean) / self.std
        if clamp and self.clamp is not None:
            out = out.clamp(-self.clamp, self.clamp)
        return out

    def scale(self, delta: Tensor) -> Tensor:
        """Normalise a *difference* of images (e.g. a feature ``δ'``): ``δ/σ``, no shift, no clamp."""
        return delta / self.std

    def invert(self, x: Tensor) -> Tensor:
        """``x·σ + μ``: back to the input's units."""
        return x * self.std + self.mean

    def index(self, idx) -> "NormStats":
        return NormStats(self.mean[idx], self.std[idx], self.clamp)

    def repeat_interleave(self, n: int) -> "NormStats":
        """Stats for a batch in which each item is repeated ``n`` times (candidates of an attack)."""
        return NormStats(self.mean.repeat_interleave(n, 0), self.std.repeat_interleave(n, 0), self.clamp)


def normalize(x: Tensor, eps: float = 1e-11, clamp: float | None = 6.0) -> tuple[Tensor, NormStats]:
    """fastMRI U-Net normalisation of a batch of zero-filled images ``(B, C, H, W)``.

    Returns ``(clamp((x − μ)/(σ + eps), ±clamp), stats)`` with per-item mean and (unbiased) std over ``C, H, W``.
    """
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(dim=1).reshape(-1, 1, 1, 1)
    std = flat.std(dim=1).reshape(-1, 1, 1, 1) + eps
    stats = NormStats(mean, std, clamp)
    return stats.apply(x), stats


def resample_mask(mask: Tensor, width: int) -> Tensor:
    """Map a column mask ``(..., W)`` onto ``width`` columns by nearest spatial frequency.

    Column ``j`` of a ``W``-wide centred k-space holds frequency ``(j − W//2)/W`` cycles per pixel. A model that
    works on a ``width``-wide image crop (e.g. 320 of fastMRI's 368) and needs the sampling pattern of its own grid
    (I-RIM's data consistency) uses this; for ``width == W`` it returns the mask unchanged.
    """
    W = mask.shape[-1]
    if W == width:
        return mask
    i = torch.arange(width, device=mask.device, dtype=torch.float64)
    j = torch.round((i - width // 2) * W / width + W // 2).long().clamp(0, W - 1)
    return mask.index_select(-1, j)
