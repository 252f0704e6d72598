"""Image distances for invariance reconstruction (DESIGN.md §1.3), each bounded to ``[0, 1]``.

The invariance objective ``‖f(x) − f(x_inv)‖ − α·D(x, x_inv)`` rewards a large ``D``; an unbounded ``D`` would let
the reward run away, so every distance here is bounded above by 1, as in the source document:

* :class:`BoundedMSE` — ``min(mean((a − b)²), 1)`` per image (the seed's "MSE bounded by +1"). Past the bound its
  gradient is zero, so the optimisation stops growing the change and only keeps the output fixed.
* :class:`BoundedRMS` — ``min(RMS(a − b), 1)``: the un-squared norm, whose gradient does not vanish at ``a = b``
  (the natural-invariance generator's default reward, since it starts at ``g(z|x) = x``).
* :class:`SSIMDistance` — structural dissimilarity ``(1 − SSIM)/2`` with the differentiable
  :func:`blindspot.metrics.ssim` (scikit-image's definition), in ``[0, 1]``.
* :class:`VGGPerceptual` — a perceptual distance on ImageNet-pretrained VGG16 features (torchvision layer layout,
  weights from a local file via :mod:`blindspot.models.vgg`): the squared distance of channel-normalised features,
  averaged over space and over the layers ``relu1_2 … relu5_3`` and divided by 4, so it lies in ``[0, 1]``
  (LPIPS's form with equal layer weights instead of learned ones).

Every distance is called as ``distance(pred, ref)`` with two ``(B, 1, H, W)`` tensors in the same (normalised) units
and returns ``(B,)``. ``ref`` is the fixed reference (the clean image ``x`` or the clean output ``f(x)``): the
SSIM data range and the VGG intensity scaling are taken from it, detached, so they do not move during optimisation.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blindspot.errors import BlindspotError, PathLike
from blindspot.metrics import ssim

DISTANCES: tuple[str, ...] = ("mse", "ssim", "vgg", "rms")

#: Indices in torchvision's ``vgg16().features`` of the ReLUs after the last convolution of each block.
VGG16_LAYERS: dict[str, int] = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}


def _check_pair(pred: Tensor, ref: Tensor) -> None:
    if pred.ndim != 4 or pred.shape != ref.shape:
        raise ValueError(f"distances need two (B, C, H, W) tensors of one shape, got {tuple(pred.shape)} and {tuple(ref.shape)}")


def _ref_range(ref: Tensor, floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-image minimum and range ``(B, 1, 1, 1)`` of ``ref``, detached; the range is at least ``floor``."""
    flat = ref.detach().reshape(ref.shape[0], -1)
    lo = flat.amin(dim=1).reshape(-1, 1, 1, 1)
    hi = flat.amax(dim=1).reshape(-1, 1, 1, 1)
    return lo, (hi - lo).clamp_min(floor)


