"""CT acquisition physics: Hounsfield units, display windows, network normalisation and low-dose simulation.

Conventions (DESIGN.md §1.4):

* Images are in Hounsfield units (HU). The linear attenuation coefficient is ``μ = μ_water · (1 + HU / 1000)``
  (``μ_air ≈ 0``), in mm⁻¹; ``μ_water`` defaults to 0.0192 mm⁻¹, water at ≈ 70 keV, the effective energy of a
  120 kVp spectrum (the simulation is monochromatic: no beam hardening, no scatter).
* Low dose is simulated in the projection domain with a parallel-beam geometry: line integrals
  ``p = ∫ μ ds`` (dimensionless), photon counts ``N ~ Poisson(I0 · dose · exp(−p))``, the log
  ``p̂ = −log(N / (I0 · dose))`` and filtered back-projection (FBP) back to HU. The noise of ``p̂`` has variance
  ``≈ 1 / (I0 · dose · exp(−p))``, so the image noise standard deviation scales as ``1/√dose``.
  Several doses of one slice are *nested* like the public LDCT data set's (whose low-dose images were simulated
  from the full-dose projections): a higher dose's photons are the lower dose's plus independent extra ones
  (Poisson splitting — the same law as binomially thinning the full-dose counts), so each dose's counts are exactly
  ``Poisson(I0 · dose · exp(−p))`` and the lower-dose noise contains the full-dose noise.
* The projector (:class:`ParallelBeamProjector`) is batched torch code (bilinear ray sampling with
  ``grid_sample``; ramp-filtered back-projection), differentiable with respect to the image and usable on any
  device. Its geometry is scikit-image's ``radon``/``iradon`` with ``circle=False``: rotation centre at pixel
  ``(H // 2, W // 2)``, ``ceil(√2 · max(H, W))`` detector bins of one pixel centred on bin ``n_det // 2``, and the
  ray of angle ``θ`` through detector offset ``t`` made of the points with ``x cos θ − y sin θ = t`` (``x`` to the
  right, ``y`` down, in pixels from the centre), so its sinograms match ``skimage.transform.radon`` (transposed to
  ``(angles, bins)``) — see ``benchmarks/ct_lowdose.py`` for the speed comparison that made it the default.
* Networks see normalised images ``(HU − mean) / std`` (:class:`HUNormalization`); the statistics travel in the
  checkpoint's ``"normalization"`` field as ``{"kind": "hu-affine", "mean": …, "std": …}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from blindspot.errors import BlindspotError

#: Linear attenuation of water, mm⁻¹, at ≈ 70 keV (effective energy of a 120 kVp spectrum).
MU_WATER_PER_MM = 0.0192
#: HU of air; attenuation below air (e.g. −2000 HU padding outside a scanner's field of view) is clamped to zero.
HU_AIR = -1000.0
#: Unattenuated photons per detector bin and view at full dose (dose = 1). With the default 512×512 grid at
#: 0.74 mm pixels and 805 views this puts the full-dose noise in the middle of an abdomen phantom at ≈ 12 HU
#: (25 %: ≈ 24 HU, 10 %: ≈ 38 HU; Shepp–Logan filter), close to clinical abdominal CT. Coarser grids collect more
#: photons per (larger) pixel and are less noisy: ≈ 6 HU at 128×128 (lower ``i0`` to compensate).
DEFAULT_I0 = 2.0e6
#: FBP filters: scikit-image's names.
FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")


# ----------------------------------------------------------------------------------------------------------------
# HU ↔ attenuation
# ----------------------------------------------------------------------------------------------------------------
def hu_to_mu(hu: Tensor, mu_water: float = MU_WATER_PER_MM) -> Tensor:
    """HU → linear attenuation in mm⁻¹: ``μ = μ_water (1 + HU/1000)``; values below air give negative μ (not clamped)."""
    return mu_water * (1.0 + hu / 1000.0)


def mu_to_hu(mu: Tensor, mu_water: float = MU_WATER_PER_MM) -> Tensor:
    """Linear attenuation in mm⁻¹ → HU: ``HU = 1000 (μ − μ_water) / μ_water``; the inverse of :func:`hu_to_mu`."""
    return (mu / mu_water - 1.0) * 1000.0


# ----------------------------------------------------------------------------------------------------------------
# Display windows
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """A display window: ``center`` and ``width`` in HU; HU in ``[center − width/2, center + width/2]`` → [0, 1]."""

    center: float
    width: float
    name: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.width) and self.width > 0):
            raise BlindspotError(None, f"bad display window C {self.center} W {self.width}: width must be > 0")

    @property
    def lower(self) -> float:
        return self.center - self.width / 2.0

    @property
    def upper(self) -> float:
        return self.center + self.width / 2.0

    def apply(self, hu: Tensor) -> Tensor:
        """Window HU images of any shape to [0, 1] (clipped). Differentiable inside the window."""
        return ((hu - self.lower) / self.width).clamp(0.0, 1.0)

    def __str__(self) -> str:
        label = f"{self.name}: " if self.name else ""
        return f"{label}C {self.center:g} HU, W {self.width:g} HU"


#: The display windows of the source document: lung, abdomen (soft tissue) and differences.
WINDOWS: dict[str, Window] = {
    "lung": Window(-600.0, 1500.0, "lung"),
    "abdomen": Window(50.0, 400.0, "abdomen"),
    "difference": Window(0.0, 100.0, "difference"),
}


def parse_window(spec: "str | Window | Sequence[float]") -> Window:
    """A window from a name (``lung``, ``abdomen``, ``difference``), ``"C,W"`` (e.g. ``"-600,1500"``), a
    ``(center, width)`` pair, or a :class:`Window`. Bad specs are a :class:`BlindspotError`."""
    if isinstance(spec, Window):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in WINDOWS:
            return WINDOWS[key]
        parts = key.replace(";", ",").split(",")
        if len(parts) == 2:
            try:
                return Window(float(parts[0]), float(parts[1]), "custom")
            except ValueError:
                pass
        raise BlindspotError(
            None, f"bad window {spec!r}: use one of {', '.join(WINDOWS)} or 'CENTER,WIDTH' in HU (e.g. '-600,1500')"
        )
    values = list(spec)
    if len(values) != 2:
        raise BlindspotError(None, f"bad window {spec!r}: expected (center, width) in HU")
    return Window(float(values[0]), float(values[1]), "custom")


def apply_window(hu: Tensor, window: "str | Window | Sequence[float]") -> Tensor:
    """Window HU images (any shape) to [0, 1]; ``window`` as accepted by :func:`parse_window`."""
    return parse_window(window).apply(hu)


# ----------------------------------------------------------------------------------------------------------------
# Network normalisation
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HUNormalization:
    """Fixed affine map between HU and network units: ``x = (HU − mean) / std`` (``mean``, ``std`` in HU).

    Both the low-dose input and the full-dose target are normalised with the same statistics (those of the
    training set's low-dose images), so ``to_hu`` maps a denoiser's output back to HU.
    """

    mean: float
    std: float

    KIND = "hu-affine"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise BlindspotError(None, f"bad CT normalisation mean {self.mean} HU, std {self.std} HU")

    def to_network(self, hu: Tensor) -> Tensor:
        """HU ``(B, 1, H, W)`` → network units."""
        return (hu - self.mean) / self.std

    def to_hu(self, x: Tensor) -> Tensor:
        """Network units ``(B, 1, H, W)`` → HU."""
        return x * self.std + self.mean

    def scale(self, delta_hu: Tensor) -> Tensor:
        """A *difference* of images in HU → network units (no shift)."""
        return delta_hu / self.std

    def unscale(self, delta: Tensor) -> Tensor:
        """A difference in network units → HU (no shift)."""
        return delta * self.std

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint's ``"normalization"`` field."""
        return {"kind": self.KIND, "mean": float(self.mean), "std": float(self.std), "units": "HU"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: Any = None) -> "HUNormalization":
        """Inverse of :meth:`as_dict`; anything else is a :class:`BlindspotError` naming ``source``."""
        if not isinstance(d, Mapping) or d.get("kind") != cls.KIND:
            kind = d.get("kind") if isinstance(d, Mapping) else type(d).__name__
            raise BlindspotError(source, f"normalization is {kind!r}, expected a CT {cls.KIND!r} normalization")
        try:
            return cls(float(d["mean"]), float(d["std"]))
        except (KeyError, TypeError, ValueError):
            raise BlindspotError(source, "CT normalization needs numeric 'mean' and 'std' in HU") from None

    @classmethod
    def fit(cls, hu: Tensor) -> "HUNormalization":
        """Mean and standard deviation (HU) of a set of images of any shape."""
        hu = hu.detach().to(torch.float64)
        return cls(float(hu.mean()), float(hu.std()))


# ----------------------------------------------------------------------------------------------------------------
# Parallel-beam projector
# ----------------------------------------------------------------------------------------------------------------
def _ramp_filter_response(n_padded: int, filter_name: str, device: torch.device) -> Tensor:
    """Frequency response (rfft layout, ``n_padded // 2 + 1`` values) of the FBP filter for one-pixel bins.

    The ramp is the Fourier transform of its band-limited spatial kernel (Kak & Slaney eq. 61:
    ``h[0] = 1/4``, ``h[odd n] = −1/(π n)²``, 0 otherwise), which avoids the DC bias of a sampled ``|ω|``; the
    apodised filters multiply it by scikit-image's windows.
    """
    n = torch.arange(n_padded, dtype=torch.float64, device=device)
    dist = torch.minimum(n, n_padded - n)  # circular distance from 0
    h = torch.zeros(n_padded, dtype=torch.float64, device=device)
    h[0] = 0.25
    odd = (dist % 2) == 1
    h[odd] = -1.0 / (math.pi * dist[odd]) ** 2
    response = 2.0 * torch.fft.rfft(h).real  # × 2: the one-sided ramp |ω| of scikit-image's convention
    freq = torch.arange(response.shape[0], dtype=torch.float64, device=device) / n_padded  # cycles / bin, 0 … 0.5
    omega = math.pi * freq
    if filter_name == "ramp":
        window = torch.ones_like(omega)
    elif filter_name == "shepp-logan":
        window = torch.where(omega > 0, torch.sin(omega) / omega.clamp_min(1e-12), torch.ones_like(omega))
    elif filter_name == "cosine":
        window = torch.cos(omega)
    elif filter_name in ("hamming", "hann"):
        # numpy's window of length n_padded moved onto DC (fftshift); a real filter sees its even part
        k = torch.arange(response.shape[0], dtype=torch.float64, device=device)
        a = 0.54 if filter_name == "hamming" else 0.5

        def win(n: Tensor) -> Tensor:
            return a - (1.0 - a) * torch.cos(2.0 * math.pi * n / (n_padded - 1))

        window = 0.5 * (win(n_padded // 2 + k) + win(n_padded // 2 - k))
    else:
        raise BlindspotError(None, f"unknown FBP filter {filter_name!r}; use one of {', '.join(FILTERS)}")
    return (response * window).to(torch.float32)


class ParallelBeamProjector:
    """Parallel-beam Radon transform and filtered back-projection of images ``(B, 1, H, W)`` (batched, any device).

    Args:
        image_shape: ``(H, W)`` in pixels.
        n_angles: number of views over [0°, 180°); default ``ceil(π/2 · max(H, W))`` (angular Nyquist rate, so
            FBP shows no view-aliasing streaks).
        filter_name: FBP filter, one of :data:`FILTERS`.
        method: ``"pixel"`` (default) — pixel-driven projection: every pixel's shadow, a box of width
            ``max(|cos θ|, |sin θ|)`` bins, is split between the (at most two) bins it overlaps (the distance-driven
            rule; the fastest on CPU). ``"ray"`` — ray-driven: bilinear samples one pixel apart along each ray,
            identical to ``skimage.transform.radon(circle=False)``.
        chunk_elements: views are processed in chunks of about this many (view × pixel) elements (bounds memory).

    All lengths are in pixels: :meth:`project` of an image in "per pixel" units gives dimensionless line integrals,
    and :meth:`fbp` inverts it (its back-projection is scikit-image's ``iradon`` to float precision). Everything is
    differentiable with respect to its input.
    """

    METHODS = ("pixel", "ray")

    def __init__(
        self,
        image_shape: tuple[int, int],
        n_angles: int | None = None,
        filter_name: str = "ramp",
        method: str = "pixel",
        chunk_elements: int = 1 << 21,
    ) -> None:
        H, W = int(image_shape[0]), int(image_shape[1])
        if H < 2 or W < 2:
            raise BlindspotError(None, f"CT image shape {H}x{W} is too small (need at least 2x2 pixels)")
        if filter_name not in FILTERS:
            raise BlindspotError(None, f"unknown FBP filter {filter_name!r}; use one of {', '.join(FILTERS)}")
        if method not in self.METHODS:
            raise BlindspotError(None, f"unknown projector {method!r}; use one of {', '.join(self.METHODS)}")
        self.image_shape = (H, W)
        self.n_angles = int(n_angles) if n_angles is not None else int(math.ceil(math.pi / 2.0 * max(H, W)))
        if self.n_angles < 1:
            raise BlindspotError(None, f"n_angles must be positive, got {n_angles}")
        self.filter_name = filter_name
        self.method = method
        self.n_det = int(math.ceil(math.sqrt(2.0) * max(H, W)))
        self.angles = torch.arange(self.n_angles, dtype=torch.float64) * (math.pi / self.n_angles)  # radians
        self.chunk_elements = int(chunk_elements)
        self._cache: dict[tuple[str, str], Tensor] = {}

    def __repr__(self) -> str:
        H, W = self.image_shape
        return (
            f"ParallelBeamProjector({H}x{W}, n_angles={self.n_angles}, n_det={self.n_det}, "
            f"filter={self.filter_name!r}, method={self.method!r})"
        )

    # geometry helpers -------------------------------------------------------------------------------------------
    def _trig(self, device: torch.device) -> tuple[Tensor, Tensor]:
        key = ("trig", str(device))
        if key not in self._cache:
            self._cache[key] = torch.stack([torch.cos(self.angles), torch.sin(self.angles)]).to(device, torch.float32)
        trig = self._cache[key]
        return trig[0], trig[1]

    def _filter(self, device: torch.device) -> tuple[Tensor, int]:
        n_padded = max(64, 1 << int(math.ceil(math.log2(2 * self.n_det))))
        key = ("filter", str(device))
        if key not in self._cache:
            self._cache[key] = _ramp_filter_response(n_padded, self.filter_name, device)
        return self._cache[key], n_padded

    def _check(self, x: Tensor, what: str, shape: tuple[int, int]) -> None:
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != shape:
            raise ValueError(f"{what} must be (B, 1, {shape[0]}, {shape[1]}), got {tuple(x.shape)}")

    def _angle_chunks(self, per_view: int):
        step = max(1, self.chunk_elements // max(1, per_view))
        for a0 in range(0, self.n_angles, step):
            yield a0, min(step, self.n_angles - a0)

    def _bins(self, a0: int, ac: int, device: torch.device, footprint: bool = False) -> tuple[Tensor, Tensor]:
        """For views ``a0 … a0+ac−1``: the lower of the two bins each pixel touches, as a flat index into a buffer of
        ``n_det + 2`` bins per view (one spare bin each side), and the share of the upper bin. Shapes ``(ac, H, W)``
        (int64, float32).

        ``footprint=False``: linear interpolation at the pixel centre's bin coordinate (the back-projector's rule).
        ``footprint=True``: the pixel's shadow modelled as a box of width ``max(|cos θ|, |sin θ|)`` bins (≤ 1, so it
        covers at most two bins), split by overlap — the distance-driven rule, which avoids the moiré of projecting
        pixel centres by linear interpolation.
        """
        H, W = self.image_shape
        D = self.n_det
        cos, sin = self._trig(device)
        c = cos[a0 : a0 + ac].view(-1, 1, 1)
        sn = sin[a0 : a0 + ac].view(-1, 1, 1)
        ys = (torch.arange(H, device=device, dtype=torch.float32) - H // 2).view(1, -1, 1)
        xs = (torch.arange(W, device=device, dtype=torch.float32) - W // 2).view(1, 1, -1)
        t = torch.addcmul((D // 2 + 1) - ys * sn, xs, c)  # bin coordinate + 1 of pixel (y, x) at each view, ≥ 0
        if footprint:
            width = torch.maximum(c.abs(), sn.abs())  # (ac, 1, 1), in [1/√2, 1]
            lower = torch.floor(t - 0.5 * width + 0.5)  # the bin holding the box's left edge
            weight = ((t + 0.5 * width - (lower + 0.5)) / width).clamp_(0.0, 1.0)
        else:
            lower = t.floor()
            weight = t - lower
        offsets = (torch.arange(a0, a0 + ac, device=device) * (D + 2)).view(-1, 1, 1)
        return lower.long().clamp_(0, D) + offsets, weight

    # forward projection -----------------------------------------------------------------------------------------
    def project(self, image: Tensor) -> Tensor:
        """Radon transform.

        Args:
            image: ``(B, 1, H, W)`` float tensor (e.g. attenuation per pixel).
        Returns:
            sinogram ``(B, 1, n_angles, n_det)``: line integrals in pixel units.
        """
        H, W = self.image_shape
        self._check(image, "image", (H, W))
        return self._project_ray(image) if self.method == "ray" else self._project_pixel(image)

    def _project_pixel(self, image: Tensor) -> Tensor:
        H, W = self.image_shape
        B, D, A = image.shape[0], self.n_det, self.n_angles
        device = image.device
        cdtype = torch.complex128 if image.dtype == torch.float64 else torch.complex64
        flat = image.reshape(B, 1, H * W)
        # (lower-bin share, upper-bin share) of each pixel, added as one complex number at the lower bin
        buf = torch.zeros(B, A * (D + 2), dtype=cdtype, device=device)
        for a0, ac in self._angle_chunks(H * W):
            index, w = self._bins(a0, ac, device, footprint=True)
            upper = flat * w.reshape(1, ac, H * W).to(image.dtype)  # (B, ac, HW)
            shares = torch.complex(flat - upper, upper)
            buf = buf.index_add(1, index.reshape(-1), shares.reshape(B, -1))
        bins = buf.reshape(B, A, D + 2)
        lower, upper = bins.real, bins.imag
        sino = lower[..., 1 : D + 1] + upper[..., 0:D]  # bin k gets lower shares at k and upper shares from k − 1
        return sino.unsqueeze(1)

    def _project_ray(self, image: Tensor) -> Tensor:
        H, W = self.image_shape
        device, dtype = image.device, image.dtype
        B, D = image.shape[0], self.n_det
        cos, sin = self._trig(device)
        t = torch.arange(D, device=device, dtype=torch.float32) - D // 2  # detector offsets (pixels)
        s = t  # samples along the ray: the padded square's rows, one pixel apart
        cy, cx = H // 2, W // 2
        src = image.reshape(1, B, H, W)  # batch as channels: one grid serves every image
        out = []
        for a0, ac in self._angle_chunks(D * D):
            c = cos[a0 : a0 + ac].view(-1, 1, 1)
            sn = sin[a0 : a0 + ac].view(-1, 1, 1)
            x = t.view(1, -1, 1) * c + s.view(1, 1, -1) * sn  # (ac, D, S) column offsets
            y = -t.view(1, -1, 1) * sn + s.view(1, 1, -1) * c  # row offsets
            gx = (x + cx) * (2.0 / (W - 1)) - 1.0
            gy = (y + cy) * (2.0 / (H - 1)) - 1.0
            grid = torch.stack([gx, gy], dim=-1).reshape(1, -1, D, 2).to(dtype)
            samples = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            out.append(samples.sum(dim=-1).reshape(B, ac, D))
        return torch.cat(out, dim=1).unsqueeze(1)

    # filtered back-projection -----------------------------------------------------------------------------------
    def filter_sinogram(self, sinogram: Tensor) -> Tensor:
        """Apply the FBP filter along the detector axis (zero-padded FFT). ``(B, 1, A, D)`` → same shape."""
        self._check(sinogram, "sinogram", (self.n_angles, self.n_det))
        response, n_padded = self._filter(sinogram.device)
        spec = torch.fft.rfft(sinogram, n=n_padded, dim=-1) * response.to(sinogram.dtype)
        return torch.fft.irfft(spec, n=n_padded, dim=-1)[..., : self.n_det]

    def backproject(self, sinogram: Tensor) -> Tensor:
        """Back-projection with linear interpolation between bins, scaled by ``π / (2 · n_angles)``
        (scikit-image's ``iradon`` scaling; it equals ``iradon(..., filter_name=None)`` to float precision).

        Args:
            sinogram: ``(B, 1, n_angles, n_det)``.
        Returns:
            image ``(B, 1, H, W)``.
        """
        self._check(sinogram, "sinogram", (self.n_angles, self.n_det))
        H, W = self.image_shape
        B, D, A = sinogram.shape[0], self.n_det, self.n_angles
        device = sinogram.device
        cdtype = torch.complex128 if sinogram.dtype == torch.float64 else torch.complex64
        padded = F.pad(sinogram.reshape(B, A, D), (1, 2))  # (B, A, D + 3): a zero bin before and two after
        # (value at bin k, value at k+1 − value at k) as one complex number: one gather per pixel and view
        pairs = torch.complex(padded[..., :-1], padded[..., 1:] - padded[..., :-1])[..., : D + 2].reshape(B, -1)
        image = torch.zeros(B, H * W, dtype=sinogram.dtype, device=device)
        for a0, ac in self._angle_chunks(H * W):
            index, w = self._bins(a0, ac, device)
            vals = pairs.index_select(1, index.reshape(-1)).reshape(B, ac, H * W)
            w = w.reshape(1, ac, H * W).to(sinogram.dtype)
            image = image + torch.addcmul(vals.real, w, vals.imag).sum(dim=1)
        return (image * (math.pi / (2.0 * self.n_angles))).reshape(B, 1, H, W)

    def fbp(self, sinogram: Tensor) -> Tensor:
        """Filtered back-projection: ``(B, 1, n_angles, n_det)`` → ``(B, 1, H, W)``, the inverse of :meth:`project`."""
        return self.backproject(self.filter_sinogram(sinogram))


# ----------------------------------------------------------------------------------------------------------------
# Low-dose acquisition
# ----------------------------------------------------------------------------------------------------------------
class LowDoseCT:
    """The CT acquisition: HU image → simulated (low-)dose FBP image in HU, batched on the image's device.

    Args:
        image_shape: ``(H, W)`` pixels.
        pixel_size_mm: pixel spacing in mm (square pixels; the detector bins have the same width).
        i0: unattenuated photons per detector bin and view at full dose (``dose = 1``).
        n_angles: views over 180°; default ``ceil(π/2 · max(H, W))``.
        filter_name: FBP filter (:data:`FILTERS`).
        method: projector, ``"pixel"`` or ``"ray"`` (:class:`ParallelBeamProjector`).
        mu_water: attenuation of water in mm⁻¹.
        min_counts: detected counts are clamped below at this value before the log (photon starvation).

    Typical use::

        ct = LowDoseCT((512, 512), pixel_size_mm=0.74)
        g = torch.Generator().manual_seed(0)
        images = ct.simulate(hu, doses=(1.0, 0.25, 0.10), generator=g)   # {dose: (B, 1, H, W) HU}
    """

    def __init__(
        self,
        image_shape: tuple[int, int],
        pixel_size_mm: float,
        i0: float = DEFAULT_I0,
        n_angles: int | None = None,
        filter_name: str = "shepp-logan",
        method: str = "pixel",
        mu_water: float = MU_WATER_PER_MM,
        min_counts: float = 1.0,
    ) -> None:
        if not (pixel_size_mm > 0 and i0 > 0 and mu_water > 0 and min_counts > 0):
            raise BlindspotError(
                None, f"bad CT physics: pixel size {pixel_size_mm} mm, I0 {i0}, mu_water {mu_water} must be > 0"
            )
        self.projector = ParallelBeamProjector(image_shape, n_angles=n_angles, filter_name=filter_name, method=method)
        self.pixel_size_mm = float(pixel_size_mm)
        self.i0 = float(i0)
        self.mu_water = float(mu_water)
        self.min_counts = float(min_counts)

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.projector.image_shape

    def physics_dict(self, dose: float | None = None) -> dict[str, Any]:
        """The checkpoint's ``"physics"`` field describing this acquisition (and the network's input ``dose``)."""
        out: dict[str, Any] = {
            "modality": "ct",
            "geometry": "parallel-beam",
            "i0": self.i0,
            "n_angles": self.projector.n_angles,
            "filter": self.projector.filter_name,
            "projector": self.projector.method,
            "pixel_size_mm": self.pixel_size_mm,
            "mu_water_per_mm": self.mu_water,
            "image_shape": list(self.image_shape),
        }
        if dose is not None:
            out["dose"] = float(dose)
        return out

    @classmethod
    def from_physics_dict(cls, d: Mapping[str, Any], image_shape: tuple[int, int] | None = None) -> "LowDoseCT":
        """Rebuild the acquisition from :meth:`physics_dict` (``image_shape`` overrides the stored one)."""
        shape = image_shape or tuple(d.get("image_shape") or (512, 512))
        return cls(
            (int(shape[0]), int(shape[1])),
            pixel_size_mm=float(d.get("pixel_size_mm", 0.74)),
            i0=float(d.get("i0", DEFAULT_I0)),
            n_angles=d.get("n_angles"),
            filter_name=str(d.get("filter", "shepp-logan")),
            method=str(d.get("projector", "pixel")),
            mu_water=float(d.get("mu_water_per_mm", MU_WATER_PER_MM)),
        )

    # deterministic parts ----------------------------------------------------------------------------------------
    def line_integrals(self, hu: Tensor) -> Tensor:
        """HU images ``(B, 1, H, W)`` → line integrals of attenuation ``(B, 1, n_angles, n_det)`` (dimensionless).

        Attenuation below air is clamped to zero (no negative μ from padding values such as −2000 HU).
        """
        mu_per_pixel = hu_to_mu(hu, self.mu_water).clamp_min(0.0) * self.pixel_size_mm
        return self.projector.project(mu_per_pixel)

    def reconstruct(self, line_integrals: Tensor) -> Tensor:
        """FBP of line integrals ``(B, 1, n_angles, n_det)`` → HU images ``(B, 1, H, W)``."""
        mu = self.projector.fbp(line_integrals) / self.pixel_size_mm
        return mu_to_hu(mu, self.mu_water)

    def noise_free(self, hu: Tensor) -> Tensor:
        """The acquisition without photon noise, ``FBP(P(μ))`` in HU ``(B, 1, H, W)``; differentiable.

        The expected low-dose image at any dose (up to the log's small-count bias); attacks use it as the
        deterministic part of ``A``.
        """
        return self.reconstruct(self.line_integrals(hu))

    # noise --------------------------------------------------------------------------------------------------------
    def _check_doses(self, doses: Iterable[float]) -> list[float]:
        out = [float(d) for d in doses]
        if not out or any(not (0.0 < d <= 1.0e3) or not math.isfinite(d) for d in out):
            raise BlindspotError(None, f"bad dose fractions {out}: each must be > 0 (e.g. 1.0, 0.25, 0.10)")
        return out

    def counts(self, line_integrals: Tensor, dose: float, generator: torch.Generator | None = None) -> Tensor:
        """Poisson photon counts ``N ~ Poisson(I0 · dose · exp(−p))``, same shape as ``line_integrals``."""
        dose = self._check_doses([dose])[0]
        rate = (self.i0 * dose) * torch.exp(-line_integrals.detach().to(torch.float64))
        return torch.poisson(rate, generator=generator)

    def log_counts(self, counts: Tensor, dose: float) -> Tensor:
        """Measured line integrals ``−log(max(N, min_counts) / (I0 · dose))`` as float32."""
        return torch.log((self.i0 * float(dose)) / counts.clamp_min(self.min_counts)).to(torch.float32)

    def simulate(
        self,
        hu: Tensor,
        doses: Sequence[float] = (0.25,),
        generator: torch.Generator | None = None,
        line_integrals: Tensor | None = None,
    ) -> dict[float, Tensor]:
        """Simulate nested acquisitions of the same slices at several doses.

        Args:
            hu: true images ``(B, 1, H, W)`` in HU.
            doses: dose fractions (1.0 = full dose, 0.25, 0.10, …), any order.
            generator: torch generator on ``hu``'s device (same seed → same images).
            line_integrals: precomputed ``self.line_integrals(hu)`` (saves the projection when called again).
        Returns:
            ``{dose: FBP image (B, 1, H, W) in HU}``. The lowest dose's counts are Poisson at ``I0 · dose``; each
            higher dose adds independent Poisson counts for the extra dose. By the splitting property of the
            Poisson law this is the same joint distribution as binomially thinning the full-dose counts: every dose
            is exactly Poisson at ``I0 · dose`` and the images share noise like a real low-dose simulation from
            full-dose projections.
        """
        wanted = self._check_doses(doses)
        with torch.no_grad():
            p = self.line_integrals(hu) if line_integrals is None else line_integrals
            order = sorted(set(wanted))  # ascending: lowest dose first
            transmission = torch.exp(-p.to(torch.float64))
            out: dict[float, Tensor] = {}
            counts = torch.zeros_like(transmission)
            prev = 0.0
            for d in order:
                # Poisson splitting: the photons of dose d are those of the lower dose plus independent new ones
                counts = counts + torch.poisson((self.i0 * (d - prev)) * transmission, generator=generator)
                out[d] = self.reconstruct(self.log_counts(counts, d))
                prev = d
        return {d: out[d] for d in wanted}

    def __call__(self, hu: Tensor, dose: float, generator: torch.Generator | None = None) -> Tensor:
        """One simulated acquisition at ``dose``: HU ``(B, 1, H, W)`` → noisy FBP image in HU ``(B, 1, H, W)``."""
        return self.simulate(hu, (dose,), generator)[float(dose)]


def noise_std(image_hu: Tensor, reference_hu: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-image standard deviation (HU) of ``image − reference`` over ``mask`` (all pixels when ``None``).

    Args:
        image_hu, reference_hu: ``(B, 1, H, W)``.
        mask: boolean ``(H, W)`` or ``(B, 1, H, W)``.
    Returns:
        ``(B,)`` float tensor.
    """
    diff = image_hu - reference_hu
    if mask is None:
        return diff.flatten(1).std(dim=1)
    m = mask.expand_as(diff).flatten(1).to(diff.dtype)
    n = m.sum(dim=1).clamp_min(2.0)
    mean = (diff.flatten(1) * m).sum(dim=1) / n
    var = (((diff.flatten(1) - mean[:, None]) ** 2) * m).sum(dim=1) / (n - 1.0)
    return var.sqrt()
