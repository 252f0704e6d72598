"""The parallel-beam projector's CPU kernels (Numba): the same operators as the ``grid_sample`` tiles of
:class:`~blindspot.physics.ct.ParallelBeamProjector`, several times faster on the CPU.

Both operators spread a pixel over the detector with a box footprint: pixel ``(y, x)`` sits at bin coordinate
``τ = D//2 + x cos θ − y sin θ`` (``x``, ``y`` in pixels from the rotation centre) and its box of width ``w`` bins,
centred on ``τ``, overlaps bins ``k`` and ``k + 1`` (``w ≤ 1``; bin ``k`` covers ``[k − ½, k + ½]``) with the
fractions ``a`` and ``1 − a`` of its width.

* ``w = max(|cos θ|, |sin θ|)``: the pixel-driven **projection** (the distance-driven rule) scatters each pixel's
  value into its two bins, ``p[θ, k] += a · μ[y, x]``;
* ``w = 1``: the fractions are linear interpolation's weights, so gathering ``Σ_θ a · q[θ, k] + (1 − a) ·
  q[θ, k + 1]`` at each pixel is the **back-projection** (scikit-image's ``iradon`` before its scaling).

Each operator's gradient is the other direction of the same footprint, so two kernels serve all four: a *gather*
(per pixel, over views) and a *scatter* (per view, over pixels). Both visit views ``θ`` and ``π − θ`` together: the
second puts at pixel ``(−x, y)`` the box the first puts at ``(x, y)`` (``cos(π − θ) = −cos θ``), so one box serves
two views over a column range symmetric about the centre (exact; it halves the per-pixel work, which is most of the
cost for one or two images).

Why compiled loops: on the CPU ``grid_sample`` spends ≈ 2.5 ns per sample and channel on one core (four gathers of
a 2-D bilinear kernel whose second axis is a single row) and writes each view's smear before the sum over views.
Here each pixel's bin and weights are computed once for every channel, the channels (images × doses) are
contiguous, and sums accumulate in place: the gather a block of image rows at a time (their accumulators and the
views' stretches of sinogram stay in cache), the scatter a block of views at a time (one image row is read once for
the block).

Layout: channels last. Sinograms are ``(A, D + 2·PAD, C)`` with zero bins at each end, so a box never reaches past
the array (``D = ⌈√2 · max(H, W)⌉`` keeps every box within half a bin of the detector; checked before a kernel
runs, as compiled code does not check indices). What a projection puts in those bins is dropped, as the
``grid_sample`` kernels drop it. Coordinates are float64; weights and sums are in the data's dtype (float32 or
float64).

Threads: the work is split in contiguous blocks (image rows for the gather, views for the scatter) over
``torch.get_num_threads()`` Python threads running the ``nogil`` kernels, so each output value has one writer and
sums in a fixed order. Every channel is computed alone in that order, so an image's projection and back-projection
are the same bits whatever the thread count and whatever else is in the batch (which makes seeded CT noise
independent of the batch on the CPU). No Numba threading layer is used (GNU OpenMP's is not fork-safe, and
data-loader workers fork). Without Numba (:func:`available` is ``False``) the projector keeps its ``grid_sample``
kernels; the two agree to float precision (``tests/test_ct_physics.py``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch import Tensor

try:  # compiled on first use; the machine code is cached beside this file (or in the user's cache directory)
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; a platform without its wheels falls back
    numba = None

#: Image rows per block of the gather: their accumulators (``rows · W · C`` values) stay in L2, and each view's
#: stretch of sinogram is read once per block instead of once per row.
ROWS_PER_BLOCK = 8
#: Views per block of the scatter: one image row is read once for this many views.
VIEWS_PER_BLOCK = 8
#: Zero bins at each end of the kernels' sinograms: a corner pixel's box may reach half a bin past the detector.
PAD = 2


def available() -> bool:
    """Whether the compiled kernels can run (Numba imports)."""
    return numba is not None


def supports(x: Tensor) -> bool:
    """Whether the kernels take ``x``: a float32 or float64 tensor on the CPU, with Numba available."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and available()


