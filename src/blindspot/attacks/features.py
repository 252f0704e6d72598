"""FNAF feature families: small parameter tensors rendered in batch on the model's device.

A *feature* ``δ'`` (DESIGN.md §1.2) is a non-negative image with a small support ``S`` that is added to the ground truth.
Every family is described by the same few numbers per feature, held in a :class:`Features` batch:

========  =========================================  =======================================================
family    ``size`` (pixels)                          what is drawn
========  =========================================  =======================================================
walk      ``(steps, 0)``                              the seed's random walk: ``steps`` 4-connected moves from
                                                      ``center``; each visited pixel takes ``intensity × u``,
                                                      ``u ~ U(0, 1)`` (the seed: uniform in the image's range)
disc      ``(radius, radius)``                        a filled disc
ellipse   ``(semi-axis a, semi-axis b)``              a filled ellipse rotated by ``angle``
line      ``(length, width)``                         a thin bar (tear-like) rotated by ``angle``
blob      ``(sigma a, sigma b)``                      a smooth anisotropic Gaussian, cut to zero beyond 3σ
========  =========================================  =======================================================

``center`` is ``(row, col)`` in pixels, ``intensity`` the peak value in the image's own units, ``seed`` the shape
seed that drives the walk's steps and per-pixel values.

Randomness is *counter-based*: every random number is a hash of (a 32-bit key, a stream, an index), computed with
integer tensor ops on the device. A candidate's key is derived from (run seed, image identity, candidate index), so a
candidate never depends on how many others are drawn, on batching or chunking, or on an interrupted run: the same seed
gives the same features everywhere, and more candidates are a superset of fewer.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from blindspot.errors import BlindspotError

FAMILIES: tuple[str, ...] = ("walk", "disc", "ellipse", "line", "blob")

#: The seed's evaluation walk: exactly 10 one-pixel steps (a 10-pixel feature in a 320×320 image).
SEED_WALK_STEPS: int = 10
#: The seed's robust-training walks: 10–99 steps.
SEED_TRAINING_WALK_STEPS: tuple[int, int] = (10, 99)

#: Default (size range of dimension 0, size range of dimension 1) per family, in pixels.
#:
#: **Scale rule.** Features are sized in *pixels*, the same at every image size: the walk is the seed's evaluation
#: walk (:data:`SEED_WALK_STEPS` pixels); the other families (which the seed did not have; the CT audit's
#: low-contrast discs) keep their lesion-like sizes in pixels (a disc of radius 1.5–4 covers 7–50 pixels). The
#: seed's ``L_atk`` threshold (1e-3 at 320×320, a whole-image mean) is then scaled with the image area by
#: :meth:`blindspot.attacks.fnaf.FnafObjective.effective_loss_threshold`, so a feature counts as lost at every size
#: exactly when the same summed squared error inside ``T`` would reach the seed's threshold at 320×320; at 320×320
#: both the feature and the threshold are the seed's. The alternative — a feature scaled with the image area and the
#: unscaled 1e-3 — was rejected: at 128×128 the seed's feature would cover 1.6 pixels and at 64×64 less than one, so
#: the walk would stop being a walk and the network's response to a one-pixel dot (its smallest detail, where
#: reconstruction networks differ most from their behaviour on lesion-sized structures) would decide every rate.
#: Sizes in pixels also keep the feature's relation to the network's receptive field, which is set in pixels.
DEFAULT_SIZES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "walk": ((float(SEED_WALK_STEPS), float(SEED_WALK_STEPS)), (0.0, 0.0)),
    "disc": ((1.5, 4.0), (0.0, 0.0)),  # dimension 1 copies dimension 0
    "ellipse": ((2.0, 6.0), (1.0, 2.5)),
    "line": ((8.0, 24.0), (1.0, 2.0)),
    "blob": ((1.0, 3.0), (1.0, 3.0)),
}

#: Default peak-intensity range per family, as fractions of the truth's dynamic range ``max(y) − min(y)``.
DEFAULT_INTENSITY: dict[str, tuple[float, float]] = {
    "walk": (1.0, 1.0),  # per-pixel values are then U(0, max − min): the seed's U(min, max) for images whose minimum
    # is 0 (MRI magnitudes; the phantoms' background), shifted by −min otherwise (the feature is added to the image)
    "disc": (0.5, 1.0),
    "ellipse": (0.5, 1.0),
    "line": (0.5, 1.0),
    "blob": (0.5, 1.0),
}

#: The seed's region: the central 120×120 of a 320×320 image.
CENTER_FRACTION: float = 120.0 / 320.0

_M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------------------------
# Counter-based random numbers
# ----------------------------------------------------------------------------------------------------------------
def _mix32(x: Tensor) -> Tensor:
    """Bijective 32-bit integer mixer on int64 tensors holding values in ``[0, 2³²)``.

    Products stay below 2⁶³ (the multiplier is < 2²⁷), so int64 arithmetic is exact on every device.
    """
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def combine_keys(key: Tensor, index: Tensor | int) -> Tensor:
    """A new 32-bit key from ``key`` (int64 ``(N,)``) and ``index`` (int or int64 broadcasting with ``key``)."""
    index = torch.as_tensor(index, dtype=torch.int64, device=key.device)
    return _mix32(_mix32(key & _M32) ^ _mix32((index * 0x9E3779B1 + 0x7F4A7C15) & _M32))


def counter_bits(keys: Tensor, stream: int, n: int) -> Tensor:
    """32 hashed bits per counter: int64 ``(N, n)`` in ``[0, 2³²)``; entry ``(i, j)`` depends only on
    ``(keys[i], stream, j)``. Two mixing rounds over the batch (a dozen elementwise kernels in all)."""
    salt = (int(stream) * 0x9E3779B1 + 0x7F4A7C15) & _M32
    k = _mix32((keys ^ salt) & _M32)
    j = (torch.arange(n, dtype=torch.int64, device=keys.device) * 0x85EBCA6B) & _M32
    return _mix32((k[:, None] + j[None, :]) & _M32)


def counter_uniform(keys: Tensor, stream: int, n: int) -> Tensor:
    """Uniform numbers in ``[0, 1)`` from hashed counters.

    Args:
        keys: int64 ``(N,)`` 32-bit keys (one per feature).
        stream: which quantity is drawn (each parameter uses its own stream).
        n: numbers per key.
    Returns:
        float32 ``(N, n)``; entry ``(i, j)`` depends only on ``(keys[i], stream, j)`` (24-bit resolution).
    """
    return (counter_bits(keys, stream, n) >> 8).to(torch.float32) * (1.0 / 16777216.0)


def string_key(*parts: object) -> int:
    """A stable 32-bit key from any printable parts (run seed, image identity, acceleration, …)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=4).digest(), "little")


