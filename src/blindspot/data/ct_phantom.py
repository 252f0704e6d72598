"""Synthetic chest and abdomen CT slices in Hounsfield units, the built-in default CT data.

A *patient* is drawn once from a seed (body size, fat and muscle thickness, organ sizes and positions, lesions as
3-D spheres); its slices are rendered at axial positions ``z`` so that organ sizes change smoothly from slice to
slice (heart, liver dome, kidneys, stomach…) and a nodule or lesion shows up in the slices it crosses. Fine
structure (lung vessel trees, bowel loops, rib cross-sections, mesenteric vessels) is drawn per slice from the
slice's own seed.

Rendering is vectorised torch code on a pixel grid in millimetres (origin at the image centre, ``x`` to the image
right = patient left, ``y`` down = posterior): every structure is a signed distance function (ellipses with
Fourier-perturbed outlines, tapered capsules for vessels, processed in chunks) painted with one-pixel
anti-aliased coverage, so any size works, from 512×512 down to 32×32, with the same anatomy. Tissue values are
typical of a contrast-enhanced (portal-venous) abdomen and a non-contrast chest at 120 kVp, with smooth texture.

Same seed → same image (NumPy ``default_rng`` for the parameters, a seeded ``torch.Generator`` for textures).
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from torch.utils.data import Dataset

from blindspot.data.ldct import CTSample, ldct_uid, series_folder_name, study_folder_name, write_ct_slice
from blindspot.errors import BlindspotError
from blindspot.fileio import read_json, write_json
from blindspot.physics.ct import DEFAULT_I0, LowDoseCT

#: Side of the square field of view in mm (pixel size = FOV / size; 0.742 mm at 512×512, like the LDCT data).
FOV_MM = 380.0
#: Phantom kinds and their axial extent (mm) from the top slice (z = 0) to the bottom (z = 1).
KINDS: dict[str, float] = {"chest": 260.0, "abdomen": 240.0}

# Tissue values, HU (120 kVp).
AIR, LUNG, FAT, WATER, SOFT = -1000.0, -860.0, -100.0, 0.0, 45.0
MUSCLE, BLOOD, SKIN = 52.0, 42.0, 40.0
CORTICAL, CANCELLOUS, CARTILAGE = 950.0, 240.0, 150.0
LIVER_CE, SPLEEN_CE, KIDNEY_CORTEX, KIDNEY_MEDULLA, AORTA_CE, PORTAL_CE = 105.0, 112.0, 175.0, 125.0, 165.0, 150.0


# ----------------------------------------------------------------------------------------------------------------
# Signed-distance primitives (mm); negative inside
# ----------------------------------------------------------------------------------------------------------------
def _ellipse(
    X: Tensor, Y: Tensor, cx: float, cy: float, a: float, b: float, angle: float = 0.0, wobble: np.ndarray | None = None
) -> Tensor:
    """Approximate signed distance (mm) to an ellipse with semi-axes ``a`` (along ``angle``) and ``b``.

    ``wobble`` is an ``(K, 2)`` array of (relative amplitude, phase) of angular harmonics 2…K+1 that make the outline
    organic: the boundary radius is ``1 + Σ amp_k cos(k φ + phase_k)`` in the ellipse's normalised coordinates.
    """
    ca, sa = math.cos(angle), math.sin(angle)
    dx, dy = X - cx, Y - cy
    u = dx * ca + dy * sa
    v = -dx * sa + dy * ca
    un, vn = u / a, v / b
    rho = torch.sqrt(un * un + vn * vn + 1e-12)
    radius = 1.0
    if wobble is not None and len(wobble):
        phi = torch.atan2(vn, un)
        radius = torch.ones_like(rho)
        for k, (amp, phase) in enumerate(wobble, start=2):
            radius = radius + float(amp) * torch.cos(k * phi + float(phase))
    grad = torch.sqrt((un / a) ** 2 + (vn / b) ** 2 + 1e-12) / rho  # |∇ρ|
    return (rho - radius) / grad


def _circle(X: Tensor, Y: Tensor, cx: float, cy: float, r: float) -> Tensor:
    return torch.sqrt((X - cx) ** 2 + (Y - cy) ** 2) - r


def capsules(
    X: Tensor, Y: Tensor, p0: np.ndarray, p1: np.ndarray, r0: np.ndarray, r1: np.ndarray, chunk: int = 32
) -> Tensor:
    """Signed distance to the union of ``K`` tapered capsules (segments ``p0→p1``, radius ``r0→r1``), ``(H, W)``.

    Each capsule is evaluated only in its own window, its bounding box grown by its radius and two pixels, so the
    result is the exact minimum over the capsules wherever that is below two pixels (all that painting with
    one-pixel coverage reads) and at least two pixels (or 1e4, far from every capsule) elsewhere. Capsules are
    taken ``chunk`` at a time, in order of window size, each chunk with one window shape; the windows' values are
    merged with a scatter-min, so memory stays ``chunk ·`` (largest window).
    """
    H, W = X.shape
    out = torch.full((H, W), 1e4, dtype=X.dtype, device=X.device)
    if len(p0) == 0:
        return out
    dev = X.device
    P0 = torch.as_tensor(np.asarray(p0), dtype=torch.float32, device=dev).reshape(-1, 2)
    P1 = torch.as_tensor(np.asarray(p1), dtype=torch.float32, device=dev).reshape(-1, 2)
    R0 = torch.as_tensor(np.asarray(r0), dtype=torch.float32, device=dev).reshape(-1)
    R1 = torch.as_tensor(np.asarray(r1), dtype=torch.float32, device=dev).reshape(-1)
    xs, ys = X[0].contiguous(), Y[:, 0].contiguous()  # increasing pixel-centre coordinates, mm
    px = float(xs[1] - xs[0]) if xs.numel() > 1 else 1.0
    margin = torch.maximum(R0, R1) + 2.0 * px
    # each window's pixel range [lo, hi) in columns and rows
    c_lo = torch.searchsorted(xs, torch.minimum(P0[:, 0], P1[:, 0]) - margin)
    c_hi = torch.searchsorted(xs, torch.maximum(P0[:, 0], P1[:, 0]) + margin, right=True)
    r_lo = torch.searchsorted(ys, torch.minimum(P0[:, 1], P1[:, 1]) - margin)
    r_hi = torch.searchsorted(ys, torch.maximum(P0[:, 1], P1[:, 1]) + margin, right=True)
    width, height = c_hi - c_lo, r_hi - r_lo
    order = torch.argsort(width * height)
    order = order[(width[order] > 0) & (height[order] > 0)]
    flat = out.view(-1)
    for k in range(0, order.numel(), chunk):
        idx = order[k : k + chunk]
        wc, wr = int(width[idx].max()), int(height[idx].max())
        cols = torch.minimum(c_lo[idx], torch.full_like(c_lo[idx], W - wc))[:, None] + torch.arange(wc, device=dev)
        rows = torch.minimum(r_lo[idx], torch.full_like(r_lo[idx], H - wr))[:, None] + torch.arange(wr, device=dev)
        Xc, Yc = xs[cols][:, None, :], ys[rows][:, :, None]  # (k, 1, wc), (k, wr, 1)
        a, b = P0[idx].view(-1, 2, 1, 1), P1[idx].view(-1, 2, 1, 1)
        ra, rb = R0[idx].view(-1, 1, 1), R1[idx].view(-1, 1, 1)
        ba = b - a
        denom = (ba * ba).sum(1).clamp_min(1e-9)  # (k, 1, 1)
        px_, py_ = Xc - a[:, 0], Yc - a[:, 1]
        h = ((px_ * ba[:, 0] + py_ * ba[:, 1]) / denom).clamp(0.0, 1.0)
        dist = torch.sqrt((px_ - h * ba[:, 0]) ** 2 + (py_ - h * ba[:, 1]) ** 2 + 1e-12) - (ra + h * (rb - ra))
        where = (rows[:, :, None] * W + cols[:, None, :]).flatten()
        flat.scatter_reduce_(0, where, dist.flatten(), "amin")
    return out


def _smooth_union(d1: Tensor, d2: Tensor, k: float) -> Tensor:
    """Union of two shapes with a rounded blend of about ``k`` mm."""
    h = (0.5 + 0.5 * (d2 - d1) / k).clamp(0.0, 1.0)
    return d2 + (d1 - d2) * h - k * h * (1.0 - h)


def _smooth_subtract(d1: Tensor, d2: Tensor, k: float) -> Tensor:
    """``d1`` minus ``d2`` with rounded corners of about ``k`` mm."""
    return -_smooth_union(-d1, d2, k)


class _Canvas:
    """An ``(H, W)`` HU image with its mm grid; ``paint`` blends a value in with anti-aliased coverage."""

    def __init__(self, size: int, fov_mm: float, generator: torch.Generator, device: torch.device) -> None:
        self.size, self.px = size, fov_mm / size
        coords = (torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0) * self.px
        self.X = coords.view(1, -1).expand(size, size)
        self.Y = coords.view(-1, 1).expand(size, size)
        self.img = torch.full((size, size), AIR, dtype=torch.float32, device=device)
        self.gen = generator
        self.device = device

    def cover(self, sdf: Tensor) -> Tensor:
        """Fraction of each pixel inside the shape (a one-pixel ramp across the boundary)."""
        return (0.5 - sdf / self.px).clamp(0.0, 1.0)

    def paint(self, sdf: Tensor, value: "float | Tensor", within: Tensor | None = None) -> Tensor:
        cov = self.cover(sdf)
        if within is not None:
            cov = cov * within
        self.img = self.img + cov * (value - self.img)
        return cov

    def noise(self, corr_mm: float) -> Tensor:
        """Smooth Gaussian random field with unit standard deviation and correlation length ``corr_mm``."""
        n = self.size
        white = torch.randn((n, n), generator=self.gen, dtype=torch.float32).to(self.device)
        f = torch.fft.fftfreq(n, d=self.px, device=self.device)
        f2 = f.view(-1, 1) ** 2 + f.view(1, -1) ** 2
        spec = torch.exp(-2.0 * (math.pi * corr_mm) ** 2 * f2)
        field_ = torch.fft.ifft2(torch.fft.fft2(white) * spec).real
        return field_ / field_.std().clamp_min(1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Patients
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PhantomPatient:
    """One synthetic patient: ``kind`` (``"chest"`` or ``"abdomen"``) and the anatomy drawn from ``seed``.

    Use :meth:`render` for a slice at relative axial position ``z`` ∈ [0, 1] (0 = top of the region).
    """

    kind: str
    seed: int
    anatomy: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BlindspotError(None, f"unknown CT phantom kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if not self.anatomy:
            rng = np.random.default_rng([int(self.seed), 0 if self.kind == "chest" else 1])
            self.anatomy = _chest_anatomy(rng) if self.kind == "chest" else _abdomen_anatomy(rng)

    @property
    def length_mm(self) -> float:
        return KINDS[self.kind]

    def render(
        self, z: float, size: int = 512, fov_mm: float = FOV_MM, slice_seed: int | None = None, device: str = "cpu"
    ) -> Tensor:
        """The slice at relative position ``z`` as a float32 HU image ``(size, size)``.

        ``slice_seed`` seeds the per-slice fine structure and texture (default: derived from the patient seed and
        ``z``).
        """
        if not (8 <= int(size) <= 4096):
            raise BlindspotError(None, f"CT phantom size {size} is out of range (8 … 4096 pixels)")
        if slice_seed is None:
            slice_seed = int(self.seed) * 100003 + int(round(float(z) * 1e4))
        rng = np.random.default_rng([int(slice_seed), 7])
        gen = torch.Generator().manual_seed(int(slice_seed) & 0x7FFFFFFFFFFFFFFF)
        canvas = _Canvas(int(size), float(fov_mm), gen, torch.device(device))
        zc = float(np.clip(z, 0.0, 1.0))
        z_mm = zc * self.length_mm
        if self.kind == "chest":
            _render_chest(canvas, self.anatomy, zc, z_mm, rng)
        else:
            _render_abdomen(canvas, self.anatomy, zc, z_mm, rng)
        return canvas.img


def ct_phantom(kind: str = "chest", size: int = 512, seed: int = 0, z: float = 0.5, fov_mm: float = FOV_MM) -> Tensor:
    """One synthetic CT slice in HU, ``(size, size)`` float32: patient ``seed`` of ``kind`` at position ``z``."""
    return PhantomPatient(kind, int(seed)).render(z, size=size, fov_mm=fov_mm)


def ct_phantom_batch(
    kinds: Sequence[str], seeds: Sequence[int], zs: Sequence[float], size: int = 64, fov_mm: float = FOV_MM
) -> Tensor:
    """A batch of slices ``(B, 1, size, size)`` in HU, one per ``(kind, seed, z)`` triple."""
    if not (len(kinds) == len(seeds) == len(zs)):
        raise ValueError("kinds, seeds and zs must have the same length")
    imgs = [PhantomPatient(k, int(s)).render(z, size=size, fov_mm=fov_mm) for k, s, z in zip(kinds, seeds, zs)]
    return torch.stack(imgs).unsqueeze(1)


def _wobble(rng: np.random.Generator, k: int, amp: float) -> np.ndarray:
    amps = rng.normal(0.0, amp, size=k) / np.arange(1, k + 1) ** 0.7
    return np.stack([amps, rng.uniform(0, 2 * np.pi, size=k)], axis=1)


def _profile(z: float, start: float, peak: float, end: float) -> float:
    """Smooth bump: 0 before ``start``, 1 at ``peak``, 0 after ``end`` (organ size along z)."""
    if z <= start or z >= end:
        return 0.0
    t = (z - start) / (peak - start) if z < peak else (end - z) / (end - peak)
    return float(np.sin(0.5 * np.pi * np.clip(t, 0.0, 1.0)) ** 0.6)


def _spheres(rng: np.random.Generator, n: int, r_range: tuple[float, float]) -> list[dict[str, float]]:
    return [
        {
            "u": float(rng.uniform(-1, 1)),
            "v": float(rng.uniform(-1, 1)),
            "z": float(rng.uniform(0.05, 0.95)),
            "r": float(rng.uniform(*r_range)),
            "lob": float(rng.uniform(0.0, 0.12)),
            "phase": float(rng.uniform(0, 2 * np.pi)),
            "kind": float(rng.uniform()),
        }
        for _ in range(n)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Shared body parts
# ----------------------------------------------------------------------------------------------------------------
def _body_wall(c: _Canvas, an: dict, rng: np.random.Generator) -> dict[str, float]:
    """Table, skin, subcutaneous fat and the muscle wall (thin in front, deep back muscles behind).

    Returns the inner (cavity) ellipse: ``{"top", "bottom", "cy", "a", "b"}`` in mm, and the spine position
    ``y_v`` (vertebral body centre), whose posterior margin sits at the cavity's bottom.
    """
    X, Y = c.X, c.Y
    cy, a, b, fat = an["cy"], an["a"], an["b"], an["fat"]
    # patient table: carbon-fibre shell with foam core, curved, under the back
    ty = cy + b + 12.0
    table_out = _ellipse(X, Y, 0.0, ty + 240.0, 175.0, 250.0)
    table_in = _ellipse(X, Y, 0.0, ty + 240.0, 171.0, 246.0)
    cut = Y - (ty + 14.0)  # keep the top 14 mm of the curved plate
    c.paint(torch.maximum(table_out, cut), 180.0)
    c.paint(torch.maximum(table_in, cut + 2.0), -850.0)
    body = _ellipse(X, Y, 0.0, cy, a, b, wobble=an["body_wobble"])
    body = -_smooth_union(-body, -(Y - (cy + 0.94 * b)), 10.0)  # the back flattens on the table
    c.paint(body, SKIN)
    c.paint(body + 2.0, FAT + 8.0 * c.noise(1.5))
    m_top, m_bot = cy - b + fat, cy + b - 0.7 * fat
    muscle = _ellipse(X, Y, 0.0, 0.5 * (m_top + m_bot), a - fat, 0.5 * (m_bot - m_top), wobble=an["muscle_wobble"])
    c.paint(muscle, MUSCLE + 4.0 * c.noise(2.0))
    top, bottom = m_top + an["muscle"], m_bot - an["back"]
    inner = {"top": top, "bottom": bottom, "cy": 0.5 * (top + bottom), "a": a - fat - an["muscle"],
             "b": 0.5 * (bottom - top)}
    inner["y_v"] = bottom - an["r_vert"] * 0.9
    inner["within_wall"] = c.cover(muscle + 1.0)  # coverage of the region inside the subcutaneous fat
    return inner


def _back_muscles(c: _Canvas, inner: dict, an: dict) -> None:
    """Erector spinae either side of the spinous process, with a fat plane between the groups."""
    X, Y = c.X, c.Y
    depth = an["back"] + 0.3 * an["fat"]
    for sx in (-1, 1):
        m = _ellipse(X, Y, sx * 30.0, inner["bottom"] + 0.42 * depth, 26.0, 0.5 * depth, angle=sx * 0.15)
        c.paint(m, MUSCLE + 3.0 * c.noise(2.0))
        c.paint(_ellipse(X, Y, sx * 34.0, inner["bottom"] + 0.45 * depth, 3.0, 0.3 * depth, angle=sx * 0.4), FAT)


def _vertebra(c: _Canvas, cx: float, cy: float, r: float, rng: np.random.Generator, canal: bool = True) -> Tensor:
    """Vertebral body (cortical rim, cancellous core), canal, laminae, spinous and transverse processes."""
    X, Y = c.X, c.Y
    body = _ellipse(X, Y, cx, cy, r * 1.08, r * 0.92, wobble=np.array([[0.03, 0.4], [0.02, 1.0]]))
    c.paint(body, CORTICAL)
    c.paint(body + 2.2, CANCELLOUS + 40.0 * c.noise(1.2))
    post = cy + r * 0.92
    p0 = np.array([[cx - 9, post + 3], [cx + 9, post + 3], [cx - 9, post + 12], [cx + 9, post + 12],
                   [cx - 10, post + 4], [cx + 10, post + 4]])
    p1 = np.array([[cx - 9, post + 12], [cx + 9, post + 12], [cx, post + 20], [cx, post + 20],
                   [cx - 32, post + 2 + rng.uniform(-3, 3)], [cx + 32, post + 2 + rng.uniform(-3, 3)]])
    rr = np.array([3.5, 3.5, 3.2, 3.2, 4.0, 4.0])
    arch = capsules(X, Y, p0, p1, rr, rr * 0.8)
    spinous = capsules(X, Y, np.array([[cx, post + 18]]), np.array([[cx, post + 18 + 2.0 * r]]),
                       np.array([4.0]), np.array([3.0]))
    bone = torch.minimum(arch, spinous)
    c.paint(bone, CORTICAL * 0.85)
    c.paint(bone + 1.5, CANCELLOUS + 60.0)
    if canal:
        c.paint(_ellipse(X, Y, cx, post + 9.0, 8.0, 6.5), 20.0)  # canal: CSF and cord
    return torch.minimum(body, bone)


def _ribs(c: _Canvas, an: dict, angles: np.ndarray, rx: float, ry: float, cy: float, rng: np.random.Generator) -> None:
    """Rib cross-sections along the ellipse ``(rx, ry)``: oblique bone ovals with a cortical shell."""
    X, Y = c.X, c.Y
    for ang in angles:
        x, y = rx * math.cos(ang), cy + ry * math.sin(ang)
        tangent = math.atan2(ry * math.cos(ang), -rx * math.sin(ang))
        anterior = math.sin(ang) < -0.55  # anterior ribs end in costal cartilage
        a, b = rng.uniform(6.0, 11.0), rng.uniform(3.5, 5.0)
        rib = _ellipse(X, Y, x, y, a, b, angle=tangent)
        if anterior and rng.uniform() < 0.6:
            c.paint(rib, CARTILAGE + rng.uniform(-30, 60))
        else:
            c.paint(rib, CORTICAL * 0.9)
            c.paint(rib + 1.3, CANCELLOUS + 30.0)


# ----------------------------------------------------------------------------------------------------------------
# Chest
# ----------------------------------------------------------------------------------------------------------------
def _chest_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    a, b = rng.uniform(148, 172), rng.uniform(104, 122)
    return {
        "a": a, "b": b, "cy": rng.uniform(-14, -6), "fat": rng.uniform(6, 22), "muscle": rng.uniform(9, 14),
        "back": rng.uniform(34, 44), "body_wobble": np.array([[-0.025, 0.0], [0.015, rng.uniform(0, 6)]]),
        "muscle_wobble": _wobble(rng, 3, 0.015), "r_vert": rng.uniform(14, 17),
        "heart_a": rng.uniform(50, 60), "heart_b": rng.uniform(38, 46), "heart_x": rng.uniform(12, 26),
        "heart_angle": rng.uniform(-0.7, -0.45), "med_w": rng.uniform(16, 22), "breasts": rng.uniform() < 0.4,
        "lung_wobble": _wobble(rng, 4, 0.025), "dependent": rng.uniform(30, 80),
        "nodules": _spheres(rng, int(rng.integers(1, 4)), (2.5, 7.0)),
        "n_ribs": int(rng.integers(7, 10)), "calcified": rng.uniform() < 0.5,
    }


def _lung_vessels(c: _Canvas, rng: np.random.Generator, hila: list[tuple[float, float, float]], reach: float
                  ) -> tuple[Tensor, Tensor]:
    """Short branching in-plane vessel trees from the hila and many through-plane vessel dots (denser and larger
    near the hila); returns (vessel sdf, airway sdf)."""
    p0, p1, r0, r1 = [], [], [], []
    stack = []
    for hx, hy, direction in hila:
        for _ in range(int(rng.integers(3, 6))):
            ang = direction + rng.uniform(-1.3, 1.3)
            start = rng.uniform(0, 15)
            stack.append((hx + start * math.cos(ang), hy + start * math.sin(ang), ang, rng.uniform(2.4, 3.4),
                          rng.uniform(12, 24), 0))
    while stack:
        x, y, ang, r, length, depth = stack.pop()
        ang = ang + rng.normal(0, 0.15)
        ex, ey = x + length * math.cos(ang), y + length * math.sin(ang)
        rend = max(0.45, r * rng.uniform(0.7, 0.85))
        p0.append((x, y)), p1.append((ex, ey)), r0.append(r), r1.append(rend)
        if depth < 4 and rend > 0.55:
            for sign in (-1, 1):
                if rng.uniform() < 0.75:
                    stack.append((ex, ey, ang + sign * rng.uniform(0.3, 0.8), rend * rng.uniform(0.75, 0.92),
                                  length * rng.uniform(0.55, 0.85), depth + 1))
    n_dots = int(rng.integers(160, 240))
    for _ in range(n_dots):
        hx, hy, direction = hila[int(rng.integers(len(hila)))]
        dist = reach * rng.uniform(0.05, 1.0) ** 0.8
        ang = direction + rng.normal(0, 1.0)
        x, y = hx + dist * math.cos(ang), hy + dist * math.sin(ang) * 0.9
        r = max(0.4, rng.uniform(0.8, 3.0) * (1.0 - 0.8 * dist / reach))
        tail = rng.normal(0, 1.5 * r, 2) if rng.uniform() < 0.5 else np.zeros(2)
        p0.append((x, y)), p1.append((x + tail[0], y + tail[1])), r0.append(r), r1.append(r * 0.9)
    vessels = capsules(c.X, c.Y, np.array(p0), np.array(p1), np.array(r0), np.array(r1))
    # airways: thin-walled air tubes beside some proximal vessels (bronchus next to its artery)
    a0, a1, ar = [], [], []
    for i in range(len(p0)):
        if r0[i] > 1.6 and rng.uniform() < 0.5:
            ang = math.atan2(p1[i][1] - p0[i][1], p1[i][0] - p0[i][0]) + math.pi / 2
            off = r0[i] * 2.1
            d = (off * math.cos(ang), off * math.sin(ang))
            a0.append((p0[i][0] + d[0], p0[i][1] + d[1]))
            a1.append((p1[i][0] + d[0], p1[i][1] + d[1]))
            ar.append(r0[i] * 0.9)
    airways = capsules(c.X, c.Y, np.array(a0).reshape(-1, 2), np.array(a1).reshape(-1, 2), np.array(ar),
                       np.array(ar) * 0.8)
    return vessels, airways


def _render_chest(c: _Canvas, an: dict, z: float, z_mm: float, rng: np.random.Generator) -> None:
    X, Y = c.X, c.Y
    # the chest widens from the apex; breasts anterior-lateral in some patients
    s_body = 0.86 + 0.14 * math.sin(0.5 * math.pi * min(1.0, z / 0.6))
    an = dict(an, a=an["a"] * s_body, b=an["b"] * (0.93 + 0.07 * s_body))
    cy = an["cy"]
    if an["breasts"] and 0.35 < z < 0.85:
        for sx in (-1, 1):
            br = _ellipse(X, Y, sx * an["a"] * 0.45, cy - an["b"] * 0.72, 50, 36, angle=sx * 0.3)
            c.paint(br, FAT + 10.0 * c.noise(2.0))
            c.paint(br + 14.0, -30.0 + 35.0 * c.noise(1.5))  # glandular tissue
    inner = _body_wall(c, an, rng)
    top, bottom, cav_cy, r_v, y_v = inner["top"], inner["bottom"], inner["cy"], an["r_vert"], inner["y_v"]
    # pectoral muscles, back muscles, scapulae (upper chest)
    wall = inner["within_wall"]
    if z < 0.7:  # pectoral muscles under the subcutaneous fat
        for sx in (-1, 1):
            pec = _ellipse(X, Y, sx * inner["a"] * 0.5, top - 8.0, inner["a"] * 0.45, 12.0, angle=-sx * 0.2)
            c.paint(pec, MUSCLE + 3.0 * c.noise(2.0), within=wall)
    _back_muscles(c, inner, an)
    if z < 0.62:  # scapulae behind the posterior ribs
        for sx in (-1, 1):
            sc = _ellipse(X, Y, sx * (inner["a"] - 30.0), bottom + 6.0, 40.0 * (1 - z * 0.5), 4.0, angle=-sx * 0.4)
            c.paint(sc, CORTICAL * 0.8, within=wall)
            c.paint(sc + 1.2, CANCELLOUS, within=wall)
    # cavity lined by the ribs (inside the muscle wall)
    cav_a, cav_b = inner["a"] - 6.0, inner["b"] - 4.0
    cavity = _ellipse(X, Y, 0.0, cav_cy, cav_a, cav_b, wobble=an["lung_wobble"])
    c.paint(cavity - 3.0, FAT + 5.0 * c.noise(2.0))  # intercostal / extrapleural fat line
    n = an["n_ribs"]
    angles = np.linspace(-2.2, 1.25, n) + rng.normal(0, 0.05, n)
    angles = np.concatenate([angles, np.pi - angles])
    _ribs(c, an, angles, cav_a + 5.5, cav_b + 5.0, cav_cy, rng)
    if 0.08 < z < 0.85:
        st = _ellipse(X, Y, 0.0, top - 3.0, 14.0, 6.5)
        c.paint(st, CORTICAL * 0.8)
        c.paint(st + 1.5, CANCELLOUS)
    # mediastinum and heart (sizes change along z), aorta; lungs = cavity minus all of these
    heart_s = _profile(z, 0.32, 0.72, 1.05)
    hx = an["heart_x"]
    hb = an["heart_b"] * max(heart_s, 1e-3)
    hy = top + 8.0 + hb * 0.95
    heart = _ellipse(X, Y, hx, hy, an["heart_a"] * max(heart_s, 1e-3), hb, angle=an["heart_angle"],
                     wobble=np.array([[0.04, 0.3], [0.02, 2.0]]))
    aorta_x, aorta_y, aorta_r = r_v * 0.95, y_v - r_v * 0.75, 11.0 + 2.0 * (1 - z)
    med = _ellipse(X, Y, 0.0, cav_cy - 6.0, an["med_w"] + 6.0 * (1 - z), cav_b * 0.96)
    spine_block = _ellipse(X, Y, 0.0, y_v + 10.0, r_v + 10.0, r_v + 16.0)
    blocker = torch.minimum(torch.minimum(med, heart - 5.0), spine_block)
    blocker = torch.minimum(blocker, _circle(X, Y, aorta_x, aorta_y, aorta_r + 3.0))
    dome_s = max(0.0, (z - 0.82) / 0.18)
    if dome_s > 0:  # the right hemidiaphragm and liver dome rise into the base of the right lung
        dome = _ellipse(X, Y, -cav_a * 0.45, cav_cy + cav_b * 0.1, cav_a * 0.6 * dome_s, cav_b * 0.8 * dome_s)
        blocker = torch.minimum(blocker, dome)
    lungs = _smooth_subtract(cavity, blocker, 8.0)
    c.paint(cavity, FAT + 6.0 * c.noise(2.0))
    lung_value = LUNG + 22.0 * c.noise(1.2) + an["dependent"] * ((Y - top) / (2 * cav_b)).clamp(0, 1) ** 2
    lung_cov = c.paint(lungs, lung_value)
    # lung vessels and airways, confined to the lungs
    hila = [(-an["med_w"] - 14.0, cav_cy - 2.0, math.pi), (an["med_w"] + 14.0, cav_cy - 2.0, 0.0)]
    vessels, airways = _lung_vessels(c, rng, hila, reach=cav_a * 0.95)
    inside = c.cover(lungs + 2.0)
    c.paint(vessels, BLOOD + 8.0 * c.noise(3.0), within=inside)
    c.paint(airways, 20.0, within=inside)
    c.paint(airways + 0.9, AIR + 80.0, within=inside)
    # heart with pericardial fat and calcified coronaries
    if heart_s > 0.02:
        c.paint(heart - 4.0, FAT - 5.0)
        c.paint(heart, BLOOD + 4.0 + 3.0 * c.noise(3.0))
        if an["calcified"]:
            for _ in range(int(rng.integers(1, 3))):
                ang = an["heart_angle"] + math.pi + rng.uniform(-0.6, 0.6)
                dist = rng.uniform(0.75, 0.95)
                px = hx + dist * an["heart_a"] * heart_s * math.cos(ang)
                py = hy + dist * hb * math.sin(ang)
                c.paint(_circle(X, Y, px, py, rng.uniform(1.0, 2.2)), rng.uniform(350, 700))
    # great vessels, airway, oesophagus
    c.paint(_circle(X, Y, aorta_x, aorta_y, aorta_r), BLOOD + 2.0)
    if z < 0.3:  # aortic arch and superior vena cava
        arch = capsules(X, Y, np.array([[-12.0, top + 34.0]]), np.array([[aorta_x - 4.0, aorta_y - 24.0]]),
                        np.array([12.5]), np.array([aorta_r]))
        c.paint(arch, BLOOD + 2.0)
        c.paint(_circle(X, Y, -30.0, top + 30.0, 9.0), BLOOD)
    elif heart_s < 0.85:
        c.paint(_circle(X, Y, -12.0, top + 32.0, 14.5), BLOOD + 2.0)  # ascending aorta
        c.paint(_circle(X, Y, 15.0, top + 28.0, 13.0), BLOOD)  # pulmonary trunk
        c.paint(_circle(X, Y, -31.0, top + 36.0, 9.0), BLOOD)  # superior vena cava
    c.paint(_circle(X, Y, 7.0, y_v - r_v - 6.0, 6.5), 38.0)  # oesophagus
    if z < 0.42:
        tr = _circle(X, Y, -2.0, y_v - r_v - 22.0, 9.5)
        c.paint(tr, 60.0)
        c.paint(tr + 2.0, AIR + 20.0)
    elif z < 0.58:
        for sx in (-1, 1):
            br = _circle(X, Y, sx * 16.0, y_v - r_v - 24.0, 6.0)
            c.paint(br, 60.0)
            c.paint(br + 1.5, AIR + 20.0)
    _vertebra(c, 0.0, y_v, r_v, rng)
    if dome_s > 0:
        c.paint(torch.maximum(dome, cavity), 62.0 + 4.0 * c.noise(3.0))
    # nodules: solid (most) or ground-glass, spheres in 3-D, confined to the lungs
    for nd in an["nodules"]:
        dz = (z - nd["z"]) * KINDS["chest"]
        if abs(dz) >= nd["r"]:
            continue
        r = math.sqrt(nd["r"] ** 2 - dz**2)
        nx = math.copysign(an["med_w"] + 20.0 + abs(nd["u"]) * (cav_a - an["med_w"] - 40.0), nd["u"])
        ny = cav_cy + nd["v"] * cav_b * 0.6
        sdf = _ellipse(X, Y, nx, ny, r, r, wobble=np.array([[nd["lob"], nd["phase"]], [nd["lob"] / 2, 1.0]]))
        value = -520.0 if nd["kind"] < 0.2 else 30.0 + 25.0 * nd["kind"]
        c.paint(sdf, value, within=(lung_cov > 0.5).to(torch.float32))


# ----------------------------------------------------------------------------------------------------------------
# Abdomen
# ----------------------------------------------------------------------------------------------------------------
def _abdomen_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    a, b = rng.uniform(138, 170), rng.uniform(105, 128)
    return {
        "a": a, "b": b, "cy": rng.uniform(-12, -2), "fat": rng.uniform(10, 36), "muscle": rng.uniform(7, 12),
        "back": rng.uniform(38, 50), "body_wobble": np.array([[0.03, 0.0], [0.02, rng.uniform(0, 6)]]),
        "muscle_wobble": _wobble(rng, 3, 0.02), "r_vert": rng.uniform(17, 21),
        "liver_scale": rng.uniform(0.85, 1.1), "liver_wobble": _wobble(rng, 4, 0.05),
        "spleen_scale": rng.uniform(0.8, 1.15), "kidney_scale": rng.uniform(0.9, 1.1),
        "kidney_shift": rng.uniform(-0.08, 0.08), "stomach_air": rng.uniform(0.1, 0.6),
        "liver_lesions": _spheres(rng, int(rng.integers(1, 4)), (4.0, 12.0)),
        "kidney_cyst": _spheres(rng, int(rng.integers(0, 2)), (4.0, 9.0)),
        "aorta_calcified": rng.uniform() < 0.5,
    }


def _render_abdomen(c: _Canvas, an: dict, z: float, z_mm: float, rng: np.random.Generator) -> None:
    X, Y = c.X, c.Y
    inner = _body_wall(c, an, rng)
    top, cav_cy, r_v, y_v = inner["top"], inner["cy"], an["r_vert"], inner["y_v"]
    _back_muscles(c, inner, an)
    cav_a, cav_b = inner["a"], inner["b"]
    cavity = _ellipse(X, Y, 0.0, cav_cy, cav_a, cav_b, wobble=an["muscle_wobble"])
    c.paint(cavity, FAT + 10.0 * c.noise(1.0))
    inside = c.cover(cavity + 1.0)
    # mesenteric vessels: bright dots in the fat
    n_dots = int(rng.integers(25, 50))
    pts = np.stack([rng.uniform(-0.7, 0.7, n_dots) * cav_a, cav_cy + rng.uniform(-0.8, 0.4, n_dots) * cav_b], 1)
    rr = rng.uniform(0.8, 2.5, n_dots)
    c.paint(capsules(X, Y, pts, pts + rng.normal(0, 2.0, pts.shape), rr, rr * 0.8), 140.0, within=inside)
    # bowel loops (small bowel and colon): enhancing wall, content air / fluid / air-fluid level / stool
    n_loops = int(rng.integers(8, 16)) if z > 0.25 else int(rng.integers(3, 7))
    for _ in range(n_loops):
        r = rng.uniform(8.0, 17.0)
        bx = rng.uniform(-0.75, 0.75) * (cav_a - r)
        by = cav_cy + rng.uniform(-0.85, 0.35) * (cav_b - r)
        sdf = _ellipse(X, Y, bx, by, r * rng.uniform(0.8, 1.3), r, angle=rng.uniform(0, np.pi))
        c.paint(sdf, 85.0 + 10.0 * rng.normal(), within=inside)
        u = rng.uniform()
        content: "float | Tensor"
        if u < 0.25:
            content = AIR + 30.0
        elif u < 0.6:
            content = 15.0 + 10.0 * rng.normal()
        elif u < 0.8:
            content = torch.where(Y < by - r * rng.uniform(-0.2, 0.5), torch.full_like(Y, AIR + 30.0),
                                  torch.full_like(Y, 18.0))
        else:
            content = -250.0 + 350.0 * c.noise(1.2).clamp(-1.5, 1.5)  # stool with gas
        c.paint(sdf + 2.5, content, within=inside)
    for sx in (-1, 1):  # ascending / descending colon, laterally
        if z > 0.35:
            col = _ellipse(X, Y, sx * cav_a * 0.72, cav_cy + cav_b * 0.05, 20.0, 18.0, angle=rng.uniform(0, 3))
            c.paint(col, 80.0, within=inside)
            c.paint(col + 2.5, -300.0 + 400.0 * c.noise(1.5).clamp(-1.5, 1.5), within=inside)
    # retroperitoneum: aorta, IVC, psoas
    psoas_s = 0.35 + 0.65 * min(1.0, max(0.0, (z - 0.3) / 0.6))
    for sx in (-1, 1):
        c.paint(_ellipse(X, Y, sx * (r_v + 14.0 * psoas_s + 4.0), y_v - 2.0, 13.0 * psoas_s + 3.0, 17.0 * psoas_s + 4.0,
                         angle=sx * 0.3), MUSCLE)
    _vertebra(c, 0.0, y_v, r_v, rng)
    ao = _circle(X, Y, 9.0, y_v - r_v - 10.0, 11.0)
    c.paint(ao, AORTA_CE + 8.0 * c.noise(4.0))
    if an["aorta_calcified"]:
        for ang in rng.uniform(0, 2 * np.pi, int(rng.integers(1, 4))):
            c.paint(_circle(X, Y, 9.0 + 10.2 * math.cos(ang), y_v - r_v - 10.0 + 10.2 * math.sin(ang), 1.4), 650.0)
    c.paint(_ellipse(X, Y, -22.0, y_v - r_v - 12.0, 14.0, 10.0), 135.0)  # IVC
    # kidneys with cortex, medulla, sinus fat; optional cyst
    for sx in (-1, 1):
        ks = _profile(z + sx * an["kidney_shift"], 0.15, 0.5, 0.88) * an["kidney_scale"]
        if ks < 0.05:
            continue
        kx, ky = sx * (r_v + 48.0), y_v - 4.0
        kid = _ellipse(X, Y, kx, ky, 30.0 * ks + 2, 22.0 * ks + 2, angle=sx * 0.5,
                       wobble=np.array([[0.04, 0.5], [0.02, 2.0]]))
        c.paint(kid - 6.0, FAT - 5.0)  # perirenal fat
        c.paint(kid, KIDNEY_CORTEX + 6.0 * c.noise(2.0))
        c.paint(kid + 6.0 * ks, KIDNEY_MEDULLA + 5.0 * c.noise(2.0))
        if ks > 0.5:
            c.paint(_ellipse(X, Y, kx - sx * 14.0 * ks, ky, 8.0 * ks, 10.0 * ks), FAT + 20.0)  # renal sinus
        for cyst in an["kidney_cyst"]:
            dz = (z - cyst["z"]) * KINDS["abdomen"]
            if (cyst["u"] > 0) == (sx > 0) and abs(dz) < cyst["r"]:
                r = math.sqrt(cyst["r"] ** 2 - dz**2)
                c.paint(_circle(X, Y, kx + cyst["v"] * 12.0 * ks, ky - 10.0 * ks * cyst["kind"], r), 8.0)
    # pancreas
    ps = _profile(z, 0.25, 0.45, 0.65)
    if ps > 0.05:
        pts0 = np.array([[-25.0, y_v - r_v - 34.0], [0.0, y_v - r_v - 30.0], [30.0, y_v - r_v - 26.0]])
        pts1 = np.array([[0.0, y_v - r_v - 30.0], [30.0, y_v - r_v - 26.0], [60.0, y_v - r_v - 14.0]])
        rr = np.array([11.0, 9.0, 8.0]) * ps
        c.paint(capsules(X, Y, pts0, pts1, rr, rr * 0.9), 95.0 + 8.0 * c.noise(1.0), within=inside)
    # stomach: air above an air-fluid level, enhancing wall
    ss = _profile(z, -0.2, 0.1, 0.5)
    if ss > 0.05:
        st = _ellipse(X, Y, cav_a * 0.35, top + 42.0, 45.0 * ss, 32.0 * ss, angle=-0.4, wobble=_wobble(rng, 3, 0.04))
        c.paint(st, 90.0, within=inside)
        level = top + 42.0 - 32.0 * ss * (1.0 - 2.0 * an["stomach_air"])
        content = torch.where(Y < level, torch.full_like(Y, AIR + 30.0), 20.0 + 6.0 * c.noise(2.0))
        c.paint(st + 4.0, content, within=inside)
    # spleen
    sps = _profile(z, -0.25, 0.15, 0.55) * an["spleen_scale"]
    if sps > 0.05:
        sp = _ellipse(X, Y, cav_a * 0.68, y_v - 18.0, 48.0 * sps, 24.0 * sps, angle=1.0, wobble=_wobble(rng, 3, 0.05))
        c.paint(torch.maximum(sp, cavity + 2.0), SPLEEN_CE + 5.0 * c.noise(2.0))
    # liver: right lobe plus the left lobe across the midline, portal and hepatic vessels, lesions
    ls = _profile(z, -0.3, 0.1, 0.78) * an["liver_scale"]
    if ls > 0.05:
        right = _ellipse(X, Y, -cav_a * 0.42, cav_cy - cav_b * 0.12, cav_a * 0.62 * ls, cav_b * 0.95 * ls,
                         angle=0.25, wobble=an["liver_wobble"])
        left = _ellipse(X, Y, 18.0, top + 30.0, 55.0 * ls**2, 24.0 * ls**2, angle=0.2)
        liver = _smooth_union(right, left, 12.0)
        liver = torch.maximum(liver, cavity + 2.0)
        liv_cov = c.paint(liver, LIVER_CE + 5.0 * c.noise(2.5))
        cx0, cy0 = -cav_a * 0.35, cav_cy - cav_b * 0.1
        n_v = int(rng.integers(5, 10))
        angs = rng.uniform(0, 2 * np.pi, n_v)
        lens = rng.uniform(20, 60, n_v) * ls
        p0 = np.stack([cx0 + rng.normal(0, 8, n_v), cy0 + rng.normal(0, 8, n_v)], 1)
        p1 = p0 + np.stack([np.cos(angs), np.sin(angs)], 1) * lens[:, None]
        rr = rng.uniform(2.0, 5.5, n_v)
        c.paint(capsules(X, Y, p0, p1, rr, rr * 0.5), PORTAL_CE, within=(liv_cov > 0.99).to(torch.float32))
        for les in an["liver_lesions"]:
            dz = (z - les["z"]) * KINDS["abdomen"]
            if abs(dz) >= les["r"]:
                continue
            r = math.sqrt(les["r"] ** 2 - dz**2)
            lx = -cav_a * 0.42 + les["u"] * cav_a * 0.3 * ls
            ly = cav_cy - cav_b * 0.12 + les["v"] * cav_b * 0.45 * ls
            value = LIVER_CE - 60.0 if les["kind"] < 0.75 else LIVER_CE + 45.0  # metastasis-like / haemangioma-like
            sdf = _ellipse(X, Y, lx, ly, r, r * 0.9, wobble=np.array([[les["lob"], les["phase"]]]))
            c.paint(sdf, value, within=(liv_cov > 0.5).to(torch.float32))
        gs = _profile(z, 0.3, 0.45, 0.62)
        if gs > 0.05:
            c.paint(_ellipse(X, Y, -cav_a * 0.2, top + 40.0, 16.0 * gs, 12.0 * gs, angle=0.6), 10.0)  # gallbladder
    # lower ribs at the upper abdomen
    if z < 0.45:
        n = int(rng.integers(3, 6))
        angles = np.concatenate([np.linspace(-0.6, 1.2, n), np.linspace(-2.0, -1.5, 2)]) + rng.normal(0, 0.06, n + 2)
        angles = np.concatenate([angles, np.pi - angles])
        _ribs(c, an, angles, cav_a + 7.0, cav_b + 6.0, cav_cy, rng)


# ----------------------------------------------------------------------------------------------------------------
# A phantom data set in the public LDCT layout
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PhantomDatasetSpec:
    """What :func:`write_phantom_dataset` makes; stored as ``phantoms.json`` so a re-run resumes or refuses to mix.

    Attributes:
        patients: number of synthetic patients (kinds alternate through ``kinds``).
        min_slices, max_slices: slices per patient, drawn per patient (so patients differ in slice count).
        size: image size (pixels, square); pixel size is ``FOV_MM / size``.
        doses: low-dose fractions; each gets a ``Low Dose Images (NN%)`` series beside ``Full Dose Images``.
        seed: base seed (patients, slice positions, noise).
        kinds: phantom kinds cycled over patients.
        slice_spacing_mm: distance between a patient's slices (they are spread over the region).
        i0: unattenuated photons per detector bin and view at full dose.
        n_angles: views (``None``: the projector's default).
        filter_name: FBP filter.
    """

    patients: int = 6
    min_slices: int = 3
    max_slices: int = 8
    size: int = 512
    doses: tuple[float, ...] = (0.25, 0.10)
    seed: int = 0
    kinds: tuple[str, ...] = ("chest", "abdomen")
    i0: float | None = None
    n_angles: int | None = None
    filter_name: str = "shepp-logan"

    def check(self) -> None:
        if self.patients < 1:
            raise BlindspotError(None, f"--patients must be >= 1, got {self.patients}")
        if not (1 <= self.min_slices <= self.max_slices):
            raise BlindspotError(None, f"need 1 <= --min-slices <= --max-slices, got {self.min_slices}, {self.max_slices}")
        if not (16 <= self.size <= 2048):
            raise BlindspotError(None, f"--size must be in 16 … 2048 pixels, got {self.size}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise BlindspotError(None, f"unknown phantom kind(s) {bad}; use {', '.join(KINDS)}")
        if not self.doses or any(not (0 < d < 1) for d in self.doses):
            raise BlindspotError(None, f"--doses must be fractions in (0, 1), got {list(self.doses)}")

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["doses"], d["kinds"] = list(self.doses), list(self.kinds)
        return d


def _patient_plan(spec: PhantomDatasetSpec, p: int) -> dict[str, Any]:
    kind = spec.kinds[p % len(spec.kinds)]
    rng = np.random.default_rng([spec.seed, p, 11])
    n = int(rng.integers(spec.min_slices, spec.max_slices + 1))
    zs = 0.05 + 0.9 * (np.arange(n) + rng.uniform(0.2, 0.8, n)) / n
    prefix = "C" if kind == "chest" else "L"
    return {"kind": kind, "patient_id": f"{prefix}{p + 1:03d}", "seed": int(rng.integers(0, 2**31 - 1)),
            "zs": [float(z) for z in zs]}


def write_phantom_dataset(
    out: "str | Path", spec: PhantomDatasetSpec, device: str = "cpu", batch: int = 8, progress: bool = True
) -> dict[str, Any]:
    """Write synthetic patients as DICOM in ``out/LDCT-and-Projection-data/<patient>/<study>/<series>/1-NNN.dcm``.

    Each slice is rendered in HU, projected once, and reconstructed at full dose and at every low dose with nested
    Poisson noise (:meth:`blindspot.physics.ct.LowDoseCT.simulate`). Files are written atomically; a patient whose
    files all exist is skipped, so an interrupted run resumes (output is deterministic, so resuming gives the same
    files). ``out/phantoms.json`` records the spec; a different spec in an existing folder is an error.

    Up to ``batch`` slices of a patient share one projection and one FBP (default 8, the default largest number of
    slices per patient: each default patient is one batch). A slice's noise is drawn from its own generator, but
    Poisson sampling consumes a varying number of random draws, so a change of a rate in its last bits gives another
    realisation of the noise. On the CPU a slice's projection is the same bits in any batch and with any thread
    count, so the same spec gives the same files on one machine (another CPU's vector units may round ``exp``
    differently); on a GPU the rounding depends on the batch, and differs from the CPU's.

    Returns the manifest (spec, physics, patients with their series folders and slice positions).
    """
    from pathlib import Path

    from tqdm.auto import tqdm

    spec.check()
    out = Path(out)
    manifest_path = out / "phantoms.json"
    if manifest_path.exists():
        old = read_json(manifest_path)
        if old.get("spec") != spec.as_dict():
            raise BlindspotError(manifest_path, "this folder holds phantoms made with other settings; use another "
                                 "--out (or the same settings to resume)")
    px = FOV_MM / spec.size
    ct = LowDoseCT((spec.size, spec.size), px, i0=spec.i0 or DEFAULT_I0, n_angles=spec.n_angles,
                   filter_name=spec.filter_name)
    physics = ct.physics_dict()
    manifest: dict[str, Any] = {"spec": spec.as_dict(), "physics": physics, "fov_mm": FOV_MM, "patients": []}
    write_json(manifest_path, {**manifest, "complete": False})
    root = out / "LDCT-and-Projection-data"
    plans = [_patient_plan(spec, p) for p in range(spec.patients)]
    total = sum(len(pl["zs"]) for pl in plans)
    bar = tqdm(total=total, desc="CT phantoms", unit="slice", disable=not progress)
    for p, plan in enumerate(plans):
        pid, kind = plan["patient_id"], plan["kind"]
        study_uid = ldct_uid("study", spec.seed, pid)
        frame_uid = ldct_uid("frame", spec.seed, pid)
        study = root / pid / study_folder_name("20200101", f"Synthetic {kind} phantom", study_uid)
        series = [("full", 1.0, 1, "Full Dose Images")] + [
            ("low", d, k + 2, f"Low Dose Images ({d * 100:g}%)") for k, d in enumerate(spec.doses)]
        folders = {}
        for tag, d, number, desc in series:
            uid = ldct_uid("series", spec.seed, pid, tag, d)
            folders[d] = (study / series_folder_name(number, desc, uid), uid, number, desc)
        zs = plan["zs"]
        length = KINDS[kind]
        files = {d: [folders[d][0] / f"1-{k + 1:03d}.dcm" for k in range(len(zs))] for d in folders}
        entry = {"patient": pid, "kind": kind, "seed": plan["seed"], "z_rel": zs,
                 "z_mm": [round(-z * length, 3) for z in zs],
                 "series": {f"{d:g}": str(folders[d][0].relative_to(out)) for d in folders}}
        manifest["patients"].append(entry)
        if all(f.exists() for fl in files.values() for f in fl):
            bar.update(len(zs))
            continue
        patient = PhantomPatient(kind, plan["seed"])
        for k0 in range(0, len(zs), batch):
            chunk = list(range(k0, min(len(zs), k0 + batch)))
            hu = torch.stack([patient.render(zs[k], size=spec.size, device=device) for k in chunk]).unsqueeze(1)
            # one batched projection and FBP for the chunk; each slice's noise from its own generator
            gens = [torch.Generator(device=device).manual_seed(int(plan["seed"]) * 1009 + k) for k in chunk]
            images = ct.simulate(hu, (1.0, *spec.doses), generator=gens)
            for j, k in enumerate(chunk):
                for d, img in images.items():
                    folder, uid, number, desc = folders[d]
                    write_ct_slice(
                        files[d][k], img[j, 0], patient_id=pid, study_uid=study_uid, series_uid=uid,
                        frame_uid=frame_uid, sop_uid=ldct_uid("sop", spec.seed, pid, d, k), series_number=number,
                        series_description=desc, instance_number=k + 1, z_mm=-zs[k] * length,
                        pixel_spacing_mm=px, study_date="20200101", study_description=f"Synthetic {kind} phantom",
                        body_part="CHEST" if kind == "chest" else "ABDOMEN", exposure_mas=200.0 * d,
                        extra={"ConvolutionKernel": f"FBP {spec.filter_name}",
                               "ImageComments": f"blindspot synthetic phantom; dose fraction {d:g}; I0 {ct.i0:g}"},
                    )
                bar.update(1)
    bar.close()
    manifest["complete"] = True
    write_json(manifest_path, manifest)
    return manifest


def scanner_of(physics: Mapping[str, Any], image_shape: tuple[int, int] | None = None) -> LowDoseCT:
    """The scanner a CT checkpoint records (its ``physics``), at ``image_shape`` with the same field of view; without
    CT physics, the phantoms' own: a ``FOV_MM`` field of view and the default ``I0``."""
    if physics.get("modality") == "ct" and physics.get("pixel_size_mm") is not None:
        return LowDoseCT.from_physics_dict(physics, image_shape)
    shape = tuple(int(s) for s in (image_shape or (512, 512)))
    return LowDoseCT(shape, pixel_size_mm=FOV_MM / shape[0])


class PhantomPairs(Dataset):
    """Built-in CT phantom slices as (low-dose, full-dose) pairs in HU, made like ``blindspot data ct-phantoms``: one
    nested projection-domain simulation of both doses per slice, seeded by ``(seed, i)``.

    Slice ``i`` is a chest (even ``i``) or abdomen (odd) slice of patient ``seed·1000 + i // 2`` (at 55 % / 50 % of
    its length); items are :class:`~blindspot.data.ldct.CTSample` (batch them with ``collate_ct``), so phantoms and
    the public LDCT pairs look alike to every consumer.

    Args:
        n: number of slices.
        ct: the scanner (geometry, ``I0``; the image size is its matrix).
        dose: the low dose (the full dose is 1).
        seed: phantom and noise seed.
    """

    def __init__(self, n: int, ct: LowDoseCT, dose: float, seed: int = 0) -> None:
        if n < 1:
            raise BlindspotError(None, f"need at least 1 phantom slice, got {n}")
        self.n, self.ct, self.dose, self.seed = int(n), ct, float(dose), int(seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> CTSample:
        kind = ("chest", "abdomen")[i % 2]
        patient = self.seed * 1000 + i // 2
        z = 0.5 if kind == "abdomen" else 0.55
        size = self.ct.image_shape[0]
        body = PhantomPatient(kind, patient)
        hu = body.render(z, size=size).reshape(1, 1, size, size).to(torch.float32)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        pair = self.ct.simulate(hu, (1.0, self.dose), generator=g)
        return CTSample(pair[self.dose][0], pair[1.0][0], f"phantom-{kind}-{patient}", int(round(z * 100)),
                        z * body.length_mm)
