"""Typed MRI samples and batches, and the one k-space → (input, target) transform every MRI source uses.

Every MRI data source (fastMRI HDF5, plain images, the built-in phantoms) yields :class:`MRISample` objects built by
:class:`KspaceTransform`, so models and attacks see the same thing whatever the source. Images here are *not*
normalised; normalisation statistics travel with the sample (DESIGN.md §1.1) and are applied by whoever needs
normalised tensors (``batch.stats.apply(batch.input)``).

**Multi-coil extras, only when asked for** (they cost memory: ``coils × H × W × 8`` bytes each per slice):

* ``KspaceTransform(..., kspace=True)`` keeps the masked k-space ``(C, H, W)`` of every slice (``C = 1`` for
  single-coil data), what a k-space network such as fastMRI's VarNet takes (``sample.kspace``, ``batch.kspace``);
* ``KspaceTransform(..., coil_maps="full" | "lowres" | "espirit")`` estimates each multi-coil slice's sensitivity
  maps with :func:`blindspot.physics.coils.estimate_maps` and keeps them on the image grid of ``input`` and
  ``target`` (the crop), ``(C, h, w)``: ``"full"`` from the fully sampled coil images (exact, the default for
  training and phantoms), ``"lowres"`` / ``"espirit"`` from the auto-calibration columns of the masked k-space alone,
  as a scanner would have to. Single-coil slices get no maps (their acquisition is the single-coil one). With maps,
  attacks simulate the multi-coil acquisition ``F⁻¹(M ⊙ F(S_c · y))`` of the target
  (:func:`blindspot.attacks.fnaf.as_truths`). With ``"full"`` maps ``S_c · target`` reproduces the cropped coil
  images (the target is their root-sum-of-squares).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from blindspot.errors import BlindspotError
from blindspot.physics.coils import MAP_ESTIMATORS, estimate_maps
from blindspot.physics.mri import (CartesianUndersampling, MaskFunc, NormStats, center_crop, draw_mask, ifft2c,
                                  is_column_mask, mask_on_grid, normalize, rss)
from blindspot.validate import check_crop

#: The largest slice read (elements of one k-space, target or image slice, e.g. 64 coils × 2048 × 2048): a file
#: declaring more is refused from its header, before anything is allocated.
MAX_SLICE_ELEMENTS = 2**28


@dataclass
class MRISample:
    """One slice, ready for a model.

    Attributes:
        input: zero-filled magnitude ``(1, h, w)`` float32, in the data's own units (not normalised).
        target: ground-truth magnitude ``(1, h, w)`` float32, same units.
        mask: the mask that produced ``input``, float32 0/1 on the k-space grid (``H × W``, may exceed ``h × w``):
            a column mask ``(1, W)``, or a 2-D mask ``(H, W)`` (2-D mask functions, e.g. ``gaussian2d``).
        mean: mean of ``input`` (scalar tensor), the normalisation's shift.
        std: std of ``input`` (scalar tensor), the normalisation's scale.
        fname: the volume's file name (also the mask seed).
        slice_num: slice index inside the volume.
        max_value: the volume's maximum target value (the data range of SSIM / PSNR, as fastMRI evaluates).
        acceleration: the acceleration of the drawn mask (``float('nan')`` when no mask was applied).
        attrs: the file's attributes (``acquisition``, ``patient_id``, …) where known; ``coil_maps`` names the map
            estimator when ``sens_maps`` is set.
        kspace: the masked k-space, complex64 ``(C, H, W)`` (``C = 1`` single-coil), centred, in the data's units; only
            when the transform keeps it (``kspace=True``), else ``None``.
        sens_maps: coil sensitivity maps, complex64 ``(C, h, w)`` on the grid of ``input`` / ``target``,
            ``Σ_c |S_c|² = 1`` on the object; only for multi-coil data when the transform estimates them
            (``coil_maps``), else ``None``.
        num_low_frequencies: the mask function's fully sampled centre columns (fastMRI's ``num_low_frequencies``;
            a 2-D mask's calibration-box width), or 0 when unknown (fully sampled, or a mask function that does not
            say); k-space networks get it (:func:`blindspot.training.mri.reconstruct_batch`).
    """

    input: Tensor
    target: Tensor
    mask: Tensor
    mean: Tensor
    std: Tensor
    fname: str
    slice_num: int
    max_value: float
    acceleration: float = float("nan")
    attrs: dict[str, Any] = field(default_factory=dict)
    kspace: Tensor | None = None
    sens_maps: Tensor | None = None
    num_low_frequencies: int = 0


@dataclass
class MRIBatch:
    """A collated batch of :class:`MRISample`.

    Attributes:
        input: ``(B, 1, h, w)`` zero-filled magnitudes.
        target: ``(B, 1, h, w)`` ground truths.
        mask: ``(B, 1, 1, W)`` column masks or ``(B, 1, H, W)`` 2-D masks (float32 0/1, on the k-space grid).
        stats: per-item normalisation statistics of ``input``.
        fname, slice_num: per-item identity.
        max_value: ``(B,)`` per-volume data ranges.
        acceleration: ``(B,)`` accelerations.
        kspace: ``(B, C, H, W)`` complex64 masked k-space (its mask is ``mask``, ``W`` columns), or ``None``.
        sens_maps: ``(B, C, h, w)`` complex64 coil maps on the image grid, or ``None``.
        num_low_frequencies: int64 ``(B,)``, the mask function's centre columns per item (0: unknown, detect them
            from the mask), or ``None`` when the masks were mapped onto another grid.
    """

    input: Tensor
    target: Tensor
    mask: Tensor
    stats: NormStats
    fname: list[str]
    slice_num: list[int]
    max_value: Tensor
    acceleration: Tensor
    kspace: Tensor | None = None
    sens_maps: Tensor | None = None
    num_low_frequencies: Tensor | None = None

    def to(self, device: torch.device | str) -> "MRIBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return MRIBatch(
            self.input.to(device),
            self.target.to(device),
            self.mask.to(device),
            NormStats(self.stats.mean.to(device), self.stats.std.to(device), self.stats.clamp),
            self.fname,
            self.slice_num,
            self.max_value.to(device),
            self.acceleration.to(device),
            move(self.kspace),
            move(self.sens_maps),
            move(self.num_low_frequencies),
        )

    def __len__(self) -> int:
        return self.input.shape[0]

    @property
    def keys(self) -> list[str]:
        """``"fname:slice"`` identities, used to record and resume per-image results."""
        return [f"{f}:{s}" for f, s in zip(self.fname, self.slice_num)]

    def normalized(self) -> tuple[Tensor, Tensor]:
        """``(N(input), N(target))``: both normalised with the input's statistics and clamped to ±6."""
        return self.stats.apply(self.input), self.stats.apply(self.target)

    def multicoil_kspace(self, who: str) -> Tensor:
        """The masked multi-coil k-space ``(B, C, H, W)`` for ``who`` (a network's name), which needs it.

        Raises:
            BlindspotError: the batch carries no k-space (its data set was opened without ``kspace=True``) or only one
            coil (single-coil data: fastMRI's VarNet and other multi-coil k-space networks estimate coil
            sensitivities and need several coils).
        """
        if self.kspace is None:
            raise BlindspotError(who, "takes masked k-space, but the data were opened without it (kspace=True)")
        if self.kspace.shape[1] < 2:
            raise BlindspotError(self.fname[0], f"is single-coil k-space; {who} takes multi-coil k-space")
        return self.kspace