# ----------------------------------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """Where features are placed (their ``center``).

    Args:
        kind: ``"center"`` — a central crop of ``fraction`` of each side (the seed: 120×120 of 320×320, scaled with
            the image); ``"mask"`` — a user mask ``(h, w)`` of allowed pixels; ``"foreground"`` — pixels where the
            truth exceeds ``threshold × max(truth)``.
        fraction: side of the central crop as a fraction of each image side.
        mask: boolean ``(h, w)`` for ``kind="mask"``.
        threshold: foreground threshold, a fraction of each image's maximum.

    An image whose region is empty (a blank slice with ``"foreground"``) falls back to the whole image.

    With a field of view (CT: the reconstructed circle, :meth:`masks` ``field=``), only centres whose whole
    neighbourhood of ``margin`` pixels lies inside the field are allowed, so a feature (and its dilation ``T``) never
    covers a pixel that is not image; a region that misses the field falls back to the whole (shrunk) field.
    """

    kind: str = "center"
    fraction: float = CENTER_FRACTION
    mask: Tensor | None = field(default=None, compare=False)
    threshold: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in ("center", "mask", "foreground"):
            raise BlindspotError(None, f"unknown region {self.kind!r}; choose center, mask or foreground")
        if self.kind == "mask" and self.mask is None:
            raise BlindspotError(None, "a mask region needs a mask")
        if not 0.0 < self.fraction <= 1.0:
            raise BlindspotError(None, f"region fraction must lie in (0, 1], got {self.fraction}")

    def box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the central crop for an ``h × w`` image (at least 1×1)."""
        ch, cw = max(1, round(h * self.fraction)), max(1, round(w * self.fraction))
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def masks(self, target: Tensor, field: Tensor | None = None, margin: int = 0) -> Tensor:
        """Allowed centre pixels for each image: bool ``(B, h, w)``.

        Args:
            target: the truth ``(B, 1, h, w)``.
            field: the field of view, bool ``(B, 1, h, w)`` (``True`` = image), or ``None`` (every pixel is image).
            margin: with a field, pixels (Chebyshev distance) that a centre's neighbourhood reaches: a centre is
                allowed only when its whole ``(2·margin + 1)²`` square lies inside the field (and the image).
        An image whose field holds no such centre gets an empty mask (the caller reports it).
        """
        B, _, h, w = target.shape
        if self.kind == "center":
            top, left, ch, cw = self.box(h, w)
            m = torch.zeros(h, w, dtype=torch.bool, device=target.device)
            m[top : top + ch, left : left + cw] = True
            m = m.expand(B, h, w)
        elif self.kind == "mask":
            m = torch.as_tensor(self.mask, device=target.device).to(torch.bool)
            if tuple(m.shape[-2:]) != (h, w):
                raise BlindspotError(None, f"region mask is {tuple(m.shape[-2:])} but images are {(h, w)}")
            m = m.reshape(-1, h, w).expand(B, h, w)
        else:
            y = target[:, 0]
            inside = None if field is None else field[:, 0].to(device=y.device, dtype=torch.bool)
            peak = (y if inside is None else y.masked_fill(~inside, float("-inf"))).flatten(1).amax(1).reshape(B, 1, 1)
            m = y > self.threshold * peak
        if field is None:
            empty = ~m.flatten(1).any(1)
            return torch.where(empty.reshape(B, 1, 1), torch.ones_like(m), m)
        room = inner_field(field, margin)  # (B, h, w)
        m = m & room
        empty = ~m.flatten(1).any(1)
        return torch.where(empty.reshape(B, 1, 1), room, m)


