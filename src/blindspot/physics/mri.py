"""MRI acquisition physics: centred orthonormal FFT, fastMRI Cartesian masks, under-sampling, normalisation.

Conventions (DESIGN.md §1.1):

* k-space of an image is ``F(y) = fftshift(fft2(ifftshift(y), norm="ortho"))`` over the last two axes, so the DC
  sample sits at index ``(H // 2, W // 2)`` and Parseval holds: ``‖F(y)‖ = ‖y‖``.
* Masks select phase-encode columns (the last axis) with fastMRI's semantics and seeding (a file name or an int);
  2-D masks (``gaussian2d``, ``poisson2d``) select samples over both axes, for 3-D Cartesian acquisitions whose slice
  plane is phase-encoded in both directions.
* The zero-filled input is ``A(y) = |F⁻¹(M ⊙ F(y))|``, root-sum-of-squares over coils for multi-coil data.
* ``N(x) = clamp((x − μ_x) / σ_x, −6, 6)`` with the statistics of the zero-filled input; targets and features are
  normalised with the *same* statistics (:class:`NormStats`).

Everything here is batched torch code that runs on the tensors' device and is differentiable with respect to the
image, so attacks can back-propagate through the acquisition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

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
        mask: float32 tensor of 0/1, ``(1, W)`` over phase-encode columns (1-D masks) or ``(H, W)`` over both
            phase-encode axes (2-D masks); broadcasts against ``(..., H, W)``.
        acceleration: the nominal acceleration ``R`` that was drawn.
        center_fraction: the centre fraction that was drawn.
        num_low_frequencies: number of fully sampled central columns, ``round(W * center_fraction)`` (fastMRI's
            ``num_low_frequencies``; for a 2-D mask the width of its calibration box).
        calibration: 2-D masks only: ``(rows, columns)`` of the fully sampled central calibration box, else ``None``.
    """

    mask: Tensor
    acceleration: float
    center_fraction: float
    num_low_frequencies: int
    calibration: tuple[int, int] | None = None

    @property
    def sampled_fraction(self) -> float:
        return float(self.mask.mean())

    @property
    def two_dimensional(self) -> bool:
        return self.calibration is not None


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
    generator state is left untouched by a seeded call. A centre fraction that gives the width asked for no fully
    sampled centre column is an error naming ``--center-fractions`` (:func:`centre_lines`).
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

    #: whether the function draws 2-D masks ``(H, W)`` (it then needs the ``height``)
    two_dimensional: bool = False

    def __call__(self, width: int, seed: Seed = None, height: int | None = None) -> Mask:
        """A mask for ``width`` columns (``height`` is ignored by column masks; 2-D masks need it)."""
        rng = self.rng if seed is None else seed_to_rng(seed)
        choice = rng.randint(len(self.accelerations))
        acceleration, center_fraction = self.accelerations[choice], self.center_fractions[choice]
        num_low = centre_lines(width, center_fraction, "columns")
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


def centre_lines(size: int, center_fraction: float, what: str = "columns") -> int:
    """The fully sampled centre lines of a mask along an axis of ``size`` lines: ``round(size · center_fraction)``.

    Raises:
        BlindspotError: naming ``--center-fractions`` when that rounds to 0: a mask without a fully sampled centre
        has no auto-calibration data and, for column masks, need not sample DC at all.
    """
    n = int(round(size * center_fraction))
    if n < 1:
        raise BlindspotError("--center-fractions", f"{center_fraction:g} of {size} {what} rounds to no fully sampled "
                                                   f"centre {what[:-1]}; give a centre fraction above "
                                                   f"{0.5 / size:.3g} (or a larger image)")
    return n


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


