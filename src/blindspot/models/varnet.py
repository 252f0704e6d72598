"""The end-to-end variational network (E2E-VarNet, Sriram et al., MICCAI 2020), compatible with fastMRI's ``VarNet``.

Same constructor arguments (``num_cascades, sens_chans, sens_pools, chans, pools, mask_center``), calling convention
and ``state_dict`` layout as ``fastmri.models.VarNet`` (fastMRI ≥ 0.2, the version with ``mask_center``), so weights
trained with fastMRI load with ``strict=True`` and give the same output:

* ``sens_net`` (:class:`SensitivityModel`): keeps the auto-calibration columns of the masked k-space
  (``mask_center``), transforms each coil to the image domain, refines every coil image with a :class:`NormUnet`
  (the coils folded into the batch) and divides by the root-sum-of-squares over coils, so ``Σ_c |S_c|² = 1``.
* ``cascades`` (:class:`VarNetBlock` × ``num_cascades``): ``k ← k − λ · M ⊙ (k − k₀) − F(S · R(Σ_c S̄_c F⁻¹ k_c))``
  with the learned soft data-consistency weight ``λ`` (``dc_weight``, initialised to 1), the measured columns
  ``M``, the masked k-space ``k₀`` and a :class:`NormUnet` regulariser ``R`` on the coil-combined image.
* the output is the RSS over coils of ``|F⁻¹ k|``: ``(B, H, W)`` in the k-space's units.

Parameter names: ``sens_net.norm_unet.unet.<U-Net>``, ``cascades.{i}.dc_weight`` and
``cascades.{i}.model.unet.<U-Net>``, where ``<U-Net>`` is fastMRI's U-Net layout (:mod:`blindspot.models.unet`:
``down_sample_layers.{j}.layers.{0,4}.weight``, ``conv.layers.{0,4}.weight``, ``up_transpose_conv.{j}.layers.0.weight``,
``up_conv.{j}.layers.{0,4}.weight``, ``up_conv.{n-1}.0.layers.{0,4}.weight``, ``up_conv.{n-1}.1.{weight,bias}``), all
U-Nets with two input and two output channels (real and imaginary parts). There are no buffers (early fastMRI
versions kept a ``zero`` buffer in each cascade; such state dicts need that key dropped). :func:`varnet_hparams`
reads the constructor arguments off a bare state dict.

Equality with fastMRI holds to float round-off: the arithmetic is done on complex tensors rather than fastMRI's real
``(…, 2)`` views, which is the same computation. :class:`NormUnet` zero-pads to a multiple of 16 as fastMRI does;
with ``pools`` or ``sens_pools`` above 4 the padded size is not always a multiple of ``2**pools`` and blindspot's
U-Net pads (reflect) where fastMRI's pads one pixel after each up-sampling, so outputs then differ near the border.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blindspot.errors import BlindspotError
from blindspot.models.registry import register_model
from blindspot.models.unet import Unet
from blindspot.physics.coils import calibration_box, keep_columns, low_frequency_columns
from blindspot.physics.mri import fft2c, ifft2c, rss

#: NormUnet pads images to a multiple of this many pixels (fastMRI's).
PAD_MULTIPLE = 16


class NormUnet(nn.Module):
    """A U-Net on complex images, with the input normalised per item (fastMRI's ``NormUnet``).

    The ``c`` complex channels become ``2c`` real channels (all real parts, then all imaginary parts); the real and
    the imaginary channels are each shifted and scaled by their own mean and (unbiased) standard deviation over
    channels and pixels; the images are zero-padded to a multiple of 16, passed through the U-Net, cropped back and
    un-normalised.

    Args:
        chans: channels of the U-Net's first block.
        num_pools: down-/up-sampling stages.
        in_chans, out_chans: real channels (2 = one complex image).
        drop_prob: channel-dropout probability.

    ``forward(x)``: complex ``(B, in_chans / 2, H, W)`` → complex ``(B, out_chans / 2, H, W)``.
    """

    def __init__(self, chans: int, num_pools: int, in_chans: int = 2, out_chans: int = 2,
                 drop_prob: float = 0.0) -> None:
        super().__init__()
        if in_chans % 2 or out_chans % 2:
            raise TypeError(f"NormUnet works on complex images: in_chans and out_chans must be even, got "
                            f"{in_chans} and {out_chans}")
        self.unet = Unet(in_chans=in_chans, out_chans=out_chans, chans=chans, num_pool_layers=num_pools,
                         drop_prob=drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        B, c, H, W = x.shape
        parts = torch.stack([x.real, x.imag], dim=1)  # (B, 2, c, H, W): real parts, then imaginary parts
        mean = parts.mean(dim=(2, 3, 4), keepdim=True)
        std = parts.std(dim=(2, 3, 4), keepdim=True)
        real = ((parts - mean) / std).reshape(B, 2 * c, H, W)
        pad_h, pad_w = (-H) % PAD_MULTIPLE, (-W) % PAD_MULTIPLE
        top, left = pad_h // 2, pad_w // 2
        real = F.pad(real, (left, pad_w - left, top, pad_h - top))
        real = self.unet(real)[..., top: top + H, left: left + W]
        parts = real.reshape(B, 2, -1, H, W) * std + mean
        return torch.complex(parts[:, 0], parts[:, 1])


def sens_expand(image: Tensor, sens_maps: Tensor) -> Tensor:
    """``F(S_c · x)``: complex image ``(B, 1, H, W)`` → multi-coil k-space ``(B, C, H, W)``."""
    return fft2c(image * sens_maps)


def sens_reduce(kspace: Tensor, sens_maps: Tensor) -> Tensor:
    """``Σ_c S̄_c · F⁻¹(k_c)``: multi-coil k-space ``(B, C, H, W)`` → complex image ``(B, 1, H, W)``."""
    return (ifft2c(kspace) * sens_maps.conj()).sum(dim=1, keepdim=True)


class SensitivityModel(nn.Module):
    """Coil sensitivities from the masked k-space (fastMRI's ``SensitivityModel``).

    Args:
        chans, num_pools, in_chans, out_chans, drop_prob: the :class:`NormUnet`'s.
        mask_center: keep only the auto-calibration columns (see
            :func:`~blindspot.physics.coils.low_frequency_columns`, with fastMRI's detection rule) before estimating.

    ``forward(kspace, mask, num_low_frequencies)``: complex ``(B, C, H, W)``, bool ``(B, 1, 1, W)`` (or a 2-D mask
    ``(B, 1, H, W)``: then the central fully sampled box is kept, :func:`~blindspot.physics.coils.calibration_box`)
    and ``num_low_frequencies`` (``None``, an int or int64 ``(B,)``) → complex maps ``(B, C, H, W)`` with
    ``Σ_c |S_c|² = 1`` at every pixel.
    """

    def __init__(self, chans: int, num_pools: int, in_chans: int = 2, out_chans: int = 2, drop_prob: float = 0.0,
                 mask_center: bool = True) -> None:
        super().__init__()
        self.mask_center = mask_center
        self.norm_unet = NormUnet(chans, num_pools, in_chans=in_chans, out_chans=out_chans, drop_prob=drop_prob)

    def forward(self, kspace: Tensor, mask: Tensor, num_low_frequencies: "int | Tensor | None" = None) -> Tensor:
        if self.mask_center and mask.shape[-2] > 1:  # 2-D mask
            kspace = kspace * calibration_box(mask, num_low_frequencies, fastmri_argmin=True)
        elif self.mask_center:
            start, n = low_frequency_columns(mask, num_low_frequencies, fastmri_argmin=True)
            kspace = keep_columns(kspace, start, n)
        B, C, H, W = kspace.shape
        images = self.norm_unet(ifft2c(kspace).reshape(B * C, 1, H, W)).reshape(B, C, H, W)
        return images / rss(images, dim=1)


class VarNetBlock(nn.Module):
    """One cascade: soft data consistency plus a regulariser on the coil-combined image (fastMRI's ``VarNetBlock``).

    Args:
        model: the regulariser, complex ``(B, 1, H, W)`` → complex ``(B, 1, H, W)`` (a :class:`NormUnet`).

    ``forward(current, reference, mask, sens_maps)``: complex k-space ``(B, C, H, W)`` (current estimate and the
    measured k-space), bool column mask ``(B, 1, 1, W)`` and maps ``(B, C, H, W)`` →
    ``current − dc_weight · M ⊙ (current − reference) − F(S · model(Σ_c S̄_c F⁻¹ current_c))``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.dc_weight = nn.Parameter(torch.ones(1))

    def forward(self, current: Tensor, reference: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        soft_dc = torch.where(mask, current - reference, torch.zeros_like(current)) * self.dc_weight
        return current - soft_dc - sens_expand(self.model(sens_reduce(current, sens_maps)), sens_maps)


@register_model("varnet", modality="mri")
class VarNet(nn.Module):
    """fastMRI's end-to-end variational network (see the module docs).

    Args:
        num_cascades: number of unrolled cascades (fastMRI: 12).
        sens_chans: channels of the sensitivity U-Net's first block (fastMRI: 8).
        sens_pools: down-/up-sampling stages of the sensitivity U-Net (fastMRI: 4).
        chans: channels of each cascade U-Net's first block (fastMRI: 18).
        pools: down-/up-sampling stages of each cascade U-Net (fastMRI: 4).
        mask_center: estimate the sensitivities from the auto-calibration columns only (fastMRI: True).

    ``forward(masked_kspace, mask, num_low_frequencies=None)``:

    * ``masked_kspace``: real views of the masked multi-coil k-space ``(B, C, H, W, 2)``, centred (``fft2c``), in any
      units (the output is in the same units);
    * ``mask``: boolean column mask ``(B, 1, 1, W, 1)`` (fastMRI's; a 0/1 float mask is taken as boolean), or a 2-D
      mask ``(B, 1, H, W, 1)`` (an extension: fastMRI's VarNet takes column masks only);
    * ``num_low_frequencies``: the number of auto-calibration columns (an int, or int64 ``(B,)`` per item, as
      fastMRI's data transform gives them: the mask function's centre lines), or ``None`` / 0 to detect them from
      the mask;

    returns the root-sum-of-squares reconstruction ``(B, H, W)``.
    """

    network_input = "kspace"
    #: fastMRI's VarNet is a multi-coil network (its sensitivity model normalises over coils)
    multicoil_only = True

    def __init__(self, num_cascades: int = 12, sens_chans: int = 8, sens_pools: int = 4, chans: int = 18,
                 pools: int = 4, mask_center: bool = True) -> None:
        super().__init__()
        if min(num_cascades, sens_chans, sens_pools, chans, pools) < 1:
            raise TypeError("num_cascades, sens_chans, sens_pools, chans and pools must all be >= 1")
        self.num_cascades, self.sens_chans, self.sens_pools = num_cascades, sens_chans, sens_pools
        self.chans, self.pools, self.mask_center = chans, pools, mask_center
        self.sens_net = SensitivityModel(chans=sens_chans, num_pools=sens_pools, mask_center=mask_center)
        self.cascades = nn.ModuleList(VarNetBlock(NormUnet(chans, pools)) for _ in range(num_cascades))

    def forward(self, masked_kspace: Tensor, mask: Tensor, num_low_frequencies: "int | Tensor | None" = None) -> Tensor:
        if masked_kspace.ndim != 5 or masked_kspace.shape[-1] != 2 or masked_kspace.is_complex():
            raise BlindspotError(None, f"VarNet takes masked k-space as real views (B, coils, H, W, 2), got "
                                       f"{tuple(masked_kspace.shape)} {masked_kspace.dtype}")
        B, C, H, W, _ = masked_kspace.shape
        if (mask.ndim != 5 or mask.shape[-1] != 1 or mask.shape[-2] != W or mask.shape[0] not in (1, B)
                or mask.shape[2] not in (1, H)):
            raise BlindspotError(None, f"VarNet takes a column mask (B, 1, 1, {W}, 1) or a 2-D mask "
                                       f"(B, 1, {H}, {W}, 1), got {tuple(mask.shape)}")
        mask = mask[..., 0] != 0  # (B, 1, 1 | H, W) boolean
        kspace = torch.view_as_complex(masked_kspace.contiguous())
        sens_maps = self.sens_net(kspace, mask, num_low_frequencies)
        current = kspace
        for cascade in self.cascades:
            current = cascade(current, kspace, mask, sens_maps)
        return rss(ifft2c(current), dim=1)[:, 0]


def _unet_size(state_dict: Mapping[str, Tensor], prefix: str) -> tuple[int, int]:
    """``(chans, pools)`` of the fastMRI U-Net stored under ``prefix`` (e.g. ``"sens_net.norm_unet.unet."``)."""
    first = state_dict.get(f"{prefix}down_sample_layers.0.layers.0.weight")
    if first is None or getattr(first, "ndim", 0) != 4:
        raise BlindspotError(None, f"not a fastMRI VarNet state dict: no {prefix}down_sample_layers.0.layers.0.weight")
    pattern = re.compile(re.escape(prefix) + r"down_sample_layers\.(\d+)\.layers\.0\.weight")
    pools = 1 + max(int(m.group(1)) for m in map(pattern.fullmatch, state_dict) if m)
    return int(first.shape[0]), pools


def varnet_hparams(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The constructor arguments of the :class:`VarNet` a state dict was saved from, read off its keys and shapes.

    ``num_cascades`` counts the ``cascades.{i}.dc_weight`` entries; ``chans`` / ``sens_chans`` are the output
    channels of each U-Net's first convolution and ``pools`` / ``sens_pools`` the number of its encoder blocks.
    ``mask_center`` leaves no trace in the weights and is not returned (its default, fastMRI's, is True).

    Raises:
        BlindspotError: the keys are not a VarNet's (a one-line message naming the missing key).
    """
    cascades = {int(m.group(1)) for m in map(re.compile(r"cascades\.(\d+)\.dc_weight").fullmatch, state_dict) if m}
    if not cascades:
        raise BlindspotError(None, "not a fastMRI VarNet state dict: no cascades.{i}.dc_weight keys")
    sens_chans, sens_pools = _unet_size(state_dict, "sens_net.norm_unet.unet.")
    chans, pools = _unet_size(state_dict, "cascades.0.model.unet.")
    return {"num_cascades": max(cascades) + 1, "sens_chans": sens_chans, "sens_pools": sens_pools, "chans": chans,
            "pools": pools}
