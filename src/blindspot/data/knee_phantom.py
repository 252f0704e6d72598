"""Synthetic knee MR phantoms: seeded, procedurally generated coronal knee slices at fastMRI scale.

Each phantom is a *volume*: a stack of coronal sections through one synthetic knee. The anatomy is a set of 3-D
implicit surfaces (signed distances in millimetres) in a knee-centred frame — femur (shaft, metaphysis, two
condyles, intercondylar notch), tibia (plateau, spines, tuberosity, shaft), fibula, patella, articular cartilage,
menisci, cruciate and collateral ligaments, tendons, popliteal vessels, muscle, subcutaneous fat and skin — so the
slices of one volume are true sections of one knee and change smoothly from slice to slice. Each slice is rendered
with anti-aliased tissue masks (painter's order), tissue textures (trabecular marrow, muscle fibres and septa, fat
lobules) from filtered Gaussian noise, a proton-density (``CORPD_FBK``) or fat-suppressed (``CORPDFS_FBK``)
contrast, smooth receive-coil shading from a ring of modelled coil elements, a smooth background phase and complex
Gaussian noise.

Geometry: images are ``(H, W)`` with rows along the readout (superior → inferior) and columns along the phase
encode (one side → the other), like fastMRI's coronal knee k-space ``(640, 368)``. The anatomy fills the central
``recon_size`` crop (fastMRI: 320×320 over a 140 mm field of view, 0.4375 mm pixels); rows outside it are the 2×
readout oversampling, where the thigh and calf continue and the coil sensitivity fades. Any size works: the field of
view stays 140 mm over ``recon_size`` pixels, so a 64×64 phantom is the same knee at 2.19 mm pixels.

Randomness: volume ``seed`` fixes every anatomical and contrast parameter through a ``torch.Generator``; each
slice's textures and noise come from a generator seeded by ``(seed, slice index)``. The same seed, size and slice
count give the same volume on the CPU whatever the chunking; on a GPU the draws come from the device's generator
(deterministic there, but not equal to the CPU's).

Speed: the whole stack is rendered as batched tensor code, chunk by chunk of slices (``chunk_pixels`` bounds the
memory, not the result); every structure but the soft-tissue envelope is evaluated only inside its own box of
(slices, rows, columns), fields that depend on the vertical position alone are computed once per volume, and smooth
fields (coil sensitivities, phase) on a coarse grid that is then interpolated. ``benchmarks/knee_phantom_speed.py``
measures it (about 30 ms of one CPU thread per 640×368 slice, 12 ms per 320×320 slice).

Entry points: :func:`generate_knee_volume` renders a volume (:class:`KneeVolume`); :class:`KneeRenderer` exposes its
parts (anatomy, textures, receive fields) for generators that re-render the same knee
(:mod:`blindspot.data.lesion_phantom`); :mod:`blindspot.data.knee_files` writes volumes as fastMRI HDF5 files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from blindspot.errors import BlindspotError
from blindspot.physics.mri import center_crop, fft2c, ifft2c, rss

#: fastMRI's coronal knee k-space size (readout oversampled 2x) and reconstruction size.
FASTMRI_KNEE_SHAPE: tuple[int, int] = (640, 368)
FASTMRI_RECON_SIZE: tuple[int, int] = (320, 320)
#: Field of view of the reconstruction crop, millimetres (rows, columns).
RECON_FOV_MM: tuple[float, float] = (140.0, 140.0)
#: The two fastMRI knee acquisitions: proton density, and proton density with fat suppression.
ACQUISITIONS: tuple[str, str] = ("CORPD_FBK", "CORPDFS_FBK")
#: Bump when the generator's output changes, so written files can be recognised as stale.
GENERATOR_VERSION = 1
#: Nominal slice spacing (fastMRI knee: 3 mm) and the largest anatomical span a stack covers.
SLICE_SPACING_MM = 3.0
MAX_STACK_SPAN_MM = 96.0


# ----------------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contrast:
    """Relative tissue signal (brightest tissue ≈ 1 before coil shading) and the relative noise level."""

    acquisition: str
    fat: float
    marrow: float
    red_marrow: float  # multiplicative factor inside haematopoietic marrow patches
    cortex: float
    cartilage: float
    meniscus: float
    ligament: float
    tendon: float
    muscle: float
    fluid: float
    skin: float
    artery: float
    vein: float
    noise: float  # std of the complex Gaussian noise, relative to the fat (PD) / fluid (PDFS) level


def _contrast(acquisition: str, u) -> Contrast:
    """Draw a contrast of the given acquisition; ``u(lo, hi)`` draws uniforms from the volume's generator."""
    j = lambda v, r=0.12: v * u(1 - r, 1 + r)  # noqa: E731 - per-tissue jitter
    if acquisition == "CORPD_FBK":
        return Contrast(
            acquisition, fat=j(1.0, 0.04), marrow=j(0.86, 0.06), red_marrow=u(0.78, 0.92), cortex=j(0.05, 0.4),
            cartilage=j(0.58), meniscus=j(0.07, 0.4), ligament=j(0.12, 0.3), tendon=j(0.06, 0.4),
            muscle=j(0.34, 0.15), fluid=j(0.6), skin=j(0.55), artery=j(0.08, 0.5), vein=j(0.45, 0.3),
            noise=u(0.025, 0.05),
        )
    return Contrast(
        acquisition, fat=j(0.15, 0.3), marrow=j(0.17, 0.25), red_marrow=u(1.05, 1.25), cortex=j(0.04, 0.4),
        cartilage=j(0.5, 0.15), meniscus=j(0.05, 0.4), ligament=j(0.1, 0.3), tendon=j(0.05, 0.4),
        muscle=j(0.4, 0.15), fluid=j(0.95, 0.05), skin=j(0.32), artery=j(0.06, 0.5), vein=j(0.7, 0.2),
        noise=u(0.035, 0.06),
    )


@dataclass(frozen=True)
class KneeParams:
    """Per-volume anatomy, pose and acquisition parameters (millimetres and radians)."""

    x0: float  # knee centre in the scanner frame (columns), mm
    y0: float  # joint line in the scanner frame (rows), mm
    z0: float  # knee centre along the slice axis, mm
    scale: float  # overall knee size
    theta: float  # in-plane tilt (varus / valgus), rad
    beta: float  # rotation about the long axis (slice obliquity), rad
    side: float  # +1 right knee (lateral on +x), -1 left knee
    femur_w: float  # condyle half-width scale
    tibia_w: float  # plateau half-width scale
    notch_w: float  # intercondylar notch half-width, mm
    cart_f: float  # femoral cartilage thickness, mm
    cart_t: float  # tibial cartilage thickness, mm
    leg_rx: float  # soft-tissue half-width at the joint line, mm
    leg_rz: float  # soft-tissue half-depth, mm
    leg_dz: float  # soft-tissue centre along the slice axis relative to the bones, mm
    fat_t: float  # subcutaneous fat thickness, mm
    fat_asym: float  # medial/lateral fat asymmetry
    muscle_bulk: float  # how far muscle reaches towards the joint
    shape_phase: tuple[float, ...]  # phases of the soft-tissue outline harmonics
    shape_amp: tuple[float, ...]  # amplitudes of the soft-tissue outline harmonics
    red_marrow_amount: float  # fraction of metaphyseal marrow that is haematopoietic
    fluid_amount: float  # joint fluid layer thickness, mm
    fibre_angle: float  # muscle fibre direction relative to vertical, rad
    coil_angle: float  # rotation of the coil ring, rad
    coil_radius: float  # coil ring radius, mm
    coil_falloff: float  # coil sensitivity length scale, mm
    phase_coeffs: tuple[float, ...]  # background phase polynomial, rad
    fascia: tuple[tuple[float, float, float], ...]  # intermuscular planes: (X at the joint line mm, dX/dY, phase)
    contrast: Contrast = field(repr=False, default=None)  # type: ignore[assignment]