class VariableDensityMaskFunc(MaskFunc):
    """Base of 2-D masks over both phase-encode axes of a slice (3-D Cartesian sampling: rows and columns are both
    phase-encoded, the readout runs through the slice), variable density with a fully sampled calibration box.

    Same arguments, argument order and seeding as the column masks (:class:`MaskFunc`). Each call draws one
    (acceleration, centre fraction) pair, then:

    * the calibration box: the central ``round(H·cf) × round(W·cf)`` samples (a fraction that rounds to no line is
      an error, :func:`centre_lines`), placed like the column masks' centre block (first row ``(H − h + 1) // 2``,
      first column ``(W − w + 1) // 2``), always sampled;
    * the rest: drawn by the subclass so that the whole mask holds ``round(H·W / R)`` samples (exactly for
      :class:`Gaussian2DMaskFunc`, to within ``tol`` for :class:`PoissonDisc2DMaskFunc`).

    Call as ``mask_func(width, seed=..., height=H)``; the :class:`Mask` then holds an ``(H, W)`` mask and its
    ``calibration`` box ``(h, w)``; ``num_low_frequencies`` is the box's width ``w``. The radius used for the
    variable density is ``ρ = √((2(i − H//2)/H)² + (2(j − W//2)/W)²)``: 0 at DC, 1 at the edge of the ellipse
    inscribed in k-space.
    """

    two_dimensional = True
    #: masks kept per (seed, height, width): fastMRI seeds by file name, so every slice of a volume draws the same
    CACHE_SIZE = 64

    def __call__(self, width: int, seed: Seed = None, height: int | None = None) -> Mask:
        if height is None or int(height) < 1 or int(width) < 1:
            raise BlindspotError(None, f"{type(self).__name__} draws 2-D masks: it needs the k-space height and "
                                       f"width, got {height} x {width}")
        if seed is None:
            return self._draw_mask(self.rng, int(width), int(height))
        cache = self.__dict__.setdefault("_cache", {})
        key = (seed if isinstance(seed, (str, int)) else tuple(seed), int(height), int(width))
        if key not in cache:
            cache[key] = self._draw_mask(seed_to_rng(seed), int(width), int(height))
            while len(cache) > self.CACHE_SIZE:
                cache.pop(next(iter(cache)))
        hit = cache[key]
        return Mask(hit.mask.clone(), hit.acceleration, hit.center_fraction, hit.num_low_frequencies, hit.calibration)

    def _draw_mask(self, rng: np.random.RandomState, width: int, height: int) -> Mask:
        choice = rng.randint(len(self.accelerations))
        acceleration, center_fraction = self.accelerations[choice], self.center_fractions[choice]
        H, W = int(height), int(width)
        ch, cw = centre_lines(H, center_fraction, "rows"), centre_lines(W, center_fraction, "columns")
        calib = np.zeros((H, W), dtype=bool)
        top, left = (H - ch + 1) // 2, (W - cw + 1) // 2
        calib[top : top + ch, left : left + cw] = True
        target = max(int(calib.sum()), int(round(H * W / acceleration)))
        sampled = self._draw(rng, normalized_radius(H, W), calib, target) | calib
        mask = torch.from_numpy(sampled.astype(np.float32))
        return Mask(mask, acceleration, center_fraction, cw, (ch, cw))

    def _draw(self, rng: np.random.RandomState, radius: np.ndarray, calib: np.ndarray, target: int) -> np.ndarray:
        """Boolean ``(H, W)`` samples outside the box such that, with the box, about ``target`` are sampled."""
        raise NotImplementedError