def _jit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(nogil=True, cache=True, **options)``, without the disk cache where there is nowhere to write it
    (Numba refuses ``cache=True`` then): the kernels are compiled in every process instead."""

    def wrap(fn: Callable[..., Any]) -> Any:
        try:
            return numba.njit(nogil=True, cache=True, **options)(fn)
        except RuntimeError:  # pragma: no cover - "cannot cache function …: no locator available"
            return numba.njit(nogil=True, **options)(fn)

    return wrap


if numba is not None:

    @_jit(inline="always")
    def _footprint(t: float, half_width: float, inv_width: float) -> tuple[int, float]:  # pragma: no cover
        """The first bin ``k`` a box ``[t − half_width, t + half_width]`` overlaps (``t − half_width ≥ −½``) and the
        fraction of the box in it."""
        left = t - half_width
        k = int(left + 0.5)  # ≥ 0: floor
        return k, min(k + 0.5 - left, 2.0 * half_width) * inv_width

    @_jit()
    def _gather(q: Any, col: Any, row: Any, half: Any, inv: Any, mirror: Any, out: Any, r0: int, r1: int) -> None:
        """``out[y, x, :] += Σ_v a q[v, k, :] + (1 − a) q[v, k + 1, :]`` for image rows ``r0 … r1−1``; lead view
        ``v``'s box at column ``j`` of the symmetric range is view ``mirror[v]``'s at column ``Wg − 1 − j``."""
        C = q.shape[2]
        W = out.shape[1]
        P, Wg = col.shape
        for b0 in range(r0, r1, ROWS_PER_BLOCK):
            b1 = min(r1, b0 + ROWS_PER_BLOCK)
            for v in range(P):
                m = mirror[v]
                for y in range(b0, b1):
                    base = row[v, y]
                    for j in range(Wg):
                        k, a = _footprint(base + col[v, j], half[v], inv[v])
                        w0 = q.dtype.type(a)  # in the sums' dtype: float32 sums stay float32
                        w1 = q.dtype.type(1.0) - w0
                        jm = Wg - 1 - j
                        if C == 1:  # one image: no channel loop
                            if j < W:
                                out[y, j, 0] += w0 * q[v, k, 0] + w1 * q[v, k + 1, 0]
                            if m >= 0 and jm < W:
                                out[y, jm, 0] += w0 * q[m, k, 0] + w1 * q[m, k + 1, 0]
                            continue
                        if j < W:
                            for c in range(C):
                                out[y, j, c] += w0 * q[v, k, c] + w1 * q[v, k + 1, c]
                        if m >= 0 and jm < W:
                            for c in range(C):
                                out[y, jm, c] += w0 * q[m, k, c] + w1 * q[m, k + 1, c]

    @_jit()
    def _scatter(g: Any, col: Any, row: Any, half: Any, inv: Any, mirror: Any, out: Any, v0: int, v1: int) -> None:
        """``out[v, k, :] += a g[y, x, :]``, ``out[v, k + 1, :] += (1 − a) g[y, x, :]`` over every pixel, for lead
        views ``v0 … v1−1`` and their mirror views: the adjoint of :func:`_gather`."""
        H, W, C = g.shape
        P, Wg = col.shape
        for b0 in range(v0, v1, VIEWS_PER_BLOCK):
            b1 = min(v1, b0 + VIEWS_PER_BLOCK)
            for y in range(H):
                for v in range(b0, b1):
                    m = mirror[v]
                    base = row[v, y]
                    for j in range(Wg):
                        k, a = _footprint(base + col[v, j], half[v], inv[v])
                        w0 = g.dtype.type(a)
                        w1 = g.dtype.type(1.0) - w0
                        jm = Wg - 1 - j
                        if C == 1:  # one image: no channel loop
                            if j < W:
                                out[v, k, 0] += w0 * g[y, j, 0]
                                out[v, k + 1, 0] += w1 * g[y, j, 0]
                            if m >= 0 and jm < W:
                                out[m, k, 0] += w0 * g[y, jm, 0]
                                out[m, k + 1, 0] += w1 * g[y, jm, 0]
                            continue
                        if j < W:
                            for c in range(C):
                                gc = g[y, j, c]
                                out[v, k, c] += w0 * gc
                                out[v, k + 1, c] += w1 * gc
                        if m >= 0 and jm < W:
                            for c in range(C):
                                gc = g[y, jm, c]
                                out[m, k, c] += w0 * gc
                                out[m, k + 1, c] += w1 * gc


def _split(fn: Callable[..., None], n_items: int, *args: Any) -> None:
    """``fn(*args, a, b)`` over contiguous blocks ``[a, b)`` of ``range(n_items)``, one per thread."""
    n = max(1, min(torch.get_num_threads(), n_items))
    bounds = [round(k * n_items / n) for k in range(n + 1)]
    if n == 1:
        fn(*args, 0, n_items)
        return
    with ThreadPoolExecutor(max_workers=n - 1) as pool:  # threads end with the call: nothing to inherit on fork
        futures = [pool.submit(fn, *args, bounds[k], bounds[k + 1]) for k in range(1, n)]
        fn(*args, bounds[0], bounds[1])
        for future in futures:
            future.result()


class Footprint:
    """One box-footprint geometry: views ``(cos θ, sin θ)``, an ``(H, W)`` image, ``n_det`` bins and a box width per
    view; its :meth:`gather` (sinograms → images) and :meth:`scatter` (images → sinograms) are each other's
    adjoints, differentiable through each other.

    Args:
        cos, sin: ``(A,)`` float64 on the CPU.
        image_shape: ``(H, W)``.
        n_det: detector bins ``D``.
        box: ``"pixel"`` for boxes ``max(|cos θ|, |sin θ|)`` bins wide (projection), ``"unit"`` for one bin
            (linear interpolation: back-projection).
    """

    def __init__(self, cos: Tensor, sin: Tensor, image_shape: tuple[int, int], n_det: int, box: str) -> None:
        H, W = int(image_shape[0]), int(image_shape[1])
        self.image_shape, self.n_det, self.n_angles = (H, W), int(n_det), int(cos.shape[0])
        A = self.n_angles
        leads = torch.arange(A // 2 + 1)
        mirror = A - leads
        mirror[(mirror >= A) | (mirror == leads)] = -1  # θ = 0 and (A even) θ = 90° have no mirror view
        cos, sin = cos.to(torch.float64).cpu()[leads], sin.to(torch.float64).cpu()[leads]
        width = torch.maximum(cos.abs(), sin.abs()) if box == "pixel" else torch.ones_like(cos)
        xo = torch.arange(2 * (W // 2) + 1, dtype=torch.float64) - W // 2  # symmetric: −W//2 … W//2
        yo = torch.arange(H, dtype=torch.float64) - H // 2
        col = cos[:, None] * xo  # (A, W)
        row = (n_det // 2 + PAD) - sin[:, None] * yo  # (A, H), in the padded sinogram's bins
        left = torch.stack([row.amin(1) + col.amin(1), row.amax(1) + col.amax(1)]) - width / 2  # boxes' left ends
        if not (left.min() >= -0.5 and left.max() < n_det + 2 * PAD - 1.5):  # bins k, k + 1 inside the array
            raise ValueError(f"{n_det} detector bins do not cover a {H}x{W} image")
        self._args = (*(t.contiguous().numpy() for t in (col, row, width / 2, 1.0 / width)), mirror.numpy())

    @property
    def nbytes(self) -> int:
        """Bytes of the per-view terms kept (about ``A/2 · (H + W + 3)`` values)."""
        return sum(a.nbytes for a in self._args)

    def _gather(self, sinogram: Tensor) -> Tensor:
        A, C, D = sinogram.shape
        H, W = self.image_shape
        q = torch.zeros(A, D + 2 * PAD, C, dtype=sinogram.dtype)
        q[:, PAD : D + PAD] = sinogram.detach().transpose(1, 2)
        out = torch.zeros(H, W, C, dtype=sinogram.dtype)
        _split(_gather, H, q.numpy(), *self._args, out.numpy())
        return out.permute(2, 0, 1).contiguous()

    def _scatter(self, images: Tensor) -> Tensor:
        g = images.detach().permute(1, 2, 0).contiguous()
        out = torch.zeros(self.n_angles, self.n_det + 2 * PAD, images.shape[0], dtype=images.dtype)
        _split(_scatter, len(self._args[-1]), g.numpy(), *self._args, out.numpy())
        return out[:, PAD : self.n_det + PAD].transpose(1, 2).contiguous()  # what fell beyond the detector is lost

    def gather(self, sinogram: Tensor) -> Tensor:
        """``(A, C, D)`` → ``(C, H, W)``: each pixel's boxes' weighted sums over views."""
        return _Apply.apply(sinogram, self, "gather")

    def scatter(self, images: Tensor) -> Tensor:
        """``(C, H, W)`` → ``(A, C, D)``: each pixel's value spread over its box in every view."""
        return _Apply.apply(images, self, "scatter")


class _Apply(torch.autograd.Function):
    """One direction of a :class:`Footprint`; its gradient is the other direction."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, footprint: Footprint, direction: str) -> Tensor:
        ctx.footprint, ctx.direction = footprint, direction
        return footprint._gather(x) if direction == "gather" else footprint._scatter(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        other = "scatter" if ctx.direction == "gather" else "gather"
        return _Apply.apply(grad, ctx.footprint, other), None, None
