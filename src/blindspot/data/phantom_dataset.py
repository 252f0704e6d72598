"""The built-in synthetic knee phantoms as an in-memory slice data set.

:class:`PhantomDataset` yields exactly the :class:`~blindspot.data.sample.MRISample` objects that reading the files
written by :func:`~blindspot.data.knee_files.write_phantom_volumes` with the fastMRI slice reader would give: the
same k-space (``F`` of the complex phantom image, complex64), the same stored target (``reconstruction_esc`` /
``reconstruction_rss``), the same file name (which seeds the mask, as in fastMRI), the same ``max_value``, the
same crop (the requested one — an error when larger than the reconstruction size — else the reconstruction size)
and the same ``attrs`` (``max``, ``norm``, ``acquisition``, ``patient_id``, ``challenge``, ``padding``, ``crop``; only the reader's
``path`` is absent), all passed through the same :class:`~blindspot.data.sample.KspaceTransform`.

Generation is lazy and per volume: the first time a slice of volume ``v`` is asked for, the whole volume is rendered
as one batched stack (:func:`~blindspot.data.knee_phantom.generate_knee_volume`) and kept in memory, so each volume
is generated once. Memory: about ``volumes × slices × coils × H × W × 8`` bytes of k-space plus the targets
(35 single-coil 640×368 slices ≈ 66 MB per volume). ``materialize()`` generates every volume up front. Because
generation is deterministic, ``DataLoader`` workers that each build their own cache agree with one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import Tensor
from torch.utils.data import Dataset

from blindspot.data.knee_files import challenge_coils, volume_arrays
from blindspot.data.knee_phantom import (
    FASTMRI_KNEE_SHAPE,
    FASTMRI_RECON_SIZE,
    generate_knee_volume,
    phantom_fname,
    phantom_geometry,
    volume_seeds,
)
from blindspot.data.sample import KspaceTransform, MRISample
from blindspot.errors import BlindspotError
from blindspot.physics.mri import MaskFunc
from blindspot.validate import check_crop


@dataclass
class _Volume:
    kspace: Tensor  # (S, H, W) or (S, C, H, W) complex64
    target: Tensor  # (S, h, w) float32
    attrs: dict[str, Any]
    fname: str


class PhantomDataset(Dataset):
    """Slices of synthetic knee volumes, as :class:`MRISample` (see the module docstring).

    Args:
        volumes: number of volumes; volume ``v`` has seed ``seed + v`` and file name ``file_phantom_{seed+v:06d}.h5``.
        slices: sections per volume.
        seed: base seed (non-negative).
        shape: k-space / image size ``(H, W)`` (fastMRI knee: ``(640, 368)``).
        mask_func: column mask function (``None``: fully sampled, input = target).
        crop: ``(h, w)`` of input and target; ``None`` → the stored reconstruction's size (``recon_size``).
        challenge: ``"singlecoil"`` or ``"multicoil"``.
        num_coils: coils of a multi-coil phantom.
        recon_size: size of the stored target (the reconstruction crop; clipped to ``shape``).
        use_seed: seed each volume's mask with its file name (fastMRI behaviour).
        coil_maps: multi-coil only: estimate each slice's coil sensitivities (``"full"``, ``"lowres"``, ``"espirit"``;
            :class:`~blindspot.data.sample.KspaceTransform`) into ``sample.sens_maps``; ``None``: none.
        kspace: keep each slice's masked k-space in ``sample.kspace`` (for k-space networks such as VarNet).

    Index ``i`` is slice ``i % slices`` of volume ``i // slices``.

    Attributes:
        seeds: the volume seeds; ``fnames`` their file names.
        slices: slices per volume.
        shape, recon_size: k-space size and stored-target size.
        crop: the effective ``(h, w)`` of inputs and targets.
        challenge, num_coils: ``"singlecoil"`` (``num_coils`` ``None``) or ``"multicoil"``.
    """

    def __init__(
        self,
        volumes: int = 4,
        slices: int = 8,
        seed: int = 0,
        shape: Sequence[int] = FASTMRI_KNEE_SHAPE,
        mask_func: MaskFunc | None = None,
        crop: Sequence[int] | None = None,
        challenge: str = "singlecoil",
        num_coils: int = 8,
        recon_size: Sequence[int] = FASTMRI_RECON_SIZE,
        use_seed: bool = True,
        coil_maps: str | None = None,
        kspace: bool = False,
    ) -> None:
        self.num_coils = challenge_coils(challenge, num_coils)
        if int(slices) < 1:
            raise BlindspotError(None, f"need at least one slice per volume, got {slices}")
        geo = phantom_geometry(shape, recon_size)
        self.seeds = volume_seeds(seed, volumes)
        self.slices = int(slices)
        self.shape = geo.shape
        self.recon_size = geo.recon_size
        self.challenge = challenge
        if crop is not None and (len(tuple(crop)) != 2 or min(int(c) for c in crop) < 1):
            raise BlindspotError(None, f"crop must be two positive sizes (h, w), got {tuple(crop)}")
        want = self.recon_size if crop is None else (int(crop[0]), int(crop[1]))
        check_crop(want, self.recon_size, "the phantoms' reconstruction size (--phantom-recon-size)")
        self.crop = want
        self.transform = KspaceTransform(mask_func, self.crop, use_seed, coil_maps=coil_maps, kspace=kspace)
        self._cache: dict[int, _Volume] = {}

    @property
    def fnames(self) -> list[str]:
        """File names of the volumes, as :func:`~blindspot.data.knee_files.write_phantom_volumes` writes them."""
        return [phantom_fname(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds) * self.slices

    def volume(self, v: int) -> _Volume:
        """Volume ``v`` (generated on first use, then cached): k-space, targets, attributes and file name."""
        if v not in self._cache:
            vol = generate_knee_volume(self.seeds[v], self.slices, self.shape, self.recon_size,
                                       num_coils=self.num_coils)
            kspace, target, file_attrs = volume_arrays(vol)
            # The attributes the fastMRI reader puts in each sample (less its ``path``).
            attrs = {key: file_attrs[key] for key in ("max", "norm", "acquisition", "patient_id")}
            attrs.update(challenge=self.challenge, padding=(0, self.shape[1]), crop=self.crop)
            self._cache[v] = _Volume(kspace, target, attrs, vol.fname)
        return self._cache[v]

    def materialize(self) -> "PhantomDataset":
        """Generate every volume now (otherwise each is generated on first access)."""
        for v in range(len(self.seeds)):
            self.volume(v)
        return self

    def __getitem__(self, index: int) -> MRISample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        index %= len(self)
        v, s = divmod(index, self.slices)
        vol = self.volume(v)
        return self.transform(vol.kspace[s], vol.target[s], vol.fname, s, vol.attrs["max"], dict(vol.attrs))

    def __repr__(self) -> str:
        return (f"PhantomDataset(volumes={len(self.seeds)}, slices={self.slices}, seeds={self.seeds[0]}…, "
                f"shape={self.shape}, challenge={self.challenge!r})")