def derive_seed(*parts: Any) -> int:
    """A 63-bit integer seed derived from ``parts`` (joined by ``":"`` as text; stable across runs and platforms).

    Every random draw of a phantom is seeded this way, e.g. ``derive_seed("knee-slice", seed, i, S)`` for slice
    ``i`` of volume ``seed``, so a new kind of draw gets its own stream by its own first part.
    """
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_knee_params(seed: int, acquisition: str | None = None) -> KneeParams:
    """The anatomy, pose and contrast of volume ``seed`` (``acquisition=None``: PD or PDFS with equal odds)."""
    g = torch.Generator().manual_seed(derive_seed("knee-params", int(seed)))

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    acq = ACQUISITIONS[int(u(0, 2))]  # always drawn, so the anatomy does not depend on a forced acquisition
    if acquisition is not None:
        if acquisition not in ACQUISITIONS:
            raise BlindspotError(None, f"unknown acquisition {acquisition!r}; choose from {list(ACQUISITIONS)}")
        acq = acquisition
    params = dict(
        x0=u(-7.0, 7.0), y0=u(-10.0, 12.0), z0=u(-4.0, 4.0), scale=u(0.86, 1.08),
        theta=math.radians(u(-6.0, 6.0)), beta=math.radians(u(-7.0, 7.0)), side=1.0 if u(0, 1) < 0.5 else -1.0,
        femur_w=u(0.92, 1.08), tibia_w=u(0.92, 1.06), notch_w=u(8.0, 11.5), cart_f=u(2.0, 3.0), cart_t=u(1.6, 2.6),
        leg_rx=u(54.0, 66.0), leg_rz=u(50.0, 60.0), leg_dz=u(2.0, 10.0), fat_t=u(4.0, 14.0), fat_asym=u(0.0, 0.6),
        muscle_bulk=u(0.0, 1.0),
        shape_phase=tuple(u(0, 2 * math.pi) for _ in range(6)), shape_amp=tuple(u(0.0, 0.05) for _ in range(6)),
        red_marrow_amount=u(0.0, 1.0), fluid_amount=u(0.2, 1.4), fibre_angle=math.radians(u(-12.0, 12.0)),
        coil_angle=u(0, 2 * math.pi), coil_radius=u(78.0, 92.0), coil_falloff=u(45.0, 85.0),
        phase_coeffs=tuple(u(-1.0, 1.0) for _ in range(7)),
        fascia=tuple((u(-48.0, 48.0), u(-0.15, 0.15), u(0, 2 * math.pi)) for _ in range(4)),
    )
    return KneeParams(**params, contrast=_contrast(acq, u))


