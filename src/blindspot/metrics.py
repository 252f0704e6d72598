"""Image-quality metrics as fastMRI evaluates them, and the statistics used to report them.

* :func:`ssim` — batched, differentiable torch SSIM that matches ``skimage.metrics.structural_similarity`` with its
  defaults (7×7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance, mean over the window-valid interior).
* :func:`nmse`, :func:`psnr` — per image; :class:`VolumeMetrics` turns per-slice sums into fastMRI's per-volume
  figures (data range = the volume's maximum, NMSE and PSNR over all the volume's pixels, SSIM averaged over slices).
* :func:`mean_std` and :func:`wilson_interval` — the aggregates reported in tables.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from blindspot.errors import BlindspotError


#: The seed's Table 1 metrics, in column order (fastMRI's definitions).
TABLE1_METRICS: tuple[str, ...] = ("ssim", "nmse", "psnr")

def _as_batch_range(data_range: Tensor | float, like: Tensor) -> Tensor:
    r = torch.as_tensor(data_range, dtype=like.dtype, device=like.device)
    check_data_range(r)
    return r.reshape(-1, 1, 1, 1) if r.ndim > 0 else r.reshape(1, 1, 1, 1)


def check_data_range(data_range: Tensor | float, source: str | None = None) -> None:
    """Raise :class:`BlindspotError` when a data range is not finite and positive: SSIM and PSNR of an all-zero
    image (range 0) are undefined, not 1.0 and hundreds of dB. One device sync."""
    r = torch.as_tensor(data_range)
    if not bool((torch.isfinite(r) & (r > 0)).all()):
        raise BlindspotError(source, f"image data range {r.min().item() if r.numel() else r} is not positive and "
                             "finite (an all-zero or constant image?): SSIM and PSNR are undefined")


def _valid_windows(mask: Tensor, win_size: int) -> Tensor:
    """``(B, 1, H−w+1, W−w+1)`` float: 1 where the ``win_size`` window lies wholly inside ``mask`` ``(B, 1, H, W)``."""
    m = F.avg_pool2d(mask.to(torch.float32), win_size, 1)
    return (m > 1 - 0.5 / (win_size * win_size)).to(torch.float32)


def ssim_map(
    pred: Tensor,
    target: Tensor,
    data_range: Tensor | float,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Local SSIM over the window-valid interior.

    Args:
        pred, target: ``(B, C, H, W)`` real images (``H, W >= win_size``).
        data_range: scalar or ``(B,)`` dynamic range (fastMRI: the volume's maximum).
    Returns:
        ``(B, C, H - win_size + 1, W - win_size + 1)`` SSIM values (scikit-image's map with its border cropped).
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if min(pred.shape[-2:]) < win_size:
        raise ValueError(f"images of {tuple(pred.shape[-2:])} are smaller than the {win_size}x{win_size} window")
    # the five local means (scikit-image's uniform window) in one pooling call
    means = F.avg_pool2d(torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1), win_size, 1)
    ux, uy, uxx, uyy, uxy = means.chunk(5, dim=1)
    np_ = win_size * win_size
    cov_norm = np_ / (np_ - 1)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    r = _as_batch_range(data_range, pred)
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    num = (2 * ux * uy + c1) * (2 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return num / den


def ssim(
    pred: Tensor,
    target: Tensor,
    data_range: Tensor | float,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean SSIM per image, ``(B,)``; see :func:`ssim_map`. Differentiable, so ``1 − ssim`` is a loss.

    ``mask`` (bool ``(B, 1, H, W)``, e.g. a CT field of view) restricts the mean to windows wholly inside it; an
    image with no such window is a :class:`BlindspotError`. A data range that is not positive is one too.
    """
    smap = ssim_map(pred, target, data_range, win_size, k1, k2)
    if mask is None:
        return smap.mean(dim=(1, 2, 3))
    valid = _valid_windows(mask.to(pred.device), win_size)
    count = valid.sum(dim=(1, 2, 3))
    if not bool((count > 0).all()):
        raise BlindspotError(None, f"no {win_size}x{win_size} SSIM window lies wholly inside the field of view")
    return (smap * valid).sum(dim=(1, 2, 3)) / (count * smap.shape[1])


