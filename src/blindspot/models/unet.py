"""The fastMRI baseline U-Net, with a ``state_dict`` layout identical to ``fastmri.models.Unet``.

Architecture (Ronneberger et al. 2015 as configured by the fastMRI baseline):

* ``num_pool_layers`` encoder blocks; each block is two rounds of 3×3 convolution (no bias) → instance norm
  (no affine parameters) → LeakyReLU(0.2) → channel dropout, followed by 2×2 average pooling. The first block has
  ``chans`` output channels and each further block doubles them.
* a bottleneck block with ``chans · 2^num_pool_layers`` channels;
* ``num_pool_layers`` decoder stages: 2×2 stride-2 transpose convolution (no bias) → instance norm → LeakyReLU(0.2),
  concatenation with the encoder's skip, a conv block; the last stage ends with a 1×1 convolution (with bias) to
  ``out_chans``.

Parameter names therefore are ``down_sample_layers.{i}.layers.{0,4}.weight``, ``conv.layers.{0,4}.weight``,
``up_transpose_conv.{i}.layers.0.weight``, ``up_conv.{i}.layers.{0,4}.weight`` and, for the last decoder stage,
``up_conv.{n-1}.0.layers.{0,4}.weight`` and ``up_conv.{n-1}.1.{weight,bias}`` — exactly fastMRI's, so a state dict
trained with fastMRI loads with ``strict=True``.

Any input size works: the input is reflect-padded (symmetrically) to a multiple of ``2**num_pool_layers`` and the
output cropped back. For sizes that already are multiples (e.g. fastMRI's 320×320 crop) no padding happens and the
output equals fastMRI's exactly; for other sizes fastMRI pads one pixel after each up-sampling instead, so outputs
differ near the border. :func:`unet_hparams` reads the constructor arguments off a bare state dict.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blindspot.errors import BlindspotError
from blindspot.models.registry import register_model


class InstanceNorm2d(nn.InstanceNorm2d):
    """Instance norm without affine parameters or running statistics (fastMRI's ``nn.InstanceNorm2d(chans)``),
    computed as a group norm with one group per channel: the same normalisation (per image and channel, biased
    variance, ``eps`` inside the root; outputs equal to float rounding). On the CPU (one thread) the norm alone is
    2.5–3.4× faster than ``F.instance_norm``'s batch-norm path without gradients and ≈ 1.3× with its backward; a
    whole U-Net 1.16× (forward) and 1.15× (training step) at 96² with 16 channels, 1.03× and 1.18× at 320² with 32
    (``benchmarks/instance_norm.py``). No parameters or buffers, so state dicts keep fastMRI's layout.

    Shapes: ``(B, num_features, H, W)`` → the same.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps, affine=False, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_features, eps=self.eps)


class ConvBlock(nn.Module):
    """Two rounds of 3×3 conv (no bias) → InstanceNorm → LeakyReLU(0.2) → Dropout2d.

    Shapes: ``(B, in_chans, H, W)`` → ``(B, out_chans, H, W)``. Sub-module indices 0 and 4 hold the weights.
    """

    def __init__(self, in_chans: int, out_chans: int, drop_prob: float) -> None:
        super().__init__()
        self.in_chans, self.out_chans, self.drop_prob = in_chans, out_chans, drop_prob
        layers: list[nn.Module] = []
        for c_in in (in_chans, out_chans):
            layers += [
                nn.Conv2d(c_in, out_chans, kernel_size=3, padding=1, bias=False),
                InstanceNorm2d(out_chans),
                nn.LeakyReLU(negative_slope=0.2, inplace=True),
                nn.Dropout2d(drop_prob),
            ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TransposeConvBlock(nn.Module):
    """2×2 stride-2 transpose conv (no bias) → InstanceNorm → LeakyReLU(0.2).

    Shapes: ``(B, in_chans, H, W)`` → ``(B, out_chans, 2H, 2W)``.
    """

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.in_chans, self.out_chans = in_chans, out_chans
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_chans, out_chans, kernel_size=2, stride=2, bias=False),
            InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