def collate_mri(samples: Sequence[MRISample]) -> MRIBatch:
    """``DataLoader`` collate function: stacks :class:`MRISample` into an :class:`MRIBatch`.

    Images must share one ``(h, w)`` (the crop). Masks keep their k-space grid when all samples share it (column
    masks ``(B, 1, 1, W)``, 2-D masks ``(B, 1, H, W)``); volumes of different k-space sizes (fastMRI knee k-space is
    368 or 372 columns wide, …) get their masks mapped onto the image's ``h × w`` grid by nearest frequency
    (:func:`~blindspot.physics.mri.mask_on_grid`), which is what every mask consumer does anyway; their
    ``num_low_frequencies`` (counted on the k-space grid) are then dropped.
    """
    shapes = {tuple(s.target.shape) for s in samples} | {tuple(s.input.shape) for s in samples}
    if len(shapes) > 1:
        raise BlindspotError(samples[0].fname, f"cannot batch images of different sizes {sorted(shapes)}; give a "
                                               "common crop")
    kinds = {is_column_mask(s.mask) for s in samples}
    if len(kinds) > 1:
        raise BlindspotError(samples[0].fname, "cannot batch column masks with 2-D masks; use one mask type")
    column = kinds.pop()
    grids = {s.mask.shape[-1] if column else tuple(s.mask.shape[-2:]) for s in samples}
    h, w = samples[0].target.shape[-2:]
    if len(grids) == 1:
        masks = torch.stack([s.mask.reshape(1, 1, -1) if column else s.mask.reshape(1, *s.mask.shape[-2:])
                             for s in samples])
        low = torch.tensor([int(s.num_low_frequencies) for s in samples], dtype=torch.long)
    else:
        masks = torch.cat([mask_on_grid(s.mask, (h, w)) for s in samples])
        low = None
    mean = torch.stack([torch.as_tensor(s.mean, dtype=torch.float32) for s in samples]).reshape(-1, 1, 1, 1)
    std = torch.stack([torch.as_tensor(s.std, dtype=torch.float32) for s in samples]).reshape(-1, 1, 1, 1)
    return MRIBatch(
        input=torch.stack([s.input for s in samples]),
        target=torch.stack([s.target for s in samples]),
        mask=masks,
        stats=NormStats(mean, std),
        fname=[s.fname for s in samples],
        slice_num=[int(s.slice_num) for s in samples],
        max_value=torch.tensor([float(s.max_value) for s in samples], dtype=torch.float32),
        acceleration=torch.tensor([float(s.acceleration) for s in samples], dtype=torch.float32),
        kspace=stack_optional(samples, "kspace", "k-space"),
        sens_maps=stack_optional(samples, "sens_maps", "coil maps"),
        num_low_frequencies=low,
    )