def inner_field(field: Tensor, margin: int) -> Tensor:
    """The pixels whose ``(2·margin + 1)²`` square lies wholly inside the field of view (and the image): the field
    eroded by ``margin`` pixels, bool ``(B, h, w)`` from ``field`` bool ``(B, 1, h, w)``."""
    inside = field[:, 0].to(torch.bool)
    d = int(margin)
    if d <= 0:
        return inside
    outside = F.pad((~inside).to(torch.float32).unsqueeze(1), (d, d, d, d), value=1.0)  # beyond the border: no image
    outside = _window_max(_window_max(outside, 2 * d + 1, dim=-1), 2 * d + 1, dim=-2)
    return outside[:, 0] == 0


def sample_locations(region_masks: Tensor, u: Tensor) -> Tensor:
    """Pixels drawn uniformly from each image's region.

    Args:
        region_masks: bool ``(B, h, w)``.
        u: uniforms ``(B, n)`` in ``[0, 1)``.
    Returns:
        float32 ``(B, n, 2)`` pixel coordinates ``(row, col)``.
    """
    B, h, w = region_masks.shape
    cdf = region_masks.reshape(B, h * w).to(torch.float32).cumsum(1)  # exact integers up to 2^24 pixels
    total = cdf[:, -1:]
    idx = torch.searchsorted(cdf, torch.floor(u * total), right=True).clamp_(max=h * w - 1)
    return torch.stack([(idx // w).to(torch.float32), (idx % w).to(torch.float32)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Feature batches
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Features:
    """A batch of ``N`` features of one family.

    Attributes:
        family: one of :data:`FAMILIES`.
        center: float32 ``(N, 2)`` — ``(row, col)`` in pixels (the walk's first pixel; the shape's centre).
        size: float32 ``(N, 2)`` — family-specific sizes in pixels (module table).
        angle: float32 ``(N,)`` — orientation in radians (ellipse, line, blob).
        intensity: float32 ``(N,)`` — peak value in the image's units.
        seed: int64 ``(N,)`` — 32-bit shape seed (walk steps and per-pixel values).
        max_steps: static upper bound of the walk's ``steps`` (shapes the rendering batch).
    """

    family: str
    center: Tensor
    size: Tensor
    angle: Tensor
    intensity: Tensor
    seed: Tensor
    max_steps: int = 100

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise BlindspotError(None, f"unknown feature family {self.family!r}; choose from {', '.join(FAMILIES)}")

    def __len__(self) -> int:
        return int(self.center.shape[0])

    @property
    def device(self) -> torch.device:
        return self.center.device

    def _map(self, fn) -> "Features":
        return replace(
            self,
            center=fn(self.center),
            size=fn(self.size),
            angle=fn(self.angle),
            intensity=fn(self.intensity),
            seed=fn(self.seed),
        )

    def to(self, device: torch.device | str) -> "Features":
        return self._map(lambda t: t.to(device))

    def __getitem__(self, idx) -> "Features":
        return self._map(lambda t: t[idx])

    def detach(self) -> "Features":
        return self._map(lambda t: t.detach())

    def repeat_interleave(self, n: int) -> "Features":
        return self._map(lambda t: t.repeat_interleave(n, 0))

    @staticmethod
    def cat(items: Sequence["Features"]) -> "Features":
        first = items[0]
        if any(f.family != first.family for f in items):
            raise ValueError("cannot concatenate features of different families")
        return replace(
            first,
            center=torch.cat([f.center for f in items]),
            size=torch.cat([f.size for f in items]),
            angle=torch.cat([f.angle for f in items]),
            intensity=torch.cat([f.intensity for f in items]),
            seed=torch.cat([f.seed for f in items]),
            max_steps=max(f.max_steps for f in items),
        )

    def where(self, cond: Tensor, other: "Features") -> "Features":
        """Per-feature choice: ``self`` where ``cond`` (bool ``(N,)``) is true, else ``other``."""
        c1 = cond.reshape(-1, 1)
        return replace(
            self,
            center=torch.where(c1, self.center, other.center),
            size=torch.where(c1, self.size, other.size),
            angle=torch.where(cond, self.angle, other.angle),
            intensity=torch.where(cond, self.intensity, other.intensity),
            seed=torch.where(cond, self.seed, other.seed),
            max_steps=max(self.max_steps, other.max_steps),
        )

    def moved(self, offset: Tensor, shape: tuple[int, int]) -> "Features":
        """Translated by ``offset`` ``(N, 2)`` pixels, centres kept inside the ``(h, w)`` image."""
        h, w = shape
        c = self.center + offset
        c = torch.stack([c[:, 0].clamp(0, h - 1), c[:, 1].clamp(0, w - 1)], dim=1)
        return replace(self, center=c)

    def with_intensity(self, intensity: Tensor) -> "Features":
        return replace(self, intensity=intensity)

    def as_dict(self) -> dict[str, Tensor]:
        """The parameter tensors by name (for saving); ``family`` and ``max_steps`` are stored beside them."""
        return {
            "center": self.center,
            "size": self.size,
            "angle": self.angle,
            "intensity": self.intensity,
            "seed": self.seed,
        }

    def render(self, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Draw the features on ``shape = (h, w)`` canvases, all at once on the features' device.

        Returns:
            ``(values, support)``: float32 ``(N, 1, h, w)`` non-negative feature images in the image's units, and
            bool ``(N, 1, h, w)`` supports ``S``.
        """
        h, w = int(shape[0]), int(shape[1])
        if len(self) == 0:
            z = torch.zeros(0, 1, h, w, device=self.device)
            return z, z.bool()
        if self.family == "walk":
            return _render_walk(self, h, w)
        return _render_shape(self, h, w)


# The four unit moves of a 4-connected walk: down, up, right, left.
_MOVES = ((1, 0), (-1, 0), (0, 1), (0, -1))
_STREAM_WALK = 101  # one hash per step: bits 0–1 the move, bits 8–31 the pixel's value


def _render_walk(f: Features, h: int, w: int) -> tuple[Tensor, Tensor]:
    """All walks stepped together: cumulative sums of random unit moves, scattered into the canvases.

    Pixel ``j`` (``0 ≤ j < steps``) sits at ``center + Σ_{k<j} move_k``, clipped to the image (clipping is 1-Lipschitz
    per axis, so the walk stays 4-connected). A pixel visited twice keeps the larger value (``amax``: deterministic on
    every device, unlike last-write-wins).
    """
    N, L, dev = len(f), int(f.max_steps), f.device
    moves = torch.tensor(_MOVES, dtype=torch.int64, device=dev)  # (4, 2)
    bits = counter_bits(f.seed, _STREAM_WALK, L)  # (N, L)
    direction = bits & 3
    step = moves[direction]  # (N, L, 2)
    offset = torch.cumsum(step, dim=1) - step  # exclusive cumsum: pixel 0 is the centre
    start = f.center.round().long()  # (N, 2)
    pos = start[:, None, :] + offset
    rows = pos[..., 0].clamp(0, h - 1)
    cols = pos[..., 1].clamp(0, w - 1)
    flat = rows * w + cols  # (N, L)
    steps = f.size[:, 0].round().clamp(1, L).long()
    valid = torch.arange(L, device=dev)[None, :] < steps[:, None]  # (N, L)
    u = (bits >> 8).to(torch.float32) * (1.0 / 16777216.0)
    values = u * f.intensity[:, None] * valid
    canvas = torch.zeros(N, h * w, dtype=torch.float32, device=dev)
    canvas.scatter_reduce_(1, flat, values, reduce="amax", include_self=True)
    support = torch.zeros(N, h * w, dtype=torch.float32, device=dev)
    support.scatter_reduce_(1, flat, valid.to(torch.float32), reduce="amax", include_self=True)
    return canvas.reshape(N, 1, h, w), support.reshape(N, 1, h, w) > 0


def _render_shape(f: Features, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Discs, ellipses, lines and blobs as closed-form functions of pixel coordinates, evaluated for all at once."""
    dev = f.device
    r = torch.arange(h, device=dev, dtype=torch.float32).reshape(1, h, 1)
    c = torch.arange(w, device=dev, dtype=torch.float32).reshape(1, 1, w)
    dr = r - f.center[:, 0].reshape(-1, 1, 1)
    dc = c - f.center[:, 1].reshape(-1, 1, 1)
    cos, sin = torch.cos(f.angle).reshape(-1, 1, 1), torch.sin(f.angle).reshape(-1, 1, 1)
    u = dr * cos + dc * sin  # along the major axis
    v = dc * cos - dr * sin  # across it
    a = f.size[:, 0].reshape(-1, 1, 1).clamp_min(0.5)
    b = f.size[:, 1].reshape(-1, 1, 1).clamp_min(0.5)
    peak = f.intensity.reshape(-1, 1, 1)
    if f.family == "disc":
        inside = dr * dr + dc * dc <= a * a
        values = peak * inside
    elif f.family == "ellipse":
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        values = peak * inside
    elif f.family == "line":
        inside = (u.abs() <= a / 2) & (v.abs() <= b / 2)
        values = peak * inside
    else:  # blob
        q = (u / a) ** 2 + (v / b) ** 2
        inside = q <= 9.0  # 3σ
        values = peak * torch.exp(-0.5 * q) * inside
    return values.unsqueeze(1), inside.unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------
_STREAM_PARAMS, _STREAM_SEED = 11, 15  # params: one draw each of centre, size 0, size 1, angle, intensity


@dataclass(frozen=True)
class FeatureSampler:
    """Draws random features of one family (configure once, call on many images).

    Args:
        family: one of :data:`FAMILIES`.
        size_range: ``((lo0, hi0), (lo1, hi1))`` in pixels; ``None`` → :data:`DEFAULT_SIZES`. For the walk, dimension
            0 is the number of pixels (an integer drawn uniformly in ``[lo0, hi0]``); for the disc, dimension 1
            copies dimension 0.
        intensity_range: ``(lo, hi)`` peak intensity as fractions of each truth's dynamic range (or in the image's
            own units, see ``absolute``); ``None`` → :data:`DEFAULT_INTENSITY`. ``hi`` is also the upper bound that
            searches project onto.
        absolute: ``intensity_range`` is in the image's own units (e.g. HU for CT, where a lesion's contrast is a
            physical quantity) instead of fractions of each image's dynamic range.
    """

    family: str = "walk"
    size_range: tuple[tuple[float, float], tuple[float, float]] | None = None
    intensity_range: tuple[float, float] | None = None
    absolute: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise BlindspotError(None, f"unknown feature family {self.family!r}; choose from {', '.join(FAMILIES)}")
        (lo0, hi0), (lo1, hi1) = self.sizes
        lo, hi = self.intensities
        if not (0 <= lo0 <= hi0 and 0 <= lo1 <= hi1):
            raise BlindspotError(None, f"bad size range {self.sizes} for {self.family}")
        if self.family == "walk" and lo0 < 1:
            raise BlindspotError(None, "a random walk needs at least 1 pixel")
        if not 0 <= lo <= hi:
            raise BlindspotError(None, f"bad intensity range {self.intensities}")

    @property
    def sizes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        s = self.size_range or DEFAULT_SIZES[self.family]
        return (float(s[0][0]), float(s[0][1])), (float(s[1][0]), float(s[1][1]))

    @property
    def intensities(self) -> tuple[float, float]:
        lo, hi = self.intensity_range or DEFAULT_INTENSITY[self.family]
        return float(lo), float(hi)

    def unit(self, dynamic_range: Tensor) -> Tensor:
        """What an intensity of 1 means per image ``(B,)``: the dynamic range, or 1 for absolute intensities."""
        return torch.ones_like(dynamic_range) if self.absolute else dynamic_range

    @property
    def max_steps(self) -> int:
        return int(math.ceil(self.sizes[0][1])) if self.family == "walk" else 1

    @property
    def reach(self) -> int:
        """How far (pixels, Chebyshev distance) the support of any feature this sampler draws can extend from its
        centre (a walk of ``n`` pixels: ``n − 1``; a shape: its largest extent, a blob's 3σ)."""
        (_, hi0), (_, hi1) = self.sizes
        if self.family == "walk":
            extent = max(math.ceil(hi0) - 1, 0)
        elif self.family == "disc":
            extent = hi0
        elif self.family == "line":
            extent = math.hypot(hi0 / 2, max(hi1, 0.5) / 2)
        elif self.family == "blob":
            extent = 3.0 * max(hi0, hi1, 0.5)
        else:  # ellipse
            extent = max(hi0, hi1, 0.5)
        return int(math.ceil(extent)) + (0 if self.family == "walk" else 1)  # +1: a centre between pixels

    def sample(self, keys: Tensor, region_masks: Tensor, dynamic_range: Tensor) -> Features:
        """One feature per key.

        Args:
            keys: int64 ``(B, n)`` candidate keys (see :func:`candidate_keys`).
            region_masks: bool ``(B, h, w)`` allowed centres per image.
            dynamic_range: float ``(B,)`` ``max − min`` of each truth, in the image's units.
        Returns:
            :class:`Features` of length ``B·n``, image-major (image 0's ``n`` candidates first).
        """
        B, n = keys.shape
        flat = keys.reshape(-1)
        u = counter_uniform(flat, _STREAM_PARAMS, 5)  # one hashed draw for all scalar parameters
        center = sample_locations(region_masks, u[:, 0].reshape(B, n)).reshape(B * n, 2)
        (lo0, hi0), (lo1, hi1) = self.sizes
        if self.family == "walk":
            s0 = torch.floor(lo0 + u[:, 1] * (math.floor(hi0) - math.ceil(lo0) + 1)).clamp(lo0, hi0)
            s1 = torch.zeros_like(s0)
        else:
            s0 = lo0 + u[:, 1] * (hi0 - lo0)
            s1 = s0 if self.family == "disc" else lo1 + u[:, 2] * (hi1 - lo1)
        angle = u[:, 3] * math.pi
        lo, hi = self.intensities
        frac = lo + u[:, 4] * (hi - lo)
        intensity = frac * self.unit(dynamic_range).to(frac.dtype).repeat_interleave(n)
        seed = combine_keys(flat, _STREAM_SEED)
        return Features(
            self.family,
            center=center,
            size=torch.stack([s0, s1], dim=1),
            angle=angle,
            intensity=intensity,
            seed=seed,
            max_steps=self.max_steps,
        )


def candidate_keys(image_keys: Tensor, indices: Iterable[int] | Tensor) -> Tensor:
    """Keys of candidates ``indices`` for each image: int64 ``(B, n)`` from image keys ``(B,)``."""
    idx = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices, dtype=torch.int64)
    idx = idx.to(image_keys.device)
    return combine_keys(image_keys[:, None], idx[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Neighbourhood
# ----------------------------------------------------------------------------------------------------------------
def _window_max(x: Tensor, width: int, dim: int) -> Tensor:
    """Running maximum over ``width`` consecutive entries along ``dim`` (the length shrinks by ``width − 1``), by
    doubling windows: ⌈log₂ width⌉ elementwise maxima instead of ``width − 1``."""
    have = 1
    while have < width:
        step = min(have, width - have)
        n = x.shape[dim]
        x = torch.maximum(x.narrow(dim, 0, n - step), x.narrow(dim, step, n - step))
        have += step
    return x


def neighbourhood(support: Tensor, dilation: int) -> Tensor:
    """``T``: the support dilated by ``dilation`` pixels (a square structuring element).

    Args:
        support: bool or float ``(N, 1, h, w)``.
    Returns:
        float32 ``(N, 1, h, w)`` of 0/1.

    The square element is separable and each axis is a running maximum by doubling windows (a few elementwise
    maxima: several times faster than ``max_pool2d`` on CPUs, and equal to it).
    """
    s = support.to(torch.float32)
    d = int(dilation)
    if d <= 0:
        return s
    s = F.pad(s, (d, d, d, d))
    s = _window_max(s, 2 * d + 1, dim=-1)
    return _window_max(s, 2 * d + 1, dim=-2)