@register_model("unet", modality="mri")
class Unet(nn.Module):
    """fastMRI's baseline U-Net.

    Args:
        in_chans: input channels (1 for a magnitude image).
        out_chans: output channels (1).
        chans: channels of the first block (fastMRI: 32; the demo model uses fewer).
        num_pool_layers: number of down-/up-sampling stages (fastMRI: 4).
        drop_prob: channel-dropout probability (fastMRI: 0.0).

    ``forward(x)``: normalised zero-filled input ``(B, in_chans, H, W)`` → normalised reconstruction
    ``(B, out_chans, H, W)``; any ``H, W`` (see the module docs).
    """

    uses_mask = False

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 1,
        chans: int = 32,
        num_pool_layers: int = 4,
        drop_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if min(in_chans, out_chans, chans, num_pool_layers) < 1:
            raise TypeError("in_chans, out_chans, chans and num_pool_layers must all be >= 1")
        if not 0.0 <= drop_prob < 1.0:
            raise TypeError(f"drop_prob must lie in [0, 1), got {drop_prob}")
        self.in_chans, self.out_chans, self.chans = in_chans, out_chans, chans
        self.num_pool_layers, self.drop_prob = num_pool_layers, drop_prob

        widths = [chans * 2**i for i in range(num_pool_layers)]  # encoder outputs, shallow → deep
        self.down_sample_layers = nn.ModuleList(
            ConvBlock(c_in, c_out, drop_prob) for c_in, c_out in zip([in_chans] + widths[:-1], widths)
        )
        self.conv = ConvBlock(widths[-1], widths[-1] * 2, drop_prob)
        self.up_transpose_conv = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for depth, width in enumerate(reversed(widths)):
            self.up_transpose_conv.append(TransposeConvBlock(width * 2, width))
            block = ConvBlock(width * 2, width, drop_prob)
            if depth == num_pool_layers - 1:  # the last stage carries the 1×1 output convolution
                block = nn.Sequential(block, nn.Conv2d(width, out_chans, kernel_size=1))
            self.up_conv.append(block)

    @property
    def size_multiple(self) -> int:
        """Inputs are padded internally to a multiple of this many pixels."""
        return 2**self.num_pool_layers

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W)`` → ``(B, out_chans, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"U-Net expects (B, {self.in_chans}, H, W) input, got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        m = self.size_multiple
        pad_h, pad_w = (-H) % m, (-W) % m
        pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        if pad_h or pad_w:
            mode = "reflect" if pad_h < H and pad_w < W else "replicate"
            x = F.pad(x, pad, mode=mode)

        skips = []
        out = x
        for block in self.down_sample_layers:
            out = block(out)
            skips.append(out)
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        out = self.conv(out)
        for up, block in zip(self.up_transpose_conv, self.up_conv):
            out = block(torch.cat([up(out), skips.pop()], dim=1))

        if pad_h or pad_w:
            out = out[..., pad[2] : pad[2] + H, pad[0] : pad[0] + W]
        return out


def unet_hparams(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Any]:
    """The constructor arguments of the :class:`Unet` a state dict was saved from, read off its keys and shapes.

    ``in_chans`` / ``chans`` are the input / output channels of the first convolution
    (``down_sample_layers.0.layers.0.weight``, ``(chans, in_chans, 3, 3)``), ``num_pool_layers`` the number of
    encoder blocks and ``out_chans`` the output channels of the final 1×1 convolution. ``drop_prob`` leaves no trace
    in the weights and is not returned (its default is fastMRI's 0).

    Args:
        state_dict: the weights (keys as :class:`Unet` names them, after ``prefix``).
        prefix: the U-Net's key prefix inside a larger model (e.g. ``"cascades.0.model.unet."``).
    Raises:
        BlindspotError: the keys are not a U-Net's (a one-line message naming the missing key).
    """
    first = state_dict.get(f"{prefix}down_sample_layers.0.layers.0.weight")
    if first is None or getattr(first, "ndim", 0) != 4:
        raise BlindspotError(None, f"not a fastMRI U-Net state dict: no 4-D "
                                   f"{prefix}down_sample_layers.0.layers.0.weight")
    pattern = re.compile(re.escape(prefix) + r"down_sample_layers\.(\d+)\.layers\.0\.weight")
    pools = 1 + max(int(m.group(1)) for m in map(pattern.fullmatch, state_dict) if m)
    last = state_dict.get(f"{prefix}up_conv.{pools - 1}.1.weight")
    if last is None or getattr(last, "ndim", 0) != 4:
        raise BlindspotError(None, f"not a fastMRI U-Net state dict: no 4-D {prefix}up_conv.{pools - 1}.1.weight")
    return {"in_chans": int(first.shape[1]), "out_chans": int(last.shape[0]), "chans": int(first.shape[0]),
            "num_pool_layers": pools}