def stack_optional(samples: Sequence[MRISample], name: str, what: str) -> Tensor | None:
    """Stack the samples' optional tensor ``name`` (``kspace`` or ``sens_maps``): ``None`` when no sample has it.

    Raises:
        BlindspotError: some samples have it and others not, or their shapes differ (volumes of different k-space
        sizes or coil counts: batch them one at a time).
    """
    present = [getattr(s, name) is not None for s in samples]
    if not any(present):
        return None
    if not all(present):
        missing = samples[present.index(False)]
        raise BlindspotError(missing.fname, f"has no {what} while others in its batch have")
    shapes = sorted({tuple(getattr(s, name).shape) for s in samples})
    if len(shapes) > 1:
        raise BlindspotError(samples[0].fname, f"cannot batch {what} of different shapes {shapes} (coils, rows, "
                                               "columns); use batch size 1")
    return torch.stack([getattr(s, name) for s in samples])


def check_coil_maps(coil_maps: str | None) -> str | None:
    """``coil_maps`` if it names an estimator (:data:`~blindspot.physics.coils.MAP_ESTIMATORS`) or is ``None``."""
    if coil_maps is not None and coil_maps not in MAP_ESTIMATORS:
        raise BlindspotError(None, f"unknown coil-map estimator {coil_maps!r}; choose from "
                                   f"{', '.join(MAP_ESTIMATORS)}")
    return coil_maps