class Distance(nn.Module):
    """Base class: ``forward(pred, ref) -> (B,)``, values in ``[0, 1]``; ``name`` is the CLI spelling."""

    name: str = ""

    def forward(self, pred: Tensor, ref: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class BoundedMSE(Distance):
    """``min(mean((pred − ref)²), bound)`` per image, ``(B,)``.

    Args:
        bound: the upper bound (the seed's 1, in normalised units).
    """

    name = "mse"

    def __init__(self, bound: float = 1.0) -> None:
        super().__init__()
        self.bound = float(bound)

    def forward(self, pred: Tensor, ref: Tensor) -> Tensor:
        _check_pair(pred, ref)
        mse = (pred - ref).square().mean(dim=(1, 2, 3))
        return mse.clamp(max=self.bound)


class BoundedRMS(Distance):
    """``min(sqrt(mean((pred − ref)²)), bound)`` per image, ``(B,)``: the norm ``‖·‖`` itself (not squared).

    Unlike :class:`BoundedMSE` its gradient does not vanish as ``pred → ref`` (it has unit size whatever the
    change's size), so a reward ``α·RMS`` can move a generator that starts at ``g(z|x) = x``. A small ``eps``
    inside the root keeps the gradient finite at exactly zero.
    """

    name = "rms"

    def __init__(self, bound: float = 1.0, eps: float = 1e-12) -> None:
        super().__init__()
        self.bound, self.eps = float(bound), float(eps)

    def forward(self, pred: Tensor, ref: Tensor) -> Tensor:
        _check_pair(pred, ref)
        return ((pred - ref).square().mean(dim=(1, 2, 3)) + self.eps).sqrt().clamp(max=self.bound)


class SSIMDistance(Distance):
    """Structural dissimilarity ``(1 − SSIM(pred, ref))/2`` per image, ``(B,)``, in ``[0, 1]``.

    Args:
        data_range: SSIM's dynamic range; ``None`` takes each reference image's ``max − min`` (detached).
        win_size: side of the uniform SSIM window (images must be at least this large).
    """

    name = "ssim"

    def __init__(self, data_range: float | None = None, win_size: int = 7) -> None:
        super().__init__()
        self.data_range = data_range
        self.win_size = int(win_size)

    def forward(self, pred: Tensor, ref: Tensor) -> Tensor:
        _check_pair(pred, ref)
        rng = self.data_range if self.data_range is not None else _ref_range(ref)[1].reshape(-1)
        return (1.0 - ssim(pred, ref, rng, win_size=self.win_size)) / 2.0


class VGGPerceptual(Distance):
    """Perceptual distance on VGG16 features, per image ``(B,)``, in ``[0, 1]``.

    Both images are mapped to ``[0, 1]`` with the reference's per-image minimum and range (a fixed affine map, so
    gradients pass unchanged), repeated to three channels, ImageNet-normalised and fed through VGG16's
    convolutional part. At each layer of ``layers`` the features are normalised to unit length over channels
    and ``‖φ̂(pred) − φ̂(ref)‖² / 4`` is averaged over positions; the result is the mean over layers.

    Args:
        features: a :class:`blindspot.models.vgg.VGG16Features` (or torchvision-layout ``vgg16().features``, an
            ``nn.Sequential``) with loaded weights; it is frozen.
        layers: layer names from :data:`VGG16_LAYERS`.
        weights_info: where the weights came from (reported in run summaries: ImageNet or not).
    """

    name = "vgg"

    def __init__(self, features: nn.Module, layers: Sequence[str] = tuple(VGG16_LAYERS),
                 weights_info: dict | None = None) -> None:
        super().__init__()
        unknown = [n for n in layers if n not in VGG16_LAYERS]
        if unknown or not layers:
            raise BlindspotError(None, f"unknown VGG16 layers {unknown}; choose from {list(VGG16_LAYERS)}")
        self.taps = sorted(VGG16_LAYERS[n] for n in layers)
        self.weights_info = dict(weights_info or {})
        seq = features.features if isinstance(getattr(features, "features", None), nn.Sequential) else features
        modules = list(seq.children())
        if len(modules) <= self.taps[-1]:
            raise BlindspotError(None, f"VGG feature extractor has {len(modules)} layers, need {self.taps[-1] + 1}")
        self.features = nn.Sequential(*modules[: self.taps[-1] + 1]).eval()
        for p in self.features.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "VGGPerceptual":  # the extractor always stays in eval mode
        super().train(mode)
        self.features.eval()
        return self

    def _feats(self, img01: Tensor) -> list[Tensor]:
        from blindspot.models.vgg import imagenet_input

        h = imagenet_input(img01)
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out

    def _ref_feats(self, ref: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Scaling and normalised features of the reference, cached while the same unchanged tensor comes back
        (the optimisation passes one fixed reference every iteration; the cache holds it, so identity is safe)."""
        cached = getattr(self, "_cache", None)
        if cached is not None and cached[0] is ref and cached[1] == ref._version:
            return cached[2], cached[3], cached[4]
        lo, rng = _ref_range(ref)
        with torch.no_grad():
            feats = [F.normalize(f, dim=1, eps=1e-10) for f in self._feats((ref - lo) / rng)]
        if not ref.requires_grad:
            self._cache = (ref, ref._version, lo, rng, feats)
        return lo, rng, feats

    def forward(self, pred: Tensor, ref: Tensor) -> Tensor:
        _check_pair(pred, ref)
        if pred.shape[1] != 1:
            raise ValueError("the VGG distance takes single-channel images")
        if ref.requires_grad:  # both sides differentiable: one pass for both
            lo, rng = _ref_range(ref)
            feats = self._feats(torch.cat([(pred - lo) / rng, (ref - lo) / rng], dim=0))
            pairs = [F.normalize(f, dim=1, eps=1e-10).chunk(2, dim=0) for f in feats]
        else:
            lo, rng, ref_feats = self._ref_feats(ref)
            feats = self._feats((pred - lo) / rng)
            pairs = [(F.normalize(f, dim=1, eps=1e-10), r) for f, r in zip(feats, ref_feats)]
        total = pred.new_zeros(pred.shape[0])
        for a, b in pairs:
            total = total + (a - b).square().sum(dim=1).mean(dim=(1, 2)) / 4.0
        return total / len(pairs)


def build_distance(
    name: str,
    *,
    vgg_weights: PathLike | None = None,
    vgg_features: nn.Module | None = None,
    device: torch.device | str | None = None,
) -> Distance:
    """A distance by its CLI name (``"mse"``, ``"ssim"``, ``"vgg"`` or ``"rms"``).

    For ``"vgg"``, pass ``vgg_features`` (an already built extractor) or ``vgg_weights`` (a torchvision-format
    VGG16 state dict on disk, loaded by :func:`blindspot.models.vgg.load_vgg16`); without either the standard torch
    hub cache is tried and, failing that, a :class:`BlindspotError` says how to supply weights — nothing is
    downloaded.
    """
    if name == "mse":
        dist: Distance = BoundedMSE()
    elif name == "rms":
        dist = BoundedRMS()
    elif name == "ssim":
        dist = SSIMDistance()
    elif name == "vgg":
        info: dict = {}
        if vgg_features is None:
            from blindspot.models.vgg import load_vgg16

            vgg_features, weights = load_vgg16(vgg_weights)
            info = weights.as_dict()
        dist = VGGPerceptual(vgg_features, weights_info=info)
    else:
        raise BlindspotError(None, f"unknown distance {name!r}; choose from {', '.join(DISTANCES)}")
    return dist.to(device) if device is not None else dist