def _masked_sum(v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    dims = tuple(range(1, v.ndim))
    if mask is None:
        return v.sum(dims), torch.full((v.shape[0],), v[0].numel(), dtype=v.dtype, device=v.device)
    m = mask.to(v.dtype).expand_as(v)
    return (v * m).sum(dims), m.sum(dims)


def nmse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Normalised MSE per image ``‖target − pred‖² / ‖target‖²``, ``(B,)`` for ``(B, ...)`` inputs (over ``mask``'s
    pixels when given). An all-zero target has no NMSE: :class:`BlindspotError`."""
    err, _ = _masked_sum((target - pred) ** 2, mask)
    energy, _ = _masked_sum(target**2, mask)
    if not bool((energy > 0).all()):
        raise BlindspotError(None, "the target image is all zero: its NMSE is undefined")
    return err / energy


def psnr(pred: Tensor, target: Tensor, data_range: Tensor | float, mask: Tensor | None = None) -> Tensor:
    """PSNR in dB per image, ``10 log10(R² / MSE)``, ``(B,)`` (MSE over ``mask``'s pixels when given); ``+inf`` for
    a perfect prediction. A data range that is not positive is a :class:`BlindspotError`."""
    err, n = _masked_sum((target - pred) ** 2, mask)
    mse = err / n.clamp_min(1)
    r = torch.as_tensor(data_range, dtype=pred.dtype, device=pred.device).reshape(-1)
    check_data_range(r)
    return 10 * torch.log10(r**2 / mse)


def ct_slice_metrics(pred_hu: Tensor, full_hu: Tensor, window, field: Tensor | None = None) -> dict[str, Tensor]:
    """CT Table 1 per image: RMSE (HU) and PSNR / SSIM of the display-windowed images (data range 1), each ``(B,)``.

    Args:
        pred_hu, full_hu: ``(B, 1, H, W)`` HU.
        window: a display window with ``apply(hu) -> [0, 1]`` (:class:`blindspot.physics.ct.Window`).
        field: the field of view, bool ``(B, 1, H, W)`` (``True`` = image) or ``None``; pixels outside it (scanner
            padding) are left out of all three figures (SSIM: windows wholly inside it).
    """
    err, n = _masked_sum((pred_hu - full_hu) ** 2, field)
    rmse = (err / n.clamp_min(1)).sqrt()
    a, b = window.apply(pred_hu), window.apply(full_hu)
    return {"rmse_hu": rmse, "psnr": psnr(a, b, 1.0, mask=field), "ssim": ssim(a, b, 1.0, mask=field)}


@dataclass
class _VolumeSums:
    sse: float = 0.0
    energy: float = 0.0
    pixels: int = 0
    ssim_sum: float = 0.0
    slices: int = 0
    max_value: float = 0.0


@dataclass
class VolumeMetrics:
    """Accumulates per-slice results into fastMRI's per-volume SSIM, NMSE and PSNR.

    ``update`` takes a batch of slices with their volume names and the volume's maximum (fastMRI's data range);
    ``rows`` returns one dict per slice (for per-slice CSVs), ``volumes`` one per volume. State is plain Python, so
    distributed runs gather ``rows`` from every rank and rebuild with :meth:`from_rows`.
    """

    slice_rows: list[dict] = field(default_factory=list)

    def update(self, pred: Tensor, target: Tensor, fnames: Sequence[str], slice_nums: Sequence[int], max_values: Tensor) -> None:
        """Args: pred, target ``(B, 1, H, W)`` in the same (un-normalised) units; max_values ``(B,)``."""
        pred, target = pred.detach().float(), target.detach().float()
        max_values = torch.as_tensor(max_values, dtype=torch.float32, device=pred.device).reshape(-1)
        dims = tuple(range(1, pred.ndim))
        sse = ((target - pred) ** 2).sum(dims)
        energy = (target**2).sum(dims)
        ok = torch.isfinite(max_values) & (max_values > 0) & (energy > 0)
        if not bool(ok.all()):  # an all-zero target: SSIM / NMSE / PSNR undefined, never 1.0 / 0 / 256 dB
            i = int((~ok).nonzero()[0, 0]) if ok.numel() > 1 else 0
            raise BlindspotError(str(fnames[i]), f"slice {int(slice_nums[i])}: the target image is all zero (volume "
                                 f"maximum {float(max_values[i % max_values.numel()]):g}); its metrics are undefined")
        s = ssim(pred, target, max_values)
        pixels = pred[0].numel()
        for i, (f, n) in enumerate(zip(fnames, slice_nums)):
            self.slice_rows.append(
                {
                    "fname": str(f), "slice": int(n), "ssim": float(s[i]), "sse": float(sse[i]),
                    "energy": float(energy[i]), "pixels": int(pixels), "max_value": float(max_values[i]),
                    "nmse": float(sse[i] / energy[i]),
                    "psnr": float(10 * math.log10(float(max_values[i]) ** 2 / max(float(sse[i]) / pixels, 1e-30))),
                }
            )

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> "VolumeMetrics":
        """Rebuild from rows (e.g. gathered from all ranks); duplicate (fname, slice) rows are kept once."""
        seen: dict[tuple[str, int], dict] = {}
        for row in rows:
            seen.setdefault((row["fname"], row["slice"]), row)
        return cls(list(seen.values()))

    def volumes(self) -> list[dict]:
        """One row per volume: ``fname, slices, ssim, nmse, psnr``."""
        sums: OrderedDict[str, _VolumeSums] = OrderedDict()
        for row in self.slice_rows:
            v = sums.setdefault(row["fname"], _VolumeSums())
            v.sse += row["sse"]
            v.energy += row["energy"]
            v.pixels += row["pixels"]
            v.ssim_sum += row["ssim"]
            v.slices += 1
            v.max_value = max(v.max_value, row["max_value"])
        out = []
        for fname, v in sums.items():
            mse = v.sse / max(v.pixels, 1)
            out.append(
                {
                    "fname": fname,
                    "slices": v.slices,
                    "ssim": v.ssim_sum / v.slices,
                    "nmse": v.sse / v.energy if v.energy > 0 else float("nan"),
                    "psnr": 10 * math.log10(v.max_value**2 / mse) if mse > 0 else float("inf"),
                }
            )
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """``{"ssim": {"mean", "std", "n"}, "nmse": …, "psnr": …}`` over volumes, plus per-slice ``*_slice`` entries."""
        vols = self.volumes()
        out: dict[str, dict[str, float]] = {}
        for key in ("ssim", "nmse", "psnr"):
            m, s = mean_std([v[key] for v in vols])
            out[key] = {"mean": m, "std": s, "n": len(vols)}
            m, s = mean_std([r[key] for r in self.slice_rows])
            out[f"{key}_slice"] = {"mean": m, "std": s, "n": len(self.slice_rows)}
        return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (NumPy's default, as fastMRI reports); NaN for an empty list."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for ``z = 1.96``); ``(nan, nan)`` when ``n == 0``."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