# ----------------------------------------------------------------------------------------------------------------
# Signed-distance helpers (all in millimetres; negative inside)
# ----------------------------------------------------------------------------------------------------------------
def _smin(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Smooth minimum (union) with blend radius ``k`` mm."""
    h = (0.5 + 0.5 * (b - a) / k).clamp(0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Smooth maximum (intersection / subtraction) with blend radius ``k`` mm."""
    return -_smin(-a, -b, k)


def _ellipsoid(X: Tensor, Y: Tensor, Z: Tensor, c: Sequence[float], r: Sequence[float]) -> Tensor:
    """Approximate signed distance to an axis-aligned ellipsoid (exact on the surface, good near it)."""
    px, py, pz = (X - c[0]) / r[0], (Y - c[1]) / r[1], (Z - c[2]) / r[2]
    k0 = torch.sqrt(px * px + py * py + pz * pz)
    k1 = torch.sqrt((px / r[0]) ** 2 + (py / r[1]) ** 2 + (pz / r[2]) ** 2).clamp_min(1e-6)
    return k0 * (k0 - 1.0) / k1


def _ellipse2(A: Tensor, B: Tensor, ca: float, cb: float, ra: float, rb: float) -> Tensor:
    """Approximate signed distance to an ellipse in one plane (an elliptic cylinder in 3-D)."""
    pa, pb = (A - ca) / ra, (B - cb) / rb
    k0 = torch.sqrt(pa * pa + pb * pb)
    k1 = torch.sqrt((pa / ra) ** 2 + (pb / rb) ** 2).clamp_min(1e-6)
    return k0 * (k0 - 1.0) / k1


def _capsule(X: Tensor, Y: Tensor, Z: Tensor, a: Sequence[float], b: Sequence[float], r: float) -> Tensor:
    """Signed distance to the segment ``a → b`` thickened to radius ``r``."""
    ab = [b[i] - a[i] for i in range(3)]
    ab2 = sum(v * v for v in ab)
    px, py, pz = X - a[0], Y - a[1], Z - a[2]
    t = ((px * ab[0] + py * ab[1] + pz * ab[2]) / ab2).clamp(0.0, 1.0)
    dx, dy, dz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
    return torch.sqrt(dx * dx + dy * dy + dz * dz) - r


def _band(A: Tensor, a: Sequence[float], b: Sequence[float], half_width: float) -> Tensor:
    """Signed distance in one plane to a thick segment (used for flat ligaments; ``A = (u, v)`` coordinates)."""
    u, v = A
    abx, aby = b[0] - a[0], b[1] - a[1]
    ab2 = abx * abx + aby * aby
    px, py = u - a[0], v - a[1]
    t = ((px * abx + py * aby) / ab2).clamp(0.0, 1.0)
    return torch.sqrt((px - t * abx) ** 2 + (py - t * aby) ** 2) - half_width


def _smoothstep(e0: float, e1: float, x: Tensor) -> Tensor:
    t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _bump(t: Tensor) -> Tensor:
    """A smooth compact bump ``(1 − t²)²`` for ``|t| < 1``, else 0 (a cheap, denormal-free Gaussian stand-in)."""
    return (1.0 - t * t).clamp_min_(0.0).square_()


def _paint(canvas: Tensor, alpha: Tensor, value: Tensor | float) -> None:
    """In place: ``canvas ← canvas + alpha · (value − canvas)`` (alpha compositing of one tissue layer)."""
    canvas.add_(alpha * (value - canvas))


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Box:
    """Index ranges ``(slices, rows, columns)`` of a chunk that can hold one structure; calling it takes the view."""

    s: slice
    r: slice
    c: slice

    def __call__(self, t: Tensor) -> Tensor:
        """View of a ``(S, H, W)`` or ``(1, H, W)`` tensor inside the box (``(1, h, w)`` stays broadcastable)."""
        return t[:, self.r, self.c] if t.shape[0] == 1 else t[self.s, self.r, self.c]


def _transfer(d: Tensor, src: _Box, dst: _Box, fill: float) -> Tensor:
    """A field computed inside box ``src``, returned on box ``dst`` (``fill`` where ``src`` does not reach)."""
    shape = [dst.s.stop - dst.s.start, dst.r.stop - dst.r.start, dst.c.stop - dst.c.start]
    out = torch.full(shape, fill, dtype=d.dtype, device=d.device)
    ranges = []
    for a, b in ((src.s, dst.s), (src.r, dst.r), (src.c, dst.c)):
        lo, hi = max(a.start, b.start), min(a.stop, b.stop)
        if hi <= lo:
            return out
        ranges.append((slice(lo - a.start, hi - a.start), slice(lo - b.start, hi - b.start)))
    out[ranges[0][1], ranges[1][1], ranges[2][1]] = d[ranges[0][0], ranges[1][0], ranges[2][0]]
    return out


@dataclass
class _Frame:
    """Knee-frame coordinates of a chunk of slices, and the boxes of index space that knee-frame regions occupy.

    The knee frame (mm) has ``X`` lateral (+) / medial (−), ``Y`` inferior (+) with 0 at the joint line, and ``Z``
    posterior (+); it is the scanner frame shifted, tilted, rotated, scaled and mirrored by the volume's pose.
    """

    X: Tensor  # (S, H, W)
    Y: Tensor  # (1, H, W)
    Z: Tensor  # (S, H, W)
    p: KneeParams
    aa: float  # anti-aliasing ramp width in knee-frame mm (one pixel)
    x: Tensor  # (W,) scanner column positions, mm (CPU: only used to find boxes)
    y: Tensor  # (H,) scanner row positions, mm (CPU)
    z: Tensor  # (S,) scanner slice positions of this chunk, mm, ascending (CPU)
    yfields: dict[str, Tensor]  # fields that depend on Y only, (1, H, W), from :func:`_y_fields`

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> _Box | None:
        """Index box holding the knee-frame box ``[lo, hi]`` (plus a margin), or ``None`` if it is empty."""
        p = self.p
        ct, st, cb, sb = math.cos(p.theta), math.sin(p.theta), math.cos(p.beta), math.sin(p.beta)
        xs, ys, zs = [], [], []
        for X in (lo[0], hi[0]):
            for Y in (lo[1], hi[1]):
                for Z in (lo[2], hi[2]):
                    xa = p.scale * (cb * p.side * X - sb * Z)
                    zr = p.scale * (sb * p.side * X + cb * Z)
                    ya = p.scale * Y
                    xs.append(ct * xa - st * ya + p.x0)
                    ys.append(st * xa + ct * ya + p.y0)
                    zs.append(zr + p.z0)
        pad = 2.0 * self.aa * p.scale + 0.5
        idx = []
        for axis, vals in ((self.z, zs), (self.y, ys), (self.x, xs)):
            first = int(torch.searchsorted(axis, torch.tensor(min(vals) - pad, dtype=axis.dtype)))
            last = int(torch.searchsorted(axis, torch.tensor(max(vals) + pad, dtype=axis.dtype), right=True))
            if last <= first:
                return None
            idx.append(slice(first, last))
        return _Box(*idx)


def _y_fields(Y: Tensor, p: KneeParams) -> dict[str, Tensor]:
    """Soft-tissue fields that depend on the knee-frame ``Y`` only (computed once per volume, ``(1, H, W)``)."""
    ph, am = p.shape_phase, p.shape_amp
    rx = p.leg_rx * (1.0 + am[0] * torch.sin(Y / 23.0 + ph[0]) + am[1] * torch.sin(Y / 51.0 + ph[1]))
    rx = rx * (1.0 - 0.10 * _smoothstep(10.0, 120.0, Y.abs()))  # thigh and calf narrower than the knee
    # The medial collateral ligament runs ~2 mm outside the widest of the medial femoral condyle and the tibia.
    fw, tw = p.femur_w, p.tibia_w
    condyle = 21.0 * fw + 17.5 * fw * torch.sqrt((1.0 - ((Y + 24.0) / 21.0) ** 2).clamp_min(0.0))
    femur_flare = torch.exp((Y + 20.0).clamp_max(0.0) / 30.0)  # 1 at the condyles, → 0 up the shaft (concave)
    tibia_flare = torch.exp((10.0 - Y).clamp_max(0.0) / 28.0)  # 1 at the plateau, → 0 down the shaft
    meta = (14.0 + (36.0 * fw - 14.0) * femur_flare) * (Y < -18.0)
    tib = (15.0 + (37.0 * tw - 15.0) * tibia_flare) * (Y > 0.0)
    edge = torch.maximum(torch.maximum(condyle, meta), torch.maximum(tib, 37.0 * tw * (Y.abs() < 6.0)))
    bulk = p.muscle_bulk
    return {
        "femur_flare": femur_flare,
        "tibia_flare": tibia_flare,
        # Intermuscular fascial planes: knee-frame X of each gently curved sheet, mm.
        "fascia_x": [x_i + slope_i * Y + 4.0 * torch.sin(Y / 21.0 + phase_i) + 2.0 * torch.sin(Y / 9.0 + 2 * phase_i)
                     for x_i, slope_i, phase_i in p.fascia],
        "zone_up": torch.full_like(Y, 34.0 + 14.0 * (1 - bulk)),  # periarticular fat zone above the joint, mm
        "zone_down": torch.full_like(Y, 24.0 + 10.0 * (1 - bulk)),  # ... and below it (lateral side), mm
        "mcl_x": -(edge + 3.0),  # knee-frame X of the MCL, mm
        "leg_rx": rx,  # soft-tissue half-width, mm
        "leg_xc": 4.0 * torch.sin(Y / 60.0 + ph[3]),  # soft-tissue centre, mm
        "leg_zc": p.leg_dz + 3.0 * torch.sin(Y / 45.0 + ph[4]),
        "fat_t": p.fat_t * (1.0 + 0.3 * torch.sin(Y / 30.0 + ph[5])),  # subcutaneous fat thickness, mm
    }


def _soft(d: Tensor, aa: float) -> Tensor:
    """Anti-aliased occupancy of the region ``d < 0`` (a linear ramp one pixel wide)."""
    return (0.5 - d / aa).clamp(0.0, 1.0)


def _filter_bank(fy: Tensor, fx: Tensor, fibre: float) -> Tensor:
    """The four texture filters at frequencies ``fy``, ``fx`` (cycles / mm, broadcastable), stacked on a new dim 0."""
    f2 = fx * fx + fy * fy
    along = fx * math.sin(fibre) + fy * math.cos(fibre)  # frequency along the fibres
    across = fx * math.cos(fibre) - fy * math.sin(fibre)
    return torch.stack((
        torch.exp(-(((torch.sqrt(f2) - 0.62) / 0.22) ** 2)),
        torch.exp(-f2 / 0.16**2),
        torch.exp(-f2 / 0.05**2),
        torch.exp(-((across / 0.3) ** 2) - (along / 0.025) ** 2),
    ))


def _texture_energy(n_y: int, n_x: int, d_y: float, d_x: float, fibre: float) -> Tensor:
    """``Σ |F|² Δf_y Δf_x`` of each texture filter over an ``n_y×n_x`` grid of ``d_y×d_x`` mm pixels, ``(4,)``."""
    fy = torch.fft.fftfreq(n_y, d=d_y, dtype=torch.float64).reshape(n_y, 1)
    fx = torch.fft.fftfreq(n_x, d=d_x, dtype=torch.float64).reshape(1, n_x)
    bank = _filter_bank(fy, fx, fibre)
    bank[:, 0, 0] = 0.0
    return (bank**2).sum(dim=(-2, -1)) / (n_y * d_y * n_x * d_x)


@functools.lru_cache(maxsize=1)
def _reference_texture_energy() -> Tensor:
    """Each texture's full variance: its energy on 0.25 mm pixels over 200 mm (every texture resolved; the
    rotation-invariant integral does not depend on the fibre angle)."""
    return _texture_energy(800, 800, 0.25, 0.25, 0.0)


def _resolved_fraction(H: int, W: int, dy: float, dx: float, fibre: float) -> Tensor:
    """Share of each texture's variance that an ``H×W`` grid of ``dy×dx`` mm pixels resolves, ``(4,)``.

    Textures finer than the pixels fade out instead of turning into pixel noise at small image sizes.
    """
    return (_texture_energy(H, W, dy, dx, fibre) / _reference_texture_energy()).clamp(0.0, 1.0).to(torch.float32)


def _texture_filters(
    H: int, W: int, dy: float, dx: float, fibre: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The four texture filters of :func:`_textures` on the ``rfft2`` grid, ``(4, H, W // 2 + 1)`` float32, and
    the std each texture keeps on this grid, ``(4,)`` (1 where the grid resolves it fully; see below).

    Trabecular-scale band-pass (period ≈ 1.6 mm), septa-scale low-pass (≈ 4 mm), patch-scale low-pass (≈ 12 mm),
    and muscle fibres elongated along ``fibre`` (rad from vertical); ``dy``, ``dx`` are pixel sizes in mm. A texture
    keeps only the share of its variance that this grid resolves (:func:`_resolved_fraction`).
    """
    Wf = W // 2 + 1
    fy = torch.fft.fftfreq(H, d=dy).reshape(H, 1)  # cycles / mm
    fx = torch.fft.rfftfreq(W, d=dx).reshape(1, Wf)
    filters = _filter_bank(fy, fx, fibre)
    filters[:, 0, 0] = 0.0  # zero mean
    return filters.to(device), _resolved_fraction(H, W, dy, dx, fibre).sqrt().to(device)


class KneeTextures(NamedTuple):
    """Per-slice tissue textures, each ``(s, H, W)`` float32 with zero mean and unit std over each slice (less where
    the pixels are too coarse to resolve the texture), from :meth:`KneeRenderer.textures`."""

    fine: Tensor  #: trabecular-scale band-pass, period ≈ 1.6 mm
    mid: Tensor  #: septa-scale low-pass, ≈ 4 mm
    coarse: Tensor  #: patch-scale low-pass, ≈ 12 mm
    fibres: Tensor  #: muscle fibres, elongated along the volume's fibre direction


def _textures(gens: Sequence[torch.Generator], bank: tuple[Tensor, Tensor], W: int) -> KneeTextures:
    """The :func:`_texture_filters` applied to one white complex spectrum per slice, drawn from that slice's
    generator (so a slice's textures do not depend on the other slices)."""
    filters, resolved = bank
    _, H, Wf = filters.shape
    spec = torch.stack([torch.randn(2, H, Wf, generator=g, device=filters.device) for g in gens])  # (S, 2, H, Wf)
    spec = torch.complex(spec[:, 0], spec[:, 1])
    out = []
    step_h, step_w = max(1, H // 64), max(1, W // 64)
    for filt, keep in zip(filters, resolved):
        field = torch.fft.irfft2(spec * filt, s=(H, W))
        std = field[:, ::step_h, ::step_w].std(dim=(-2, -1), keepdim=True)  # a sub-grid estimate is plenty
        out.append(field.mul_(keep / std.clamp_min(1e-12)))
    return KneeTextures(*out)


#: Muscle bellies that reach into the periarticular fat, as (centre, radii) ellipsoids in the knee frame, mm.
_MUSCLES: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((-33.0, -52.0, -6.0), (22.0, 38.0, 26.0)),  # vastus medialis (obliquus), lowest of the thigh muscles
    ((-44.0, -36.0, 22.0), (12.0, 40.0, 14.0)),  # semimembranosus / sartorius, posteromedial
    ((-21.0, 42.0, 35.0), (19.0, 64.0, 16.0)),  # gastrocnemius, medial head
    ((23.0, 46.0, 33.0), (16.0, 60.0, 14.0)),  # gastrocnemius, lateral head
)


def _render_anatomy(fr: _Frame, tex: KneeTextures) -> Tensor:
    """Noise-free, unshaded magnitude of the knee ``(S, H, W)`` float32 (relative signal, fat / fluid ≈ 1).

    Tissues are painted back to front with anti-aliased masks; every structure but the soft-tissue envelope is
    evaluated only inside its own index box.
    """
    p, c, aa = fr.p, fr.p.contrast, fr.aa
    X, Y, Z = fr.X, fr.Y, fr.Z
    fine, mid, coarse, fibres = tex
    img = torch.zeros(X.shape, dtype=X.dtype, device=X.device)
    fw, tw = p.femur_w, p.tibia_w

    # --- soft tissue: skin outline and subcutaneous fat -------------------------------------------------------------
    yf = fr.yfields
    rx = yf["leg_rx"] * (1.0 + p.shape_amp[2] * torch.sin(Z / 19.0 + p.shape_phase[2]))
    qx, qz = (X - yf["leg_xc"]) / rx, (Z - yf["leg_zc"]) / p.leg_rz
    k0 = torch.sqrt(qx * qx + qz * qz)
    k1 = torch.sqrt((qx / rx) ** 2 + (qz / p.leg_rz) ** 2).clamp_min(1e-6)
    leg = k0 * (k0 - 1.0) / k1
    leg.add_(0.8 * coarse)  # signed distance to the skin, mm (slightly irregular)
    del qx, qz, k0, k1, rx
    # Fat: bright and nearly homogeneous, with sparse thin fibrous septa (dark in PD, slightly bright in PDFS).
    septa = _bump((mid + 0.3 * coarse) / 0.1) * torch.sigmoid(4.0 * (coarse - 0.3))
    fat_value = c.fat * (1.0 + 0.03 * fine + 0.04 * coarse) * (1.0 - (0.45 if c.fat > 0.5 else -0.3) * septa)
    _paint(img, _soft(leg, aa), fat_value)
    del fat_value, septa
    _paint(img, _soft(leg.abs() - 0.6, aa) * (leg < 0.5), c.skin * (1.0 + 0.1 * fine))

    # --- muscle bellies around the femur and tibia, inside the subcutaneous fat ---------------------------------------
    medial = torch.sigmoid(-X / 15.0)
    deep = leg + yf["fat_t"] * (1.0 + p.fat_asym * (medial - 0.3))  # < 0 inside the muscle envelope
    del medial, leg
    # Thigh and calf muscles fill the envelope away from the joint; around the joint lies fat, except where a few
    # bellies (vastus medialis, gastrocnemius heads, popliteus) reach in.
    bulk = 0.85 + 0.3 * p.muscle_bulk
    # The zone reaches higher on the lateral side of the thigh and far down the medial side of the tibia (which
    # lies under the skin), so muscle there starts lower / laterally.
    lateral = torch.sigmoid(X / 12.0)
    ry = torch.where(Y < -3.0, yf["zone_up"] * (0.85 + 0.3 * lateral), yf["zone_down"] * (2.6 - 1.6 * lateral))
    q = torch.sqrt((X / 62.0) ** 2 + ((Y + 3.0) / ry) ** 2)
    muscle = (1.0 - q) * ry  # < 0 outside the periarticular fat zone, mm
    del q, ry, lateral
    for centre, radii in _MUSCLES:
        radii = (radii[0] * bulk, radii[1], radii[2] * bulk)
        # Boxes padded by 6 mm: the outline is perturbed by up to ~4 mm below.
        b = fr.box([centre[i] - radii[i] - 6.0 for i in range(3)], [centre[i] + radii[i] + 6.0 for i in range(3)])
        if b is not None:
            view = b(muscle)
            view.copy_(torch.minimum(view, _ellipsoid(b(X), b(Y), b(Z), centre, radii)))
    b = fr.box((-38.0, -6.0, 6.0), (48.0, 54.0, 38.0))  # popliteus, obliquely behind the tibia
    if b is not None:
        view = b(muscle)
        view.copy_(torch.minimum(view, _capsule(b(X), b(Y), b(Z), (32.0, 8.0, 24.0), (-22.0, 40.0, 22.0), 7.0 * bulk)))
    muscle = torch.maximum(muscle + 1.3 * coarse, deep)
    del deep
    streaks = torch.sigmoid(4.0 * (fibres - 2.3))  # intramuscular fat streaks along the fibres
    fascia = torch.zeros_like(yf["zone_up"])  # intermuscular fascial planes: long, gently curved sheets of fat
    for xi in yf["fascia_x"]:
        fascia = torch.maximum(fascia, _bump((X - xi) / 1.4))
    fascia = fascia * torch.sigmoid(3.0 * (coarse + 0.3)) * (1.0 + 0.3 * fine).clamp(0.0, 1.3)  # interrupted
    muscle_value = c.muscle * (1.0 + 0.07 * fibres + 0.03 * fine + 0.05 * coarse)
    muscle_value = muscle_value + (0.7 * streaks + 0.6 * fascia).clamp_max(0.9) * (c.fat - muscle_value)
    _paint(img, _soft(muscle, 1.5 * aa), muscle_value)
    del muscle_value, muscle, streaks, fascia

    # --- popliteal vessels (posterior) ------------------------------------------------------------------------------
    b = fr.box((-10.0, -150.0, 26.0), (12.0, 150.0, 40.0))
    if b is not None:
        wander = 2.0 * torch.sin(b(Y) / 40.0 + p.shape_phase[1])
        vein = _ellipse2(b(X) - wander, b(Z), 4.0, 35.0, 4.2, 3.6)
        _paint(b(img), _soft(vein, aa), c.vein)
        art = _ellipse2(b(X) - wander, b(Z), -2.0, 31.0, 3.2, 3.2)
        _paint(b(img), _soft(art, aa), c.artery)

    # --- tendons and extra-articular ligaments ------------------------------------------------------------------------
    def fade(Zb: Tensor, lo: float, hi: float, w: float = 2.0) -> Tensor:
        return _smoothstep(lo - w, lo + w, Zb) * (1.0 - _smoothstep(hi - w, hi + w, Zb))

    b = fr.box((38.0, -92.0, -25.0), (50.0, 12.0, -3.0))  # iliotibial band
    if b is not None:
        Yb = b(Y)
        d = (b(X) - 41.0 - 0.06 * (10.0 - Yb) - 2.5 * _smoothstep(-30.0, 10.0, -Yb)).abs() - 0.6
        _paint(b(img), _soft(d, aa) * fade(b(Z), -20.0, -8.0) * _smoothstep(-75.0, -35.0, Yb)
               * (1.0 - _smoothstep(6.0, 12.0, Yb)), c.tendon)
    b = fr.box((-15.0, -150.0, -50.0), (18.0, -44.0, -40.0))  # quadriceps tendon
    if b is not None:
        Yb = b(Y)  # elliptic section (13 × 3.5 mm), tapering where it meets the patella
        d = torch.maximum(_ellipse2(b(X), b(Z), 1.0, -45.0, 13.0, 3.5), Yb + 46.0 - 4.0 * (b(X) / 13.0) ** 2)
        _paint(b(img), _soft(d, aa), c.tendon)
    b = fr.box((-12.0, -16.0, -45.0), (16.0, 42.0, -27.0))  # patellar tendon
    if b is not None:
        Yb = b(Y)
        tz = -41.0 + 5.0 * _smoothstep(-12.0, 40.0, Yb)
        d = _ellipse2(b(X), b(Z), 2.0 - 0.04 * Yb, tz, 11.0 - 0.06 * Yb, 3.0)
        d = torch.maximum(d, torch.maximum(-14.0 - Yb, Yb - 40.0))
        _paint(b(img), _soft(d, aa), c.tendon)
    b = fr.box((-44.0 * fw, -33.0, -16.0), (-28.0 * tw, 48.0, 11.0))  # medial collateral ligament
    if b is not None:
        Yb = b(Y)
        d = (b(X) - b(fr.yfields["mcl_x"])).abs() - 1.2
        span = _smoothstep(-34.0, -26.0, Yb) * (1.0 - _smoothstep(40.0, 48.0, Yb))
        _paint(b(img), _soft(d, aa) * fade(b(Z), -13.0, 8.0) * span, c.ligament)
    b = fr.box((33.0 * tw, -25.0, 0.0), (44.0 * fw, 17.0, 20.0))  # lateral collateral ligament
    if b is not None:
        d = _band((b(X), b(Y)), (41.0 * fw, -22.0), (37.0 * tw, 14.0), 1.8)
        _paint(b(img), _soft(d, aa) * fade(b(Z), 3.0, 17.0), c.ligament)
    b = fr.box((33.0 * tw, -33.0, 11.0), (49.0, 17.0, 27.0))  # biceps femoris tendon to the fibular head
    if b is not None:
        d = _band((b(X), b(Y)), (46.0, -30.0), (38.0 * tw, 14.0), 2.4)
        _paint(b(img), _soft(d, aa) * fade(b(Z), 14.0, 24.0), c.tendon)
    b = fr.box((37.0 * fw, -10.0, 3.0), (44.0 * fw, -4.0, 23.0))  # popliteus tendon
    if b is not None:
        d = _ellipse2(b(X), b(Y), 40.5 * fw, -7.0, 2.6, 2.2)
        _paint(b(img), _soft(d, aa) * fade(b(Z), 6.0, 20.0), c.tendon)

    # --- bones: signed distances --------------------------------------------------------------------------------------
    bf = fr.box((-45.0 * fw, -150.0, -34.0), (45.0 * fw, 4.0, 36.0))
    femur = None
    if bf is not None:
        Xf, Yf, Zf = bf(X), bf(Y), bf(Z)
        # Shaft flaring into the metaphysis: elliptic sections whose half-widths grow towards the joint.
        gf = bf(fr.yfields["femur_flare"])
        wx, wz = 14.0 + (36.0 * fw - 14.0) * gf, 13.5 + (27.0 - 13.5) * gf
        slope = (36.0 * fw - 14.0) / 30.0 * gf  # |dwx/dY|: corrects the in-plane distance
        meta = _ellipse2(Xf, Zf, -1.0 + gf, -4.0 + 3.0 * gf, wx, wz) / torch.sqrt(1.0 + slope * slope)
        meta = torch.maximum(meta, Yf + 18.0)
        del gf, wx, wz, slope
        med = _ellipsoid(Xf, Yf, Zf, (-21.0 * fw, -24.0, 3.0), (17.5 * fw, 21.0, 30.0))
        lat = _ellipsoid(Xf, Yf, Zf, (21.5 * fw, -23.5, 1.0), (17.0 * fw, 20.5, 28.0))
        femur = _smin(meta, _smin(med, lat, 4.0), 6.0)
        del meta, med, lat
        notch = torch.maximum(_ellipse2(Xf, Yf, 0.0, -3.0, p.notch_w, 19.0), -8.0 - Zf)
        femur = _smax(femur, -notch, 2.5)
        del notch

    bt = fr.box((-40.0 * tw, -4.0, -32.0), (40.0 * tw, 150.0, 28.0))
    tibia = None
    if bt is not None:
        Xt, Yt, Zt = bt(X), bt(Y), bt(Z)
        gt = bt(fr.yfields["tibia_flare"])
        wx, wz = 15.0 + (37.0 * tw - 15.0) * gt, 15.0 + (25.0 - 15.0) * gt
        slope = (37.0 * tw - 15.0) / 28.0 * gt
        tibia = _ellipse2(Xt, Zt, 2.0 - 2.0 * gt, 3.0 - 2.0 * gt, wx, wz) / torch.sqrt(1.0 + slope * slope)
        tibia = _smax(tibia, 3.0 - Yt, 4.0)
        del gt, wx, wz, slope
        spines = torch.minimum(_ellipsoid(Xt, Yt, Zt, (-5.0, 3.5, 1.0), (4.0, 5.5, 9.0)),
                               _ellipsoid(Xt, Yt, Zt, (5.0, 3.5, 1.0), (4.0, 5.0, 9.0)))
        tibia = _smin(tibia, spines, 2.0)
        tuber = _ellipsoid(Xt, Yt, Zt, (2.0, 36.0, -22.0), (12.0, 14.0, 8.0))
        tibia = _smin(tibia, tuber, 8.0)
        del spines, tuber

    bfi = fr.box((24.0 * tw, 10.0, 3.0), (45.0 * tw, 150.0, 25.0))
    fibula = None
    if bfi is not None:
        Xb, Yb, Zb = bfi(X), bfi(Y), bfi(Z)
        fibula = _smin(_ellipsoid(Xb, Yb, Zb, (34.5 * tw, 22.0, 14.0), (9.0, 10.0, 9.0)),
                       torch.maximum(torch.sqrt((Xb - 37.0 * tw) ** 2 + (Zb - 16.0) ** 2) - 6.0, 28.0 - Yb), 5.0)

    bp = fr.box((-22.0, -53.0, -52.0), (28.0, -7.0, -26.0))
    patella = None
    if bp is not None:
        patella = _ellipsoid(bp(X), bp(Y), bp(Z), (3.0, -30.0, -39.0), (21.0, 19.0, 9.0))

    # --- joint fluid, menisci, cruciate ligaments, cartilage ----------------------------------------------------------
    bj = fr.box((-48.0, -30.0, -30.0), (48.0, 14.0, 34.0))
    if bj is not None:
        Xj, Yj, Zj, imj = bj(X), bj(Y), bj(Z), bj(img)
        d_fem = _transfer(femur, bf, bj, 50.0) if femur is not None else torch.full_like(Xj, 50.0)
        d_tib = _transfer(tibia, bt, bj, 50.0) if tibia is not None else torch.full_like(Xj, 50.0)
        fluid = torch.maximum(torch.minimum(d_fem - p.cart_f, d_tib - p.cart_t) - p.fluid_amount,
                              torch.sqrt((Xj / 44.0) ** 2 + ((Yj + 2.0) / 12.0) ** 2) - 1.0)
        _paint(imj, _soft(fluid, aa) * (1 - _smoothstep(20.0, 28.0, Zj.abs())), c.fluid)
        del fluid
        # Menisci: wedges at the plateau margins between the cartilages; longer and flatter towards the horns.
        horn = _smoothstep(10.0, 20.0, Zj.abs())
        length = 11.0 + 10.0 * horn
        ax = Xj.abs() - 37.0 * tw  # ≤ 0 inside the plateau rim
        top = 1.5 - (6.5 - 1.5 * horn) * (1.0 + ax / length).clamp(0.0, 1.5)  # knee-frame Y of the upper surface
        men = torch.maximum(torch.maximum(top - Yj, Yj - 3.5), torch.maximum(-ax - length, ax - 1.5))
        men = torch.maximum(men, torch.maximum(p.cart_f - d_fem, p.cart_t - d_tib))
        men = torch.maximum(men, Zj.abs() - 23.0)
        _paint(imj, _soft(men, aa), c.meniscus * (1.0 + 0.3 * bj(fine).clamp(-2, 2)))
        del horn, length, ax, top, men
        # Cruciates: flat bands (twice as deep as wide), so a coronal section shows an oblique band in the notch.
        Zh = 0.5 * Zj
        acl = _capsule(Xj, Yj, Zh, (8.0, -15.0, 5.0), (-2.0, 3.0, -2.0), 3.8)
        _paint(imj, _soft(acl, aa), c.ligament * (2.2 + 0.9 * bj(fibres).clamp(-2, 2)))  # striated, intermediate
        pcl = _capsule(Xj, Yj, Zh, (-8.0, -17.0, 0.0), (0.0, 9.0, 8.0), 4.2)
        _paint(imj, _soft(pcl, aa), c.ligament * 0.8)
        del Zh
        del acl, pcl
        cart_value = c.cartilage * (1.0 + 0.05 * bj(fine))
        articular = (Yj + 17.0 + 16.0 * _smoothstep(8.0, 28.0, Zj)).clamp(0.0, 1.0)
        in_notch = (_ellipse2(Xj, Yj, 0.0, -3.0, p.notch_w + 2.0, 21.0) < 0) & (Zj > -6.0)
        articular = articular.masked_fill_(in_notch, 0.0)
        fc = torch.maximum(-d_fem, d_fem - p.cart_f)
        _paint(imj, _soft(fc, aa) * articular, cart_value)
        tc = torch.maximum(-d_tib, d_tib - p.cart_t)
        tc_zone = ((Xj.abs() - 6.5).clamp(0.0, 1.0) * (5.0 - Yj).clamp(0.0, 1.0)
                   * (37.0 * tw - 2.0 - Xj.abs()).clamp(0.0, 1.0))
        _paint(imj, _soft(tc, aa) * tc_zone, cart_value)
        del cart_value, articular, in_notch, fc, tc, tc_zone, d_fem, d_tib
    if patella is not None:
        pc = torch.maximum(-patella, patella - 3.2)
        _paint(bp(img), _soft(pc, aa) * (bp(Z) > -41.0), c.cartilage * (1.0 + 0.05 * bp(fine)))
        del pc

    # --- bone: marrow texture, physeal scars, cortical rim ------------------------------------------------------------
    def paint_bone(d: Tensor, b: _Box, physis_y: float | None, shaft_from: float) -> None:
        Yb, im_b = b(Y), b(img)
        fb, mb, cb = b(fine), b(mid), b(coarse)
        # Fatty marrow with fine trabecular mottling (stronger away from the subchondral bone).
        away = _smoothstep(5.0, 40.0, Yb.abs())
        marrow = c.marrow * (1.0 + (0.05 + 0.05 * away) * torch.tanh(fb) + 0.04 * mb + 0.04 * cb)
        # Haematopoietic (red) marrow patches in the metaphysis and shaft.
        patches = torch.sigmoid((cb + 0.4 * mb - 1.6 + 1.2 * p.red_marrow_amount) * 2.5)
        patches = patches * _smoothstep(18.0, 45.0, Yb.abs())
        marrow = marrow * (1.0 + (c.red_marrow - 1.0) * patches)
        if physis_y is not None:  # the closed growth plate: a thin, gently wavy dark line
            scar = _bump((Yb - physis_y - 0.8 * cb) / 1.0)
            marrow = marrow * (1.0 - 0.35 * scar)
        cortex_t = 0.9 + 2.2 * _smoothstep(shaft_from, shaft_from + 35.0, Yb.abs())
        _paint(im_b, _soft(d, 1.3 * aa), c.cortex)
        _paint(im_b, _soft(d + cortex_t + 0.15 * mb, 1.3 * aa), marrow)

    if femur is not None:
        paint_bone(femur, bf, -24.0, 30.0)
    if tibia is not None:
        paint_bone(tibia, bt, 21.0, 28.0)
    if fibula is not None:
        paint_bone(fibula, bfi, None, 35.0)
    if patella is not None:
        paint_bone(patella, bp, None, 1e3)
    return img


def _coil_fields(p: KneeParams, x: Tensor, y: Tensor, z: Tensor, num_coils: int | None) -> Tensor:
    """Smooth complex receive fields on a coarse grid: ``(S, C, h, w)`` for ``C`` coils (scanner frame, mm).

    ``num_coils=None`` returns the emulated single-coil field ``(S, 1, h, w)``: the root-sum-of-squares of an
    8-element ring times the smooth background phase. Coil elements sit on rings around the leg (two rings above
    eight coils); each has a Lorentzian-like magnitude fall-off and a slowly varying phase.
    """
    n = 8 if num_coils is None else num_coils
    rings = 1 if n <= 8 else 2
    X, Y, Z = x.reshape(1, 1, 1, -1), y.reshape(1, 1, -1, 1), z.reshape(-1, 1, 1, 1)
    idx = torch.arange(n, dtype=torch.float32, device=x.device)
    per_ring = -(-n // rings)
    ring, k = idx % rings, torch.div(idx, rings, rounding_mode="floor")  # ring of each element, place on its ring
    ang = p.coil_angle + 2 * math.pi * k / per_ring + ring * math.pi / per_ring  # rings staggered by half a step
    cx = (p.coil_radius * torch.cos(ang)).reshape(1, n, 1, 1)
    cz = (p.coil_radius * torch.sin(ang)).reshape(1, n, 1, 1)
    cy = ((ring - (rings - 1) / 2) * 60.0).reshape(1, n, 1, 1)
    r2 = (X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2
    mag = 1.0 / (1.0 + r2 / p.coil_falloff**2)
    # Normalise so the root-sum-of-squares of the magnitudes is 1 at the scanner origin (the knee sits near it).
    centre = 1.0 / (1.0 + (cx**2 + cy**2 + cz**2) / p.coil_falloff**2)
    mag = mag / torch.linalg.vector_norm(centre, dim=1, keepdim=True)
    a = p.phase_coeffs
    bg = (a[0] * math.pi + a[1] * X / 60.0 + a[2] * Y / 80.0 + a[3] * X * Y / 6000.0 + a[4] * (X / 70.0) ** 2
          + a[5] * Z / 80.0 + a[6] * (Y / 90.0) ** 2)  # (S, 1, h, w), rad
    if num_coils is None:
        m = torch.linalg.vector_norm(mag, dim=1, keepdim=True)
        return torch.polar(m, bg.expand_as(m).contiguous())
    coil_phase = (ang.reshape(1, n, 1, 1) * 1.7 + ((X - cx) * torch.sin(ang).reshape(1, n, 1, 1)
                  - (Z - cz) * torch.cos(ang).reshape(1, n, 1, 1)) / 45.0)
    return torch.polar(mag, (bg + coil_phase).contiguous())


@dataclass
class PhantomGeometry:
    """Sizes of a phantom: image / k-space ``shape`` ``(H, W)``, reconstruction crop ``recon_size`` ``(h, w)``, and
    the pixel spacing ``dy``, ``dx`` in mm (140 mm over the crop). ``x``, ``y``: column / row positions, mm."""

    shape: tuple[int, int]
    recon_size: tuple[int, int]
    dy: float  # mm per row
    dx: float  # mm per column

    @property
    def y(self) -> Tensor:
        H = self.shape[0]
        return (torch.arange(H, dtype=torch.float32) - H // 2) * self.dy

    @property
    def x(self) -> Tensor:
        W = self.shape[1]
        return (torch.arange(W, dtype=torch.float32) - W // 2) * self.dx


def phantom_geometry(shape: Sequence[int], recon_size: Sequence[int] | None) -> PhantomGeometry:
    """Check a phantom size: ``shape`` ``(H, W)`` ≥ 16×16; ``recon_size`` clipped to ``shape`` (``None``: 320×320).

    Returns the sizes and the pixel spacing (mm): the reconstruction crop always spans a 140 mm field of view.
    """
    if len(tuple(shape)) != 2:
        raise BlindspotError(None, f"phantom shape must be (H, W), got {tuple(shape)}")
    H, W = int(shape[0]), int(shape[1])
    if H < 16 or W < 16:
        raise BlindspotError(None, f"phantom shape must be at least 16x16, got {H}x{W}")
    if recon_size is None:
        recon_size = FASTMRI_RECON_SIZE
    h, w = min(int(recon_size[0]), H), min(int(recon_size[1]), W)
    if h < 16 or w < 16:
        raise BlindspotError(None, f"reconstruction size must be at least 16x16, got {h}x{w}")
    return PhantomGeometry((H, W), (h, w), RECON_FOV_MM[0] / h, RECON_FOV_MM[1] / w)


def slice_positions_mm(num_slices: int, center: float = 0.0) -> Tensor:
    """Positions of ``num_slices`` coronal sections along the slice axis, mm (anterior → posterior).

    3 mm apart (fastMRI's knee slice spacing) while the stack spans at most 96 mm; larger stacks sample the same
    96 mm more finely, so every slice cuts through the knee.
    """
    if num_slices < 1:
        raise BlindspotError(None, f"need at least one slice, got {num_slices}")
    spacing = SLICE_SPACING_MM if num_slices < 2 else min(SLICE_SPACING_MM, MAX_STACK_SPAN_MM / (num_slices - 1))
    return center + (torch.arange(num_slices, dtype=torch.float32) - (num_slices - 1) / 2) * spacing


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def phantom_fname(seed: int) -> str:
    """File name of phantom volume ``seed``, fastMRI style: ``file_phantom_000123.h5``; also its mask seed."""
    return f"file_phantom_{int(seed):06d}.h5"


def phantom_patient_id(seed: int) -> str:
    """A stable pseudonymous patient id (64 hex digits, like fastMRI's) for volume ``seed``."""
    return hashlib.sha256(f"blindspot-knee-phantom-{int(seed)}".encode()).hexdigest()


@dataclass
class KneeVolume:
    """One synthetic knee volume.

    Attributes:
        image: complex64 image stack — ``(S, H, W)`` single-coil (emulated single coil: anatomy × coil shading ×
            background phase + complex Gaussian noise), or ``(S, C, H, W)`` coil images for multi-coil.
        seed: the volume seed.
        acquisition: ``"CORPD_FBK"`` or ``"CORPDFS_FBK"``.
        patient_id: pseudonymous id (a hash of the seed).
        recon_size: ``(h, w)`` of the reconstruction crop.
        pixel_spacing_mm: ``(row, column)`` spacing, mm.
        slice_positions_mm: ``(S,)`` section positions along the slice axis, mm.
        noise_std: std of the complex Gaussian noise per complex sample (``E|n|² = σ²``), per coil.
        params: the volume's :class:`KneeParams`.
        sensitivities: ``(S, C, H, W)`` complex64 coil sensitivities (multi-coil with ``return_sensitivities``).
    """

    image: Tensor
    seed: int
    acquisition: str
    patient_id: str
    recon_size: tuple[int, int]
    pixel_spacing_mm: tuple[float, float]
    slice_positions_mm: Tensor
    noise_std: float
    params: KneeParams
    sensitivities: Tensor | None = None

    @property
    def num_coils(self) -> int:
        return 1 if self.image.ndim == 3 else int(self.image.shape[1])

    @property
    def challenge(self) -> str:
        return "singlecoil" if self.image.ndim == 3 else "multicoil"

    @property
    def fname(self) -> str:
        return phantom_fname(self.seed)

    def kspace(self) -> Tensor:
        """Fully sampled k-space ``F(image)``: complex64 ``(S, H, W)`` or ``(S, C, H, W)``."""
        return fft2c(self.image).to(torch.complex64)

    @property
    def attrs(self) -> dict[str, Any]:
        """The fastMRI file attributes this volume gets (``max`` and ``norm`` are added by the writer)."""
        return {"acquisition": self.acquisition, "patient_id": self.patient_id}


def reconstruction_from_kspace(kspace: Tensor, recon_size: Sequence[int]) -> Tensor:
    """fastMRI's stored target: the centre-cropped magnitude (single-coil, ``(S, H, W)`` k-space) or
    root-sum-of-squares (multi-coil, ``(S, C, H, W)``) of ``ifft2c(kspace)``; returns float32 ``(S, h, w)``."""
    image = center_crop(ifft2c(kspace), (int(recon_size[0]), int(recon_size[1])))
    out = image.abs() if kspace.ndim == 3 else rss(image, dim=1)[:, 0]
    return out.to(torch.float32)


class KneeRenderer:
    """Renders the sections of one knee volume: its noise-free anatomy, tissue textures and receive fields.

    :func:`generate_knee_volume` composes these into ``image = anatomy × receive field + noise``; other generators
    (the lesion phantoms of :mod:`blindspot.data.lesion_phantom`) use them to render the same knee again, e.g. with
    only one tissue lit. The same seed, parameters, geometry and slice positions give bit-identical fields on the
    CPU, so a re-rendered knee matches the generated one exactly. Fields that depend on the volume alone (knee-frame
    coordinates of the slice plane, texture filters, the coarse grid of the coil fields) are computed once here.

    Args:
        seed: the volume seed (seeds each section's texture and noise generator).
        params: the volume's anatomy, pose and contrast (:func:`draw_knee_params`).
        geometry: image size, reconstruction crop and pixel spacing (:func:`phantom_geometry`).
        slice_positions_mm: ``(S,)`` section positions along the slice axis, mm, ascending
            (:func:`slice_positions_mm`).
        device: where to render.

    Attributes:
        knee_y: knee-frame vertical position of every pixel, ``(1, H, W)`` float32 mm (0 at the joint line,
            positive inferior); the same in every section.
    """

    def __init__(
        self,
        seed: int,
        params: KneeParams,
        geometry: PhantomGeometry,
        slice_positions_mm: Tensor,
        device: torch.device | str = "cpu",
    ) -> None:
        p = params
        self.seed, self.params, self.geometry = int(seed), p, geometry
        self.device = torch.device(device)
        self.slice_positions_mm = slice_positions_mm.cpu()
        H, W = geometry.shape
        x, y = geometry.x.to(self.device), geometry.y.to(self.device)
        self._aa = min(geometry.dx, geometry.dy) / p.scale
        ct, st = math.cos(p.theta), math.sin(p.theta)
        xr, yr = x.reshape(1, 1, W) - p.x0, y.reshape(1, H, 1) - p.y0
        self._x_along = ct * xr + st * yr  # (1, H, W): scanner frame rotated in-plane, before the slice rotation
        self.knee_y = (-st * xr + ct * yr) / p.scale
        self._y_fields = _y_fields(self.knee_y, p)
        self._texture_bank = _texture_filters(H, W, geometry.dy / p.scale, geometry.dx / p.scale,
                                              p.theta + p.fibre_angle, self.device)
        coarse_h, coarse_w = max(4, -(-H // 8)), max(4, -(-W // 8))
        self._coarse_y = torch.linspace(float(y[0]), float(y[-1]), coarse_h, device=self.device)
        self._coarse_x = torch.linspace(float(x[0]), float(x[-1]), coarse_w, device=self.device)

    @classmethod
    def for_volume(cls, volume: KneeVolume) -> KneeRenderer:
        """The renderer that made ``volume``, on the volume's device."""
        geometry = phantom_geometry(volume.image.shape[-2:], volume.recon_size)
        return cls(volume.seed, volume.params, geometry, volume.slice_positions_mm, volume.image.device)

    @property
    def num_slices(self) -> int:
        return self.slice_positions_mm.numel()

    def chunks(self, chunk_pixels: int, channels: int = 1) -> Iterator[tuple[int, int]]:
        """Slice ranges ``(start, stop)`` covering the volume, about ``chunk_pixels`` pixels each (``channels``
        values per pixel, e.g. coils) and at least one section."""
        H, W = self.geometry.shape
        step = max(1, int(chunk_pixels) // (H * W * int(channels)))
        for start in range(0, self.num_slices, step):
            yield start, min(self.num_slices, start + step)

    def slice_generators(self, start: int, stop: int) -> list[torch.Generator]:
        """One generator per section ``start … stop − 1``, seeded by (volume seed, section, ``S``): it draws the
        section's textures (:meth:`textures`), then its noise (:func:`generate_knee_volume`)."""
        S = self.num_slices
        return [torch.Generator(device=self.device).manual_seed(derive_seed("knee-slice", self.seed, i, S))
                for i in range(start, stop)]

    def textures(self, generators: Sequence[torch.Generator]) -> KneeTextures:
        """The tissue textures of the sections whose :meth:`slice_generators` these are, each ``(s, H, W)``."""
        return _textures(generators, self._texture_bank, self.geometry.shape[1])

    def anatomy(self, start: int, stop: int, textures: KneeTextures, contrast: Contrast | None = None) -> Tensor:
        """Noise-free, unshaded magnitude of sections ``start … stop − 1``, ``(s, H, W)`` float32 in relative signal
        units (fat in proton density, fluid with fat suppression ≈ 1).

        Args:
            start, stop: the sections.
            textures: their :meth:`textures`.
            contrast: tissue signals to render with instead of the volume's own (e.g. one tissue at 1, the others
                at 0, for a map of where that tissue shows).
        """
        p = self.params if contrast is None else dataclasses.replace(self.params, contrast=contrast)
        cb, sb = math.cos(p.beta), math.sin(p.beta)
        z = self.slice_positions_mm[start:stop]
        zr = (z.to(self.device) - p.z0).reshape(-1, 1, 1)
        X = (cb * self._x_along + sb * zr) / p.scale * p.side
        Z = (-sb * self._x_along + cb * zr) / p.scale
        frame = _Frame(X, self.knee_y, Z, p, self._aa, self.geometry.x, self.geometry.y, z, self._y_fields)
        return _render_anatomy(frame, textures)

    def receive_field(self, start: int, stop: int, num_coils: int | None) -> Tensor:
        """Complex64 receive field of sections ``start … stop − 1``: ``(s, H, W)`` single-coil shading × background
        phase (``num_coils=None``), or ``(s, C, H, W)`` coil sensitivities of ``C = num_coils`` coils.

        Smooth fields are computed on a coarse grid (about every 8th pixel) and interpolated bilinearly.
        """
        H, W = self.geometry.shape
        C = 1 if num_coils is None else int(num_coils)
        z = self.slice_positions_mm[start:stop].to(self.device)
        fields = _coil_fields(self.params, self._coarse_x, self._coarse_y, z, num_coils)  # (s, C, h', w') complex
        s, _, coarse_h, coarse_w = fields.shape
        fields = torch.view_as_real(fields).permute(0, 1, 4, 2, 3).reshape(s, -1, coarse_h, coarse_w)
        fields = F.interpolate(fields, size=(H, W), mode="bilinear", align_corners=True).reshape(s, C, 2, H, W)
        sens = torch.complex(fields[:, :, 0], fields[:, :, 1])
        return sens[:, 0] if num_coils is None else sens


def generate_knee_volume(
    seed: int,
    num_slices: int,
    shape: Sequence[int] = FASTMRI_KNEE_SHAPE,
    recon_size: Sequence[int] | None = FASTMRI_RECON_SIZE,
    device: torch.device | str = "cpu",
    num_coils: int | None = None,
    acquisition: str | None = None,
    chunk_pixels: int = 1 << 18,
    return_sensitivities: bool = False,
) -> KneeVolume:
    """Render volume ``seed``: ``num_slices`` coronal sections through one synthetic knee.

    Args:
        seed: volume seed (non-negative int); fixes anatomy, pose, contrast, textures and noise.
        num_slices: number of sections ``S`` (3 mm apart up to a 96 mm stack; see :func:`slice_positions_mm`).
        shape: image / k-space size ``(H, W)`` (rows = readout, columns = phase encode); fastMRI knee: (640, 368).
        recon_size: the crop the anatomy fills, ``(h, w)`` (clipped to ``shape``; 140 mm field of view).
        device: where to render.
        num_coils: ``None`` for single-coil (emulated single coil, the ``reconstruction_esc`` kind) or the
            number of receive coils ``C`` for multi-coil coil images.
        acquisition: force ``"CORPD_FBK"`` or ``"CORPDFS_FBK"``; ``None`` draws one (equal odds).
        chunk_pixels: slices are rendered in chunks of about this many pixels (bounds memory, not results).
        return_sensitivities: keep the multi-coil sensitivities in ``KneeVolume.sensitivities`` (as much memory
            as the image stack).

    Returns:
        A :class:`KneeVolume` whose ``image`` is complex64 ``(S, H, W)`` or ``(S, C, H, W)``.
    """
    if int(seed) < 0:
        raise BlindspotError(None, f"phantom seed must be non-negative, got {seed}")
    if num_coils is not None and int(num_coils) < 1:
        raise BlindspotError(None, f"number of coils must be at least 1, got {num_coils}")
    geo = phantom_geometry(shape, recon_size)
    device = torch.device(device)
    p = draw_knee_params(int(seed), acquisition)
    z_all = slice_positions_mm(int(num_slices), 0.0)
    renderer = KneeRenderer(int(seed), p, geo, z_all, device)
    S = z_all.numel()
    C = 1 if num_coils is None else int(num_coils)
    out_shape = (S, *geo.shape) if num_coils is None else (S, C, *geo.shape)
    image = torch.empty(out_shape, dtype=torch.complex64, device=device)
    keep_sens = num_coils is not None and return_sensitivities
    sens_all = torch.empty(out_shape, dtype=torch.complex64, device=device) if keep_sens else None
    # Multi-coil: each coil's noise is σ/√C so the root-sum-of-squares image has the single-coil SNR.
    noise_std = p.contrast.noise / math.sqrt(C)
    for start, stop in renderer.chunks(chunk_pixels, C):
        gens = renderer.slice_generators(start, stop)
        anatomy = renderer.anatomy(start, stop, renderer.textures(gens))  # (s, H, W)
        sens = renderer.receive_field(start, stop, num_coils)  # (s, H, W) or (s, C, H, W)
        noise = torch.stack([torch.randn(2, *sens.shape[1:], generator=g, device=device) for g in gens])
        noise = torch.complex(noise[:, 0], noise[:, 1]) * (noise_std / math.sqrt(2.0))
        obj = anatomy if num_coils is None else anatomy.unsqueeze(1)
        image[start:stop] = obj * sens + noise
        if sens_all is not None:
            sens_all[start:stop] = sens
        del anatomy, sens, noise, obj
    return KneeVolume(
        image=image,
        seed=int(seed),
        acquisition=p.contrast.acquisition,
        patient_id=phantom_patient_id(int(seed)),
        recon_size=geo.recon_size,
        pixel_spacing_mm=(geo.dy, geo.dx),
        slice_positions_mm=z_all,
        noise_std=noise_std,
        params=p,
        sensitivities=sens_all,
    )


def volume_seeds(seed: int, volumes: int) -> list[int]:
    """Seeds of the ``volumes`` phantoms of a data set with base ``seed``: ``seed, seed + 1, …``."""
    if int(volumes) < 1:
        raise BlindspotError(None, f"need at least one volume, got {volumes}")
    if int(seed) < 0:
        raise BlindspotError(None, f"phantom seed must be non-negative, got {seed}")
    return [int(seed) + v for v in range(int(volumes))]