def normalized_radius(height: int, width: int) -> np.ndarray:
    """``ρ`` ``(H, W)`` float64: the k-space radius with DC at ``(H // 2, W // 2)`` and 1 at the edge of the
    inscribed ellipse (``√2`` in the corners)."""
    i = (np.arange(height) - height // 2) * (2.0 / height)
    j = (np.arange(width) - width // 2) * (2.0 / width)
    return np.sqrt(i[:, None] ** 2 + j[None, :] ** 2)


class Gaussian2DMaskFunc(VariableDensityMaskFunc):
    """Variable-density Gaussian 2-D mask: ``round(H·W/R)`` samples in all (the calibration box included), the
    others drawn without replacement with probability weights ``exp(−ρ² / (2·std²))`` (``ρ`` as in
    :class:`VariableDensityMaskFunc`; ``std`` in the same units, default 0.5: a quarter of k-space's extent along
    each axis).

    Sampling without replacement by weight is done exactly in one pass (Efraimidis and Spirakis: each candidate
    gets the key ``E/w`` with ``E ~ Exp(1)``; the smallest keys win), so the sampling fraction is ``1/R`` to within
    one sample (or the calibration box alone when it is larger).
    """

    def __init__(self, center_fractions: Iterable[float], accelerations: Iterable[float], seed: Seed = None,
                 std: float = 0.5):
        super().__init__(center_fractions, accelerations, seed)
        if not (np.isfinite(std) and std > 0):
            raise BlindspotError(None, f"the Gaussian mask's std must be > 0, got {std}")
        self.std = float(std)

    def _draw(self, rng, radius, calib, target):
        keys = rng.exponential(size=radius.shape) / np.exp(-(radius**2) / (2.0 * self.std**2))
        keys[calib] = np.inf
        extra = target - int(calib.sum())
        out = np.zeros(radius.shape, dtype=bool)
        if extra > 0:
            out.flat[np.argpartition(keys.ravel(), extra - 1)[:extra]] = True
        return out


class PoissonDisc2DMaskFunc(VariableDensityMaskFunc):
    """Variable-density Poisson-disc 2-D mask: no two samples closer than a radius that grows away from DC, so the
    samples are spread evenly (no clusters, no big holes) with a density that falls off with ``ρ``.

    The exclusion radius at a k-space position is ``r = slope·ρ`` pixels (``ρ`` as in
    :class:`VariableDensityMaskFunc`); two positions ``i, j`` conflict when their distance is below
    ``(r_i + r_j) / 2``, so k-space is fully sampled where ``r < 1`` (a disc around DC, beyond the calibration box
    at low accelerations) and the density falls as ``1/r²`` outside. For a given ``slope`` the mask is the greedy
    one in a random order (the order drawn from the seed): each position in turn is kept unless it conflicts with
    one kept before — the classical dart throwing on the grid (:func:`poisson_disc`). ``slope`` is searched with
    the same order every time (until both sides are bracketed each step follows the far field's law
    "count ∝ slope⁻²", then it interpolates log slope against log count, kept 10 % inside the bracket) until the
    mask, calibration box included, holds ``round(H·W/R)`` samples to within ``tol`` (relative; at most
    ``max_iter`` masks are drawn, and the closest is kept; 3–6 draws in practice).

    Cost: each draw is a few rounds of whole-grid tensor comparisons, one per neighbour offset within the largest
    radius (more offsets at high accelerations, where the radii are larger); measured 2.7 s (4x) and 6.3 s (8x)
    per 320×320 mask, all draws together, at one thread on a shared 2-core machine under load 9–10. Masks are kept
    per (seed, size), so the slices of a volume (one seed, the file name) draw once.
    """

    def __init__(self, center_fractions: Iterable[float], accelerations: Iterable[float], seed: Seed = None,
                 tol: float = 0.01, max_iter: int = 24):
        super().__init__(center_fractions, accelerations, seed)
        if not (0 < tol < 1) or max_iter < 1:
            raise BlindspotError(None, f"Poisson-disc mask needs 0 < tol < 1 and max_iter >= 1, got {tol}, {max_iter}")
        self.tol, self.max_iter = float(tol), int(max_iter)

    def _draw(self, rng, radius, calib, target):
        order = rng.permutation(radius.size).reshape(radius.shape)
        best, best_err = None, None
        lo: tuple[float, float] | None = None  # (log slope, log count) with count > target
        hi: tuple[float, float] | None = None  # ... with count < target
        slope = 2.0 * math.sqrt(radius.size / target)
        for _ in range(self.max_iter):
            drawn = poisson_disc(slope * radius, order)
            count = int((drawn | calib).sum())
            err = abs(count - target)
            if best_err is None or err < best_err:
                best, best_err = drawn, err
            if err <= max(1.0, self.tol * target):
                break
            point = (math.log(slope), math.log(max(count, 1)))
            if count > target:
                lo = point
            else:
                hi = point
            if lo is None or hi is None:  # no bracket yet: the law "count ∝ slope⁻²" of the far field
                slope *= math.sqrt(count / target)
            else:  # interpolate log slope against log count inside the bracket
                t = (lo[1] - math.log(target)) / (lo[1] - hi[1])
                slope = math.exp(lo[0] + min(0.9, max(0.1, t)) * (hi[0] - lo[0]))
        return best


def poisson_disc(radius: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Greedy Poisson-disc selection on a grid: the positions kept by visiting them in ``order`` and keeping each
    one unless a kept position lies closer than ``(r_i + r_j) / 2``.

    Args:
        radius: exclusion radii ``(H, W)`` in pixels (≥ 0).
        order: distinct integers ``(H, W)``, the visiting order (smallest first).
    Returns:
        boolean ``(H, W)``.

    Computed in rounds over the whole grid (one shifted comparison per neighbour offset, no loop over positions):
    an undecided position whose order is the smallest among its undecided conflicting neighbours is kept, and its
    conflicting neighbours are dropped. The position that comes first among the undecided ones is always kept, so
    the rounds end, and every decision is the one the sequential visit makes.
    """
    H, W = radius.shape
    reach = max(1, int(math.ceil(float(radius.max()))))  # conflicts need a distance < max radius
    rad = torch.zeros(H + 2 * reach, W + 2 * reach, dtype=torch.float32)
    rad[reach : reach + H, reach : reach + W] = torch.from_numpy(np.ascontiguousarray(radius, dtype=np.float32))
    rank = torch.full(rad.shape, np.iinfo(np.int64).max, dtype=torch.int64)
    rank[reach : reach + H, reach : reach + W] = torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64))
    undecided = torch.zeros(rad.shape, dtype=torch.bool)
    undecided[reach : reach + H, reach : reach + W] = True

    def inner(t: Tensor, dy: int = 0, dx: int = 0) -> Tensor:  # the (H, W) view shifted by (dy, dx)
        return t[reach + dy : reach + dy + H, reach + dx : reach + dx + W]

    here_rad, here_rank = inner(rad), inner(rank)
    shifts = []  # (dy, dx, where a position conflicts with its neighbour at that offset)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            dist = math.hypot(dy, dx)
            if 0 < dist < reach:
                close = 0.5 * (here_rad + inner(rad, dy, dx)) > dist
                if bool(close.any()):
                    shifts.append((dy, dx, close))
    kept = torch.zeros(H, W, dtype=torch.bool)
    while bool(inner(undecided).any()):
        first = inner(undecided).clone()
        for dy, dx, close in shifts:
            first &= ~(close & inner(undecided, dy, dx) & (inner(rank, dy, dx) < here_rank))
        kept |= first
        dropped = first.clone()
        padded = torch.nn.functional.pad(first, (reach, reach, reach, reach))
        for dy, dx, close in shifts:  # a conflict is symmetric: the neighbour at −offset sees this one at +offset
            dropped |= close & inner(padded, dy, dx)
        inner(undecided).logical_and_(~dropped)
    return kept.numpy()


MASK_TYPES = {"random": RandomMaskFunc, "equispaced": EquispacedMaskFunc, "gaussian2d": Gaussian2DMaskFunc,
              "poisson2d": PoissonDisc2DMaskFunc}


def create_mask_func(
    mask_type: str,
    accelerations: Iterable[float],
    center_fractions: Iterable[float] | None = None,
    seed: Seed = None,
) -> MaskFunc:
    """A mask function by name: column masks ``"random"``, ``"equispaced"``; 2-D masks ``"gaussian2d"``,
    ``"poisson2d"`` (:class:`VariableDensityMaskFunc`; call them with the k-space ``height`` too).

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


def is_column_mask(mask: Tensor) -> bool:
    """Whether a mask (``(W,)``, ``(1, W)``, ``(B, 1, 1, W)``; 2-D: ``(H, W)``, ``(B, 1, H, W)``) samples whole
    columns, i.e. its second-to-last axis has size 1."""
    return mask.ndim < 2 or mask.shape[-2] == 1


def mask_fits(mask: Tensor, shape: Sequence[int]) -> bool:
    """Whether a column or 2-D mask (:func:`is_column_mask`) is on the ``(H, W)`` grid ``shape``: ``W`` columns, and
    for a 2-D mask ``H`` rows too."""
    return mask.shape[-1] == int(shape[-1]) and (is_column_mask(mask) or mask.shape[-2] == int(shape[-2]))


def masked_image(image: Tensor, mask: Tensor) -> Tensor:
    """``F⁻¹(M ⊙ F(image))`` (complex, same shape), for a column mask or a 2-D mask.

    A column mask commutes with the row transform, so only 1-D FFTs along the rows' length are needed (about a
    quarter of the cost of the 2-D form); a 2-D mask uses 2-D FFTs. Either way ``y ↦ F⁻¹(M ⊙ F y)`` is a circular
    convolution, so the centring shifts of :func:`fft2c` / :func:`ifft2c` cancel once the mask itself is un-centred
    (``ifftshift``).

    Args:
        image: real or complex ``(B, C, H, W)``.
        mask: 0/1 float, centred like this module's masks: column masks ``(B, 1, 1, W)``, ``(1, W)`` or ``(W,)``;
            2-D masks ``(B, 1, H, W)`` or ``(H, W)``.
    Returns:
        complex ``(B, C, H, W)``; differentiable with respect to ``image``.
    """
    m = mask.to(device=image.device, dtype=image.real.dtype)
    if is_column_mask(m):
        m = torch.fft.ifftshift(m, dim=-1)
        return torch.fft.ifft(torch.fft.fft(image, dim=-1, norm="ortho") * m, dim=-1, norm="ortho")
    if tuple(m.shape[-2:]) != tuple(image.shape[-2:]):
        raise BlindspotError(None, f"the 2-D mask is {m.shape[-2]}x{m.shape[-1]} but the image is "
                                   f"{image.shape[-2]}x{image.shape[-1]}")
    m = torch.fft.ifftshift(m, dim=(-2, -1))
    return torch.fft.ifft2(torch.fft.fft2(image, dim=(-2, -1), norm="ortho") * m, dim=(-2, -1), norm="ortho")


def zero_filled(image: Tensor, mask: Tensor) -> Tensor:
    """``|F⁻¹(M ⊙ F(y))|`` per channel (:func:`masked_image`; column or 2-D mask).

    Args:
        image: real or complex ``(B, C, h, w)``.
        mask: 0/1 float column mask ``(B, 1, 1, w)``, ``(1, w)``, ``(w,)`` or 2-D mask ``(B, 1, h, w)``, ``(h, w)``.
    Returns:
        real ``(B, C, h, w)`` magnitudes; differentiable with respect to ``image``.
    """
    return masked_image(image, mask).abs()


# ----------------------------------------------------------------------------------------------------------------
# Under-sampling operator
# ----------------------------------------------------------------------------------------------------------------
class CartesianUndersampling:
    """The acquisition ``A``: owns the column mask(s) and the output crop.

    Args:
        mask: float tensor of 0/1 over columns, ``(W,)``, ``(1, W)`` (one mask for the batch) or ``(B, 1, 1, W)``
            (one mask per batch item; broadcasts over channels/coils and rows); or a 2-D mask ``(H, W)`` /
            ``(B, 1, H, W)``.
        crop: ``(h, w)`` central crop of the zero-filled image, or ``None`` for no crop.

    Shapes: images and k-space are ``(B, C, H, W)``; ``C`` is 1 for single-coil or magnitude images and the number of
    coils for multi-coil k-space. Zero-filled outputs are real ``(B, 1, h, w)``.
    """

    def __init__(self, mask: Tensor, crop: tuple[int, int] | None = None):
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.ndim == 1:
            mask = mask.reshape(1, -1)
        if mask.ndim not in (2, 4) or (mask.ndim == 4 and mask.shape[1] != 1):
            raise ValueError(f"mask must be (W,), (1, W), (B, 1, 1, W) or 2-D (H, W), (B, 1, H, W), got "
                             f"{tuple(mask.shape)}")
        self.mask = mask
        self.crop = None if crop is None else (int(crop[0]), int(crop[1]))

    @classmethod
    def from_masks(cls, masks: Sequence[Tensor], crop: tuple[int, int] | None = None) -> "CartesianUndersampling":
        """Stack per-item masks (each ``(1, W)`` or ``(W,)``; 2-D: ``(H, W)``) into one ``(B, 1, H|1, W)`` operator."""
        items = [torch.as_tensor(m, dtype=torch.float32) for m in masks]
        stacked = torch.stack([m.reshape(1, 1, -1) if m.ndim == 1 else m.reshape(1, *m.shape[-2:]) for m in items])
        return cls(stacked, crop)

    def to(self, device: torch.device | str) -> "CartesianUndersampling":
        return CartesianUndersampling(self.mask.to(device), self.crop)

    @property
    def width(self) -> int:
        return int(self.mask.shape[-1])

    def _mask_for(self, kspace: Tensor) -> Tensor:
        if not mask_fits(self.mask, kspace.shape):
            raise BlindspotError(
                None, f"mask is {self.mask.shape[-2]}x{self.width} but k-space is {kspace.shape[-2]}x{kspace.shape[-1]}"
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


def resample_mask(mask: Tensor, width: int, height: int | None = None) -> Tensor:
    """Map a mask ``(..., H, W)`` (a column mask has ``H = 1``) onto ``width`` columns (and, for a 2-D mask,
    ``height`` rows when given) by nearest spatial frequency.

    Column ``j`` of a ``W``-wide centred k-space holds frequency ``(j − W//2)/W`` cycles per pixel (rows alike). A
    model that works on a ``width``-wide image crop (e.g. 320 of fastMRI's 368) and needs the sampling pattern of its
    own grid (I-RIM's data consistency) uses this; for the same size it returns the mask unchanged.
    """

    def nearest(n_from: int, n_to: int) -> Tensor:
        i = torch.arange(n_to, device=mask.device, dtype=torch.float64)
        return torch.round((i - n_to // 2) * n_from / n_to + n_from // 2).long().clamp(0, n_from - 1)

    W = mask.shape[-1]
    if W != width:
        mask = mask.index_select(-1, nearest(W, width))
    if height is not None and mask.ndim >= 2 and mask.shape[-2] > 1 and mask.shape[-2] != height:
        mask = mask.index_select(-2, nearest(mask.shape[-2], height))
    return mask


def draw_mask(mask_func: MaskFunc | Callable[..., Mask], width: int, height: int | None, seed: Seed = None) -> Mask:
    """``mask_func``'s mask for a ``height × width`` k-space.

    2-D mask functions (``two_dimensional`` true: :class:`VariableDensityMaskFunc` and wrappers of one) are called as
    ``mask_func(width, seed=seed, height=height)`` and return an ``(H, W)`` mask (``height`` is then required);
    column mask functions — including a user's fastMRI-style callable that takes no ``height`` — as
    ``mask_func(width, seed=seed)``, ``(1, W)``.
    """
    if getattr(mask_func, "two_dimensional", False):
        if height is None:
            raise BlindspotError(None, "a 2-D mask function needs the k-space height")
        return mask_func(int(width), seed=seed, height=int(height))
    return mask_func(int(width), seed=seed)


def low_frequencies_on_grid(mask: Tensor, shape: Sequence[int], num_low_frequencies: Tensor | None) -> Tensor | None:
    """The masks' ``num_low_frequencies`` (counted on their k-space grid) when :func:`mask_on_grid` leaves them as
    they are on the ``(h, w)`` grid, else ``None`` (a k-space network then finds the centre in the mapped mask)."""
    if num_low_frequencies is None:
        return None
    return num_low_frequencies if mask_fits(mask, shape) else None


def mask_on_grid(mask: Tensor, shape: Sequence[int], batch: int | None = None) -> Tensor:
    """A batch's sampling masks on an ``(h, w)`` image grid: the one mapping every consumer of a batch's masks uses
    (the attack's acquisition, image sets, FNAF-robust training, I-RIM's data consistency).

    The masks are mapped by nearest spatial frequency (:func:`resample_mask`): exact when the grid is the k-space's
    own; for a cropped image it is an approximation (cropping in image space mixes neighbouring frequencies, so the
    crop's k-space is not exactly a subset of the measured samples) — the same approximation for column and 2-D
    masks.

    Args:
        mask: 0/1 column masks ``(W,)``, ``(1, W)``, ``(B, 1, 1, W)`` or 2-D masks ``(H, W)``, ``(B, 1, H, W)``.
        shape: ``(h, w)`` of the image grid.
        batch: the number of items ``B`` a single mask is expanded to (``None``: as many as given).
    Returns:
        float32 on ``mask``'s device: column masks ``(B, 1, 1, w)``, 2-D masks ``(B, 1, h, w)``.
    Raises:
        BlindspotError: a tensor of another shape, or ``B`` masks for another number of items.
    """
    m = torch.as_tensor(mask).to(torch.float32)
    if m.ndim in (1, 2):
        m = m.reshape(1, 1, -1 if m.ndim == 1 else m.shape[0], m.shape[-1])
    if m.ndim != 4 or m.shape[1] != 1:
        raise BlindspotError(None, f"a sampling mask must be (W,), (1, W), (B, 1, 1, W), (H, W) or (B, 1, H, W), got "
                                   f"{tuple(mask.shape)}")
    h, w = int(shape[0]), int(shape[1])
    m = resample_mask(m, w, h)
    if batch is not None and m.shape[0] != batch:
        if m.shape[0] != 1:
            raise BlindspotError(None, f"{m.shape[0]} sampling masks for {batch} images")
        m = m.expand(batch, -1, -1, -1)
    return m.contiguous()
