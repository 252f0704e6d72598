"""Gaussian + RI: a denoiser with a known, rectangular invariance (the source document's validation model).

A Gaussian filter (σ = 1 pixel) whose output is set to exactly zero inside the central ``square × square`` pixels.
Whatever the input does inside that square, the output there does not change; outside it the filter is injective
enough that an invariance search must find nothing. An invariance attack run on this model must therefore put its
changes inside the square and nowhere else.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from blindspot.models.registry import register_model


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """Normalised 1-D Gaussian of radius ``ceil(truncate · σ)`` (SciPy's ``gaussian_filter`` support), float64."""
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def central_square(height: int, width: int, square: int) -> tuple[slice, slice]:
    """Rows and columns of the central ``square × square`` block: offset ``(H − square) // 2`` (clipped to the image)."""
    top, left = max(0, (height - square) // 2), max(0, (width - square) // 2)
    return slice(top, min(height, top + square)), slice(left, min(width, left + square))


@register_model("gaussian-ri", modality="ct")
class GaussianRI(nn.Module):
    """Gaussian filter with a rectangular invariance: ``(B, C, H, W)`` → ``(B, C, H, W)``.

    Args:
        sigma: Gaussian standard deviation in pixels (1.0 in the source document).
        square: side of the central square (pixels) whose output is exactly zero, at any image size (30).
        truncate: kernel radius in standard deviations (SciPy's default 4).

    The filter is separable and reflect-padded (SciPy's ``mode="reflect"`` border: the edge pixel is repeated).
    It has no trainable parameters and needs no checkpoint (``build_model("gaussian-ri")``).
    """

    def __init__(self, sigma: float = 1.0, square: int = 30, truncate: float = 4.0) -> None:
        super().__init__()
        if not (sigma > 0 and square >= 0):
            raise ValueError(f"GaussianRI needs sigma > 0 and square >= 0, got {sigma}, {square}")
        self.sigma, self.square, self.truncate = float(sigma), int(square), float(truncate)
        self.register_buffer("kernel", gaussian_kernel1d(self.sigma, self.truncate), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        k = self.kernel.to(x.dtype)
        r = k.numel() // 2
        flat = x.reshape(B * C, 1, H, W)
        # SciPy "reflect" = torch "replicate"-then-mirror (d c b a | a b c d); torch's "reflect" skips the edge pixel
        flat = _symmetric_pad(flat, r)
        flat = _taps(_taps(flat, k, -1, W), k, -2, H)
        out = flat.reshape(B, C, H, W)
        rows, cols = central_square(H, W, self.square)
        mask = torch.ones(H, W, dtype=x.dtype, device=x.device)
        mask[rows, cols] = 0.0
        return out * mask

    def invariant_mask(self, height: int, width: int) -> Tensor:
        """Boolean ``(H, W)`` mask of the pixels whose output is always zero."""
        m = torch.zeros(height, width, dtype=torch.bool)
        rows, cols = central_square(height, width, self.square)
        m[rows, cols] = True
        return m


def _taps(x: Tensor, k: Tensor, dim: int, n: int) -> Tensor:
    """Valid 1-D correlation of ``x`` (padded by ``len(k) // 2`` on ``dim``) with ``k``, as a sum of shifted slices:
    ``n`` outputs along ``dim``. On a CPU this scales with the batch where a one-channel ``conv2d``'s backward does not."""
    out = k[0] * x.narrow(dim, 0, n)
    for j in range(1, k.numel()):
        out = out + k[j] * x.narrow(dim, j, n)
    return out


def _symmetric_pad(x: Tensor, r: int) -> Tensor:
    """Pad the last two axes by ``r`` with the half-sample symmetric rule (edge repeated), any ``r`` vs size."""
    H, W = x.shape[-2:]
    rows = _symmetric_index(H, r, x.device)
    cols = _symmetric_index(W, r, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _symmetric_index(n: int, r: int, device: torch.device) -> Tensor:
    i = torch.arange(-r, n + r, device=device)
    period = 2 * n
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - 1 - i, i)
