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
* The projector (:class:`ParallelBeamProjector`) is batched (pixel-driven box-footprint projection and linearly
  interpolating back-projection: compiled Numba kernels on the CPU, :mod:`blindspot.physics.ct_cpu`, and
  ``grid_sample`` gathers over tiles of views on other devices; FFT filtering), differentiable with respect to the
  image and usable on any device. Its geometry is scikit-image's
  ``radon``/``iradon`` with ``circle=False``: rotation centre at pixel ``(H // 2, W // 2)``,
  ``ceil(√2 · max(H, W))`` detector bins of one pixel centred on bin ``n_det // 2``, and the ray of angle ``θ``
  through detector offset ``t`` made of the points with ``x cos θ − y sin θ = t`` (``x`` to the right, ``y`` down,
  in pixels from the centre), so its sinograms match ``skimage.transform.radon`` (transposed to
  ``(angles, bins)``) — see ``benchmarks/ct_lowdose.py`` for its speed against scikit-image.
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
from blindspot.physics import ct_cpu

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


#: Values one tile of the projector writes at once by default: 16 MiB of float32 on the CPU (smaller tiles fit the
#: cache better but, on a loaded machine, each of their many parallel regions can stall a thread), 64 MiB on other
#: devices, where large kernels pay.
_TILE_VALUES_CPU = 1 << 22
_TILE_VALUES_DEVICE = 1 << 24
#: Views (or pairs of mirror views) per back-projection tile: the dimension that ``grid_sample`` spreads over CPU
#: threads there.
_BACKPROJECT_VIEWS = 8
#: The back-projection pairs mirror views (one grid for views θ and π − θ) for batches of fewer images than this:
#: ``grid_sample``'s per-point work (coordinates, weights) is shared by the channels of a point. Measured on one
#: CPU core (512² tiles, a loaded machine): 4.2, 3.2, 2.7 and 2.4–2.6 ns per sample and channel with 1, 2, 4 and
#: 6–24 channels — so pairing pays for one to three images and costs a wider grid (one column) beyond.
_PAIR_BELOW = 4
#: Views per projection tile; how far (bins) the shadows of the image lines that share one window of bin edges may
#: be shifted against each other (a window covers ≈ M·|cos θ| + 16 + a few bins instead of the whole detector), and
#: at most how many lines share one (a projection tile holds whole groups of lines).
_PROJECT_VIEWS = 4
_WINDOW_SPREAD = 16.0
_WINDOW_LINES = 32


def _view_runs(along_rows: Tensor) -> list[tuple[int, int, bool]]:
    """Split views into contiguous runs ``(start, stop, along_rows)`` of equal ``along_rows`` (a boolean per view)."""
    changes = (torch.nonzero(along_rows[1:] != along_rows[:-1]).flatten() + 1).tolist()
    bounds = [0, *changes, int(along_rows.numel())]
    return [(a, b, bool(along_rows[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def _prefix_sums(lines: Tensor) -> Tensor:
    """Cumulative sums along image lines, ``(C, L, M)`` → ``(L, C, 1, M + 1)`` starting at 0 (the mass left of each
    pixel edge), summed in float64 (where the device has it) so that differences of nearby values keep the input's
    precision."""
    cum = torch.cumsum(lines, dim=-1, dtype=lines.dtype if lines.device.type == "mps" else torch.float64)
    cum = F.pad(cum, (1, 0)).to(lines.dtype)
    return cum.permute(1, 0, 2).unsqueeze(2).contiguous()


def _accumulate(total: Tensor | None, part: Tensor) -> Tensor:
    """``total + part``, in place unless autograd needs the operands."""
    if total is None:
        return part
    if total.requires_grad or part.requires_grad:
        return total + part
    return total.add_(part)


class ParallelBeamProjector:
    """Parallel-beam Radon transform and filtered back-projection of images ``(B, 1, H, W)`` (batched, any device).

    Args:
        image_shape: ``(H, W)`` in pixels.
        n_angles: number of views over [0°, 180°); default ``ceil(π/2 · max(H, W))`` (angular Nyquist rate, so
            FBP shows no view-aliasing streaks).
        filter_name: FBP filter, one of :data:`FILTERS`.
        method: ``"pixel"`` (default) — pixel-driven projection: every pixel's shadow, a box of width
            ``max(|cos θ|, |sin θ|)`` bins, is split between the (at most two) bins it overlaps (the distance-driven
            rule). ``"ray"`` — ray-driven: bilinear samples one pixel apart along each ray, identical to
            ``skimage.transform.radon(circle=False)``.
        tile_values: the work is cut into tiles (a few views × a band of image rows or lines) whose output (the
            whole batch) and sampling grid each hold at most about this many values; default ``2**22`` on the CPU
            and ``2**24`` on other devices. This bounds the working memory at any image size.

    All lengths are in pixels: :meth:`project` of an image in "per pixel" units gives dimensionless line integrals,
    and :meth:`fbp` inverts it (its back-projection is scikit-image's ``iradon`` to float precision). Everything is
    differentiable with respect to its input; the backward pass recomputes each tile, so it needs no more memory
    than the forward pass.

    On the CPU (where Numba imports) the pixel-driven projection and the back-projection run the compiled kernels of
    :mod:`blindspot.physics.ct_cpu`: the same rules, several times faster (``benchmarks/ct_lowdose.py``), each image
    computed alone (the same bits in any batch and with any thread count), their gradients the kernels' adjoints;
    ``tile_values`` does not apply there (they hold the batch's sinograms and images channels-last, about one more
    copy of each). Elsewhere — how (every tile is one ``grid_sample`` over the whole batch; no loop over views or bins
    beyond the tiles):

    * back-projection: view ``θ`` adds the (filtered) projection linearly interpolated at each pixel centre's bin
      coordinate ``n_det // 2 + x cos θ − y sin θ``, zero outside the detector; for small batches views ``θ`` and
      ``π − θ`` share one grid (mirror symmetry, exact: :meth:`backproject`);
    * pixel-driven projection: for a view with ``|cos θ| ≥ |sin θ|`` the boxes of one image row tile the detector
      without gaps (columns for the other views), so the mass of a row left of a bin edge is its cumulative sum
      linearly interpolated at that edge, and a bin receives the difference between its two edges, summed over
      rows. That is exactly the box-overlap rule above.

    Kept between calls, per (device, dtype) used (:attr:`cache_nbytes`): the angles, the FBP filter's response and,
    for the ``grid_sample`` kernels, the back-projection's per-view coordinate terms (``n_angles · (H + W)`` values,
    half of that again once a small batch has used the paired grids), the projection's per-view windows
    (≈ ``n_angles · max(H, W)`` values) and one workspace for the sampling grids (at most ``tile_values`` values) —
    at 512×512 in float32 about 24 MiB (3 + 1.6 + 3 + 16); for the CPU kernels, each operator's per-view terms in
    float64 (≈ ``n_angles / 2 · (H + W)`` values, 6.3 MiB for both at 512×512). A sparse system matrix would take
    ≥ 1.7 GiB.
    """

    METHODS = ("pixel", "ray")

    def __init__(
        self,
        image_shape: tuple[int, int],
        n_angles: int | None = None,
        filter_name: str = "ramp",
        method: str = "pixel",
        tile_values: int | None = None,
    ) -> None:
        H, W = int(image_shape[0]), int(image_shape[1])
        if H < 2 or W < 2:
            raise BlindspotError(None, f"CT image shape {H}x{W} is too small (need at least 2x2 pixels)")
        if filter_name not in FILTERS:
            raise BlindspotError(None, f"unknown FBP filter {filter_name!r}; use one of {', '.join(FILTERS)}")
        if method not in self.METHODS:
            raise BlindspotError(None, f"unknown projector {method!r}; use one of {', '.join(self.METHODS)}")
        if tile_values is not None and int(tile_values) < 1:
            raise BlindspotError(None, f"tile_values must be positive, got {tile_values}")
        self.image_shape = (H, W)
        self.n_angles = int(n_angles) if n_angles is not None else int(math.ceil(math.pi / 2.0 * max(H, W)))
        if self.n_angles < 1:
            raise BlindspotError(None, f"n_angles must be positive, got {n_angles}")
        self.filter_name = filter_name
        self.method = method
        self.n_det = int(math.ceil(math.sqrt(2.0) * max(H, W)))
        self.angles = torch.arange(self.n_angles, dtype=torch.float64) * (math.pi / self.n_angles)  # radians
        self.tile_values = None if tile_values is None else int(tile_values)
        self._runs = _view_runs(torch.cos(self.angles).abs() >= torch.sin(self.angles).abs())
        self._cache: dict[tuple, Tensor] = {}
        self._plans: dict[tuple, tuple[list[int], int, int, Tensor, Tensor]] = {}
        self._footprints: dict[str, ct_cpu.Footprint] = {}

    def __repr__(self) -> str:
        H, W = self.image_shape
        return (
            f"ParallelBeamProjector({H}x{W}, n_angles={self.n_angles}, n_det={self.n_det}, "
            f"filter={self.filter_name!r}, method={self.method!r})"
        )

    @property
    def cache_nbytes(self) -> int:
        """Bytes of tensors kept between calls, all devices and dtypes together (see the class docs)."""
        kept = [*self._cache.values(), *(t for plan in self._plans.values() for t in plan[3:])]
        return sum(t.numel() * t.element_size() for t in kept) + sum(f.nbytes for f in self._footprints.values())

    # geometry helpers -------------------------------------------------------------------------------------------
    def _trig(self, device: torch.device, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """``cos θ``, ``sin θ`` of every view, ``(n_angles,)`` each, on ``device`` in ``dtype`` (from float64 on the
        CPU)."""
        key = ("trig", str(device), dtype)
        if key not in self._cache:
            trig = torch.stack([torch.cos(self.angles), torch.sin(self.angles)])
            self._cache[key] = trig.to(device=device, dtype=dtype)
        trig = self._cache[key]
        return trig[0], trig[1]

    def _filter(self, device: torch.device) -> tuple[Tensor, int]:
        n_padded = max(64, 1 << int(math.ceil(math.log2(2 * self.n_det))))
        key = ("filter", str(device))
        if key not in self._cache:
            self._cache[key] = _ramp_filter_response(n_padded, self.filter_name, device)
        return self._cache[key], n_padded

    def _check(self, x: Tensor, what: str, shape: tuple[int, int]) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise BlindspotError(None, f"CT {what} must be (B, 1, {shape[0]}, {shape[1]}), got {got}")
        if not x.is_floating_point():
            raise BlindspotError(None, f"CT {what} must be a floating-point tensor, got {x.dtype}")

    def _per_tile(self, device: torch.device, per_item: int, n_items: int) -> int:
        """How many items (image rows, lines or views, ``n_items`` in all) one tile takes when each writes
        ``per_item`` values."""
        tile = self.tile_values or (_TILE_VALUES_CPU if device.type == "cpu" else _TILE_VALUES_DEVICE)
        return max(1, min(n_items, tile // max(1, per_item)))

    def _grid(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, reuse: bool) -> Tensor:
        """A zero ``grid_sample`` grid of ``shape`` (last dimension 2): a view of the workspace kept per (device,
        dtype) when ``reuse`` (nothing keeps it past the caller's ``grid_sample``: no autograd graph), else new.
        Callers write only x coordinates, so the workspace's y coordinates stay 0."""
        numel = math.prod(shape)
        if not reuse:
            return torch.zeros(shape, dtype=dtype, device=device)
        key = ("workspace", str(device), dtype)
        workspace = self._cache.get(key)
        if workspace is None or workspace.numel() < numel:
            workspace = self._cache[key] = torch.zeros(numel, dtype=dtype, device=device)
        return workspace[:numel].view(shape)

    def _run(self, fn: Any, x: Tensor, *args: Any) -> Tensor:
        """``fn(x, *args)``; when ``x`` needs a gradient, checkpointed so that the backward pass recomputes the tile
        instead of keeping its sampling grid."""
        if torch.is_grad_enabled() and x.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, x, *args, use_reentrant=False, preserve_rng_state=False)
        return fn(x, *args)

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
        if self.method == "ray":
            return self._project_ray(image)
        if ct_cpu.supports(image):
            return self._footprint("pixel").scatter(image[:, 0]).transpose(0, 1).unsqueeze(1)
        return self._project_pixel(image[:, 0]).unsqueeze(1)

    def computes_images_alone(self, x: Tensor) -> bool:
        """Whether :meth:`project` and :meth:`fbp` give each image of a batch like ``x`` (device, dtype) the same bits
        it gets alone: the pixel-driven projection on the CPU kernels (``grid_sample`` tiles round by batch)."""
        return self.method == "pixel" and ct_cpu.supports(x)

    def _footprint(self, box: str) -> "ct_cpu.Footprint":
        """The CPU kernels' geometry for boxes ``"pixel"`` (projection) or ``"unit"`` (back-projection), kept."""
        if box not in self._footprints:
            cos, sin = self._trig(torch.device("cpu"))
            self._footprints[box] = ct_cpu.Footprint(cos, sin, self.image_shape, self.n_det, box)
        return self._footprints[box]

    def _project_pixel(self, image: Tensor) -> Tensor:
        """Pixel-driven (box footprint) projection of ``(C, H, W)`` images → ``(C, n_angles, n_det)``."""
        C = image.shape[0]
        prefix: dict[bool, Tensor] = {}
        cos, sin = self._trig(image.device, image.dtype)
        parts = []
        for start, stop, along_rows in self._runs:
            if along_rows not in prefix:
                prefix[along_rows] = _prefix_sums(image if along_rows else image.transpose(-2, -1))
            lines = prefix[along_rows]
            n_lines, length = lines.shape[0], lines.shape[-1] - 1
            per_line = _PROJECT_VIEWS * (length + 2 * int(_WINDOW_SPREAD)) * max(C, 2)  # output or grid values
            band = self._per_tile(image.device, per_line, n_lines)
            step = cos if along_rows else -sin  # bins per pixel along a line; a negative step visits edges leftwards
            for a0 in range(start, stop, _PROJECT_VIEWS):
                a1 = min(a0 + _PROJECT_VIEWS, stop)
                group = self._tile_plan(along_rows, a0, a1, image.device, image.dtype)[2]
                lines_per_tile = max(group, band // group * group)  # whole groups
                bins = None
                for l0 in range(0, n_lines, lines_per_tile):
                    l1 = min(l0 + lines_per_tile, n_lines)
                    bins = _accumulate(bins, self._run(self._project_tile, lines, along_rows, a0, a1, l0, l1))
                parts.append(bins * torch.sign(step[a0:a1, None]))
        return torch.cat(parts, dim=1)

    def _windows(self, along_rows: bool, a0: int, a1: int) -> tuple[list[int], int, int, Tensor, Tensor]:
        """Where the lines of views ``a0 … a1−1`` are sampled (geometry only, in float64 on the CPU).

        A line's pixel at offset ``i − M//2`` along it (``M`` pixels) sits at bin coordinate ``τ = D//2 +
        c'·(i − M//2) − s'·lo``, ``lo`` the line's offset from the centre line, with ``(c', s') = (cos θ, sin θ)``
        for image rows and ``(−sin θ, −cos θ)`` for columns (the rows of the transposed image). Lines are grouped
        ``group`` at a time (at most :data:`_WINDOW_LINES`, whose shadows shift by at most :data:`_WINDOW_SPREAD`
        bins); group ``g`` samples the bin edges ``τ = k − ½`` for ``k = starts[g] … starts[g] + size − 1``, which
        cover its lines' shadows plus the edge just outside each side.

        Returns:
            ``(starts, size, group, gx_line, gx_edge)``: the last two sum to the edges' normalised pixel-edge
            coordinates (``align_corners=False`` over the ``M + 1`` cumulative sums), ``gx_line`` ``(L, n, 1)`` per
            line and view, ``gx_edge`` ``(1, n, size)`` per view and window position.
        """
        H, W = self.image_shape
        D = self.n_det
        n_lines, length = (H, W) if along_rows else (W, H)
        cos, sin = self._trig(torch.device("cpu"))
        c, s = cos[a0:a1], sin[a0:a1]
        cl, sl = (c, s) if along_rows else (-s, -c)
        lo = torch.arange(n_lines, dtype=torch.float64) - n_lines // 2
        group = max(1, min(n_lines, _WINDOW_LINES, int(_WINDOW_SPREAD / max(float(sl.abs().max()), 1e-6))))
        # bin coordinates of each line's outer pixel edges, (lines, views)
        first = D // 2 + cl[None] * (-(length // 2) - 0.5) - sl[None] * lo[:, None]
        last = first + cl[None] * length
        lower = torch.floor(torch.minimum(first, last) + 0.5) - 1  # edge k sits at τ = k − ½
        upper = torch.ceil(torch.maximum(first, last) + 0.5) + 1
        groups = -(-n_lines // group)
        pad = groups * group - n_lines
        lower = F.pad(lower.T, (0, pad), value=math.inf).reshape(-1, groups, group).amin(dim=(0, 2))
        upper = F.pad(upper.T, (0, pad), value=-math.inf).reshape(-1, groups, group).amax(dim=(0, 2))
        starts = lower.clamp(0, D).long()
        size = int((upper.clamp(0, D).long() - starts).max()) + 1
        # pixel-edge coordinate of edge k: j = (k − ½ − D//2 + s'·lo) / c' + M//2 + ½, normalised (2j + 1)/(M + 1) − 1
        scale = 2.0 / (length + 1)
        k0 = starts.to(torch.float64).repeat_interleave(group)[:n_lines]
        gx_line = (scale / cl)[None] * k0[:, None] + (scale * sl / cl)[None] * lo[:, None]
        i = torch.arange(size, dtype=torch.float64)
        gx_edge = (scale / cl[:, None]) * (i - 0.5 - D // 2) + scale * (length // 2 + 0.5) + 1.0 / (length + 1) - 1.0
        return starts.tolist(), size, group, gx_line[:, :, None], gx_edge[None]

    def _tile_plan(self, along_rows: bool, a0: int, a1: int, device: torch.device,
                   dtype: torch.dtype) -> tuple[list[int], int, int, Tensor, Tensor]:
        """:meth:`_windows` with its coordinates in ``dtype`` on ``device``, kept between calls."""
        key = ("windows", along_rows, a0, a1, str(device), dtype)
        if key not in self._plans:
            starts, size, group, gx_line, gx_edge = self._windows(along_rows, a0, a1)
            self._plans[key] = (starts, size, group, gx_line.to(device=device, dtype=dtype),
                                gx_edge.to(device=device, dtype=dtype))
        return self._plans[key]

    def _project_tile(self, prefix: Tensor, along_rows: bool, a0: int, a1: int, l0: int, l1: int) -> Tensor:
        """Contributions ``(C, a1 − a0, n_det)`` of lines ``l0 … l1−1`` (whole groups of :meth:`_windows`) to views
        ``a0 … a1−1`` (before the views' signs), from the lines' cumulative sums ``prefix`` ``(L, C, 1, M + 1)``.
        The grid ``(l1 − l0, a1 − a0, size, 2)`` holds the pixel-edge coordinates of each line's window of bin edges.
        """
        D = self.n_det
        device, dtype = prefix.device, prefix.dtype
        starts, size, group, gx_line, gx_edge = self._tile_plan(along_rows, a0, a1, device, dtype)
        reuse = not (torch.is_grad_enabled() and prefix.requires_grad)
        grid = self._grid((l1 - l0, a1 - a0, size, 2), device, dtype, reuse)
        torch.add(gx_line[l0:l1], gx_edge, out=grid[..., 0])
        edges = F.grid_sample(prefix[l0:l1], grid, mode="bilinear", padding_mode="border", align_corners=False)
        contrib = torch.diff(edges, dim=-1)  # per line first: cumulative sums are large, bins are not
        full = (l1 - l0) // group * group
        sums = [contrib[:full].unflatten(0, (-1, group)).sum(dim=1)] if full else []
        if full < l1 - l0:
            sums.append(contrib[full:].sum(dim=0, keepdim=True))
        group_sums = torch.cat(sums) if len(sums) > 1 else sums[0]  # (groups, C, views, size − 1)
        out = torch.zeros(prefix.shape[1], a1 - a0, D + size, dtype=dtype, device=device)
        for g, k in enumerate(starts[l0 // group : -(-l1 // group)]):
            out[:, :, k : k + size - 1] += group_sums[g]
        return out[:, :, :D]

    def _project_ray(self, image: Tensor) -> Tensor:
        H, W = self.image_shape
        device, dtype = image.device, image.dtype
        B, D = image.shape[0], self.n_det
        cos, sin = self._trig(device, torch.float32)
        t = torch.arange(D, device=device, dtype=torch.float32) - D // 2  # detector offsets (pixels)
        s = t  # samples along the ray: the padded square's rows, one pixel apart
        cy, cx = H // 2, W // 2
        src = image.reshape(1, B, H, W)  # batch as channels: one grid serves every image
        out = []
        step = self._per_tile(device, D * D * B, self.n_angles)
        for a0 in range(0, self.n_angles, step):
            a1 = min(a0 + step, self.n_angles)
            c = cos[a0:a1].view(-1, 1, 1)
            sn = sin[a0:a1].view(-1, 1, 1)
            x = t.view(1, -1, 1) * c + s.view(1, 1, -1) * sn  # (ac, D, S) column offsets
            y = -t.view(1, -1, 1) * sn + s.view(1, 1, -1) * c  # row offsets
            gx = (x + cx) * (2.0 / (W - 1)) - 1.0
            gy = (y + cy) * (2.0 / (H - 1)) - 1.0
            grid = torch.stack([gx, gy], dim=-1).reshape(1, -1, D, 2).to(dtype)
            samples = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            out.append(samples.sum(dim=-1).reshape(B, a1 - a0, D))
        return torch.cat(out, dim=1).unsqueeze(1)

    # filtered back-projection -----------------------------------------------------------------------------------
    def filter_sinogram(self, sinogram: Tensor) -> Tensor:
        """Apply the FBP filter along the detector axis (zero-padded FFT). ``(B, 1, A, D)`` → same shape.

        The batch's views are filtered together, in chunks whose spectra hold about ``tile_values`` values.
        """
        self._check(sinogram, "sinogram", (self.n_angles, self.n_det))
        response, n_padded = self._filter(sinogram.device)
        response = response.to(sinogram.dtype)
        views = sinogram.reshape(-1, self.n_det)  # (B · A, D)
        step = self._per_tile(sinogram.device, n_padded, views.shape[0])
        parts = [torch.fft.irfft(torch.fft.rfft(chunk, n=n_padded, dim=-1) * response, n=n_padded, dim=-1)
                 [:, : self.n_det] for chunk in views.split(step)]
        return torch.cat(parts).reshape(sinogram.shape)

    def backproject(self, sinogram: Tensor) -> Tensor:
        """Back-projection with linear interpolation between bins, scaled by ``π / (2 · n_angles)``
        (scikit-image's ``iradon`` scaling; it equals ``iradon(..., filter_name=None)`` to float precision).

        On the CPU this is the compiled kernel of :mod:`blindspot.physics.ct_cpu` (where Numba imports); elsewhere
        every tile is one ``grid_sample``, and with few images (fewer than :data:`_PAIR_BELOW`) views ``θ`` and
        ``π − θ`` are back-projected together: view ``π − θ`` puts at pixel ``(−x, y)`` the bin coordinate view ``θ``
        puts at ``(x, y)`` (``cos(π − θ) = −cos θ``), so one sampling grid over a column range symmetric about the
        rotation centre serves both, the second one's smear mirrored left–right. That is exact and halves the grid
        work, which matters when few channels share each grid point.

        Args:
            sinogram: ``(B, 1, n_angles, n_det)``.
        Returns:
            image ``(B, 1, H, W)``.
        """
        self._check(sinogram, "sinogram", (self.n_angles, self.n_det))
        H, W = self.image_shape
        C, A = sinogram.shape[0], self.n_angles
        if ct_cpu.supports(sinogram):
            image = self._footprint("unit").gather(sinogram[:, 0].transpose(0, 1))
            return (image * (math.pi / (2.0 * A))).unsqueeze(1)
        paired = C < _PAIR_BELOW
        leads, partners = self._view_groups(paired)
        views = sinogram[:, 0].transpose(0, 1)  # (A, C, D)
        src = views[leads]  # (P, C, D)
        if paired:  # view A − k (zeros where k has no partner) in channels C … 2C − 1
            src = torch.cat([src, F.pad(views, (0, 0, 0, 0, 0, 1))[partners]], dim=1)
        src = src.unsqueeze(2)  # (P, C or 2C, 1, D)
        P, Wg = len(leads), 2 * (W // 2) + 1 if paired else W
        views_per_tile = min(P, _BACKPROJECT_VIEWS)
        band = self._per_tile(sinogram.device, views_per_tile * Wg * max(src.shape[1], 2), H)
        bands = []
        for r0 in range(0, H, band):
            r1 = min(r0 + band, H)
            rows = None
            for a0 in range(0, P, views_per_tile):
                a1 = min(a0 + views_per_tile, P)
                rows = _accumulate(rows, self._run(self._backproject_tile, src, paired, a0, a1, r0, r1))
            bands.append(rows)
        image = torch.cat(bands, dim=1) if len(bands) > 1 else bands[0]
        if paired:  # columns x = −W//2 … W//2: the lead views' columns, then the partners' mirrored
            image = image[:C, :, :W] + image[C:, :, Wg - W :].flip(-1)
        return (image * (math.pi / (2.0 * A))).reshape(C, 1, H, W)

    def _view_groups(self, paired: bool) -> tuple[Tensor, Tensor | None]:
        """The views whose grids the back-projection builds, ``(P,)`` int64, and, when ``paired``, their mirror
        partners ``A − k`` (``A``, meaning a zero row, where ``A − k`` is not another view: ``k = 0``, and ``k = A/2``
        for even ``A``): leads ``k = 0 … A//2``. Unpaired: every view, no partners."""
        A = self.n_angles
        if not paired:
            return torch.arange(A), None
        leads = torch.arange(A // 2 + 1)
        partners = A - leads
        partners[(partners >= A) | (partners == leads)] = A
        return leads, partners

    def _backproject_tile(self, src: Tensor, paired: bool, a0: int, a1: int, r0: int, r1: int) -> Tensor:
        """The sum over grid views ``a0 … a1−1`` (:meth:`_view_groups`) of ``src`` ``(P, C', 1, n_det)``
        interpolated at image rows ``r0 … r1−1``, ``(C', r1 − r0, Wg)``: columns ``x = −W//2 … W//2``
        (``Wg = 2·(W//2) + 1``) when ``paired``, else the image's ``W``. The grid ``(a1 − a0, r1 − r0, Wg, 2)`` holds
        every pixel centre's bin coordinate ``τ = D//2 + x cos θ − y sin θ`` (``x``, ``y`` from the rotation centre),
        normalised for ``align_corners=False`` over ``D`` bins as ``(2τ + 1) / D − 1``: a per-column plus a per-row
        term."""
        H, W = self.image_shape
        D = self.n_det
        Wg = 2 * (W // 2) + 1 if paired else W
        device, dtype = src.device, src.dtype
        key = ("backproject", paired, str(device), dtype)
        if key not in self._cache:  # geometry in float64 on the CPU, kept in the input's dtype on its device
            cos, sin = self._trig(torch.device("cpu"))
            leads = self._view_groups(paired)[0]
            cos, sin = cos[leads], sin[leads]
            xo = torch.arange(Wg, dtype=torch.float64) - W // 2
            yo = torch.arange(H, dtype=torch.float64) - H // 2
            gx_col = (2.0 / D) * cos[:, None] * xo  # (P, Wg)
            gx_row = (2.0 * (D // 2 - sin[:, None] * yo) + 1.0) / D - 1.0  # (P, H)
            self._cache[key] = torch.cat([gx_col, gx_row], dim=1).to(device=device, dtype=dtype)
        gx = self._cache[key][a0:a1]
        reuse = not (torch.is_grad_enabled() and src.requires_grad)
        grid = self._grid((a1 - a0, r1 - r0, Wg, 2), device, dtype, reuse)
        torch.add(gx[:, Wg + r0 : Wg + r1, None], gx[:, None, :Wg], out=grid[..., 0])
        smeared = F.grid_sample(src[a0:a1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return smeared.sum(dim=0)

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
        """Rebuild the acquisition from :meth:`physics_dict`. With another ``image_shape`` than the stored one the
        scanner keeps its field of view (the pixel size scales with the matrix) and takes the default number of
        views for the new size; ``I0``, filter and projector stay."""
        stored = tuple(int(s) for s in (d.get("image_shape") or (512, 512)))
        shape = tuple(int(s) for s in (image_shape or stored))
        pixel_mm = float(d.get("pixel_size_mm", 0.74))
        same = shape == stored
        return cls(
            shape,
            pixel_size_mm=pixel_mm if same else pixel_mm * stored[0] / shape[0],
            i0=float(d.get("i0", DEFAULT_I0)),
            n_angles=d.get("n_angles") if same else None,
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

    def measured_line_integrals(
        self,
        line_integrals: Tensor,
        doses: Sequence[float],
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> dict[float, Tensor]:
        """Nested noisy measurements ``p̂_d = −log(max(N_d, min_counts) / (I0 · d))`` of line integrals
        ``(B, 1, n_angles, n_det)`` at each dose ``d`` (float32, same shape; see :meth:`simulate` for the nesting and
        the generators; the rates and counts are float64)."""
        wanted = self._check_doses(doses)
        p = line_integrals
        generators = None if generator is None or isinstance(generator, torch.Generator) else list(generator)
        if generators is not None and len(generators) != p.shape[0]:
            raise BlindspotError(None, f"{len(generators)} generators for {p.shape[0]} CT images")
        with torch.no_grad():
            order = sorted(set(wanted))  # ascending: lowest dose first
            transmission = torch.exp(-p.detach().to(torch.float64))
            out = {}
            counts = None
            prev = 0.0
            for d in order:
                # Poisson splitting: the photons of dose d are those of the lower dose plus independent new ones
                rate = transmission * (self.i0 * (d - prev))
                if generators is None:
                    extra = torch.poisson(rate, generator=generator)
                else:
                    extra = torch.cat([torch.poisson(rate[i : i + 1], generator=g) for i, g in enumerate(generators)])
                counts = extra if counts is None else counts.add_(extra)
                out[d] = self.log_counts(counts, d)
                prev = d
        return {d: out[d] for d in wanted}

    def simulate(
        self,
        hu: Tensor,
        doses: Sequence[float] = (0.25,),
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        line_integrals: Tensor | None = None,
        noise_free: bool = False,
    ) -> dict[float, Tensor]:
        """Simulate nested acquisitions of the same slices at several doses.

        Args:
            hu: true images ``(B, 1, H, W)`` in HU.
            doses: dose fractions (1.0 = full dose, 0.25, 0.10, …), any order.
            generator: torch generator on ``hu``'s device (same seed → same images), or one per image (``B`` of
                them): image ``i`` then gets exactly the images ``simulate(hu[i:i+1], doses, generator[i])`` gives,
                while every dose and image share one batched FBP.
            line_integrals: precomputed ``self.line_integrals(hu)`` (saves the projection when called again).
            noise_free: also return ``FBP(P(μ))`` (:meth:`noise_free`) under the key ``0.0``, reconstructed in the
                same batched FBP as the doses.
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
            measured = self.measured_line_integrals(p, wanted, generator)
            keys = list(measured) + ([0.0] if noise_free else [])
            sinos = list(measured.values()) + ([p.to(torch.float32)] if noise_free else [])
            images = self.reconstruct(torch.cat(sinos)).split(p.shape[0])  # one FBP for every dose
        return dict(zip(keys, images))

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