class KspaceTransform:
    """Fully sampled k-space of one slice → :class:`MRISample`.

    Args:
        mask_func: draws the mask on the slice's k-space grid (:func:`~blindspot.physics.mri.draw_mask`: column
            masks ``(1, W)``, 2-D masks ``(H, W)``); ``None`` means fully sampled (input = target).
        crop: ``(h, w)`` of input and target; ``None`` → the target's shape if a target is given, else the image's.
            A crop larger than the k-space (or the target) is an error naming ``--crop`` and the file.
        use_seed: seed the mask with the file name (fastMRI: the same volume always gets the same mask);
            otherwise the mask function's own generator advances.
        coil_maps: estimate the coil sensitivities of multi-coil slices with this estimator
            (:data:`~blindspot.physics.coils.MAP_ESTIMATORS`: ``"full"``, ``"lowres"``, ``"espirit"``; see the module
            docs) and keep them in ``sample.sens_maps``; ``None`` (default): no maps. ESPIRiT costs seconds per
            fastMRI-sized slice.
        kspace: keep the masked k-space in ``sample.kspace`` (for k-space networks).
    """

    def __init__(self, mask_func: MaskFunc | None, crop: tuple[int, int] | None = None, use_seed: bool = True,
                 coil_maps: str | None = None, kspace: bool = False):
        self.mask_func = mask_func
        self.crop = crop
        self.use_seed = use_seed
        self.coil_maps = check_coil_maps(coil_maps)
        self.kspace = bool(kspace)

    def __call__(
        self,
        kspace: Tensor,
        target: Tensor | None,
        fname: str,
        slice_num: int,
        max_value: float | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> MRISample:
        """Args:
        kspace: complex ``(H, W)`` single-coil or ``(coils, H, W)`` multi-coil fully sampled k-space.
        target: stored reconstruction ``(h, w)`` (``reconstruction_esc`` / ``reconstruction_rss``) or ``None``
            to compute it as the cropped magnitude / RSS of the fully sampled image.
        fname, slice_num: identity (``fname`` seeds the mask).
        max_value: the volume's data range (``None``: the target's maximum).
        attrs: file attributes (``path`` names the file in errors).
        Raises:
            BlindspotError: naming the file and slice, when the coil-map estimator cannot work on this slice (e.g.
            too few auto-calibration columns for ESPIRiT); naming ``--crop`` and the file for a crop that does not
            fit.
        """
        k = kspace.unsqueeze(0) if kspace.ndim == 2 else kspace  # (C, H, W)
        source = (attrs or {}).get("path", fname)
        crop = self.crop or (tuple(target.shape[-2:]) if target is not None else tuple(k.shape[-2:]))
        check_crop(crop, k.shape, source)
        if target is not None:
            check_crop(crop, target.shape, source)
        crop = (int(crop[0]), int(crop[1]))
        num_low = 0
        if self.mask_func is None:
            mask_t = torch.ones(1, k.shape[-1])
            acceleration = 1.0
        else:
            drawn = draw_mask(self.mask_func, k.shape[-1], k.shape[-2], fname if self.use_seed else None)
            mask_t, acceleration, num_low = drawn.mask, drawn.acceleration, int(drawn.num_low_frequencies)
        op = CartesianUndersampling(mask_t, crop)
        masked, zero_filled = op.from_kspace(k.unsqueeze(0))
        zero_filled = zero_filled[0]  # (1, h, w)
        if target is None:
            full = center_crop(ifft2c(k), crop)
            target_t = rss(full, dim=0) if full.shape[0] > 1 else full.abs()
        else:
            target_t = center_crop(torch.as_tensor(target, dtype=torch.float32).reshape(1, *target.shape[-2:]), crop)
        target_t = target_t.to(torch.float32).reshape(1, *crop)
        _, stats = normalize(zero_filled.unsqueeze(0))
        attrs = dict(attrs or {})
        maps = None
        if self.coil_maps is not None and k.shape[0] > 1:
            maps = self.estimate(k, masked, mask_t, crop, source, slice_num)
            attrs["coil_maps"] = self.coil_maps
        return MRISample(
            input=zero_filled.to(torch.float32),
            target=target_t,
            mask=mask_t.reshape(1, -1) if is_column_mask(mask_t) else mask_t.reshape(mask_t.shape[-2:]),
            mean=stats.mean.reshape(()),
            std=stats.std.reshape(()),
            fname=fname,
            slice_num=int(slice_num),
            max_value=float(max_value) if max_value is not None else float(target_t.max()),
            acceleration=float(acceleration),
            attrs=attrs,
            kspace=masked[0].to(torch.complex64) if self.kspace else None,
            sens_maps=maps,
            num_low_frequencies=num_low,
        )

    def estimate(self, kspace: Tensor, masked: Tensor, mask: Tensor, crop: tuple[int, int], source: Any,
                 slice_num: int) -> Tensor:
        """Coil maps ``(C, h, w)`` complex64 of one slice, on the crop grid.

        Args:
            kspace: fully sampled k-space ``(C, H, W)`` (``"full"`` uses it).
            masked: the masked k-space ``(1, C, H, W)`` (``"lowres"`` / ``"espirit"`` use only its auto-calibration
                data: the ACS columns of a column mask, the calibration box of a 2-D mask).
            mask: its column mask ``(1, W)`` or 2-D mask ``(H, W)``.
            crop: ``(h, w)``.
            source, slice_num: for errors.
        """
        try:
            if self.coil_maps == "full":
                maps = estimate_maps(kspace.unsqueeze(0).to(torch.complex64), None, "full")
            else:
                maps = estimate_maps(masked.to(torch.complex64), mask_on_grid(mask, masked.shape[-2:]),
                                     self.coil_maps)
        except BlindspotError as err:
            hint = "" if is_column_mask(mask) else " (a 2-D mask: see --coil-maps, --mask-type, --center-fractions)"
            raise BlindspotError(source, f"slice {slice_num}: {err.problem}{hint}") from None
        return center_crop(maps[0], crop).to(torch.complex64).contiguous()
