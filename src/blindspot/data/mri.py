"""One entry point for every MRI data source: :func:`open_mri_dataset`.

* ``None`` → the built-in synthetic knee phantoms (:class:`blindspot.data.phantom_dataset.PhantomDataset`);
* an ``.h5`` / ``.hdf5`` file, or a folder of them → :class:`blindspot.data.fastmri.FastMRISliceDataset`;
* a DICOM / PNG / NumPy file, or a folder of them → :class:`blindspot.data.images.ImageDataset`.

A folder mixing HDF5 volumes and images, holding any other file, or holding nothing usable is an error
(:class:`~blindspot.errors.BlindspotError` naming it). Every source yields :class:`~blindspot.data.sample.MRISample`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from blindspot.data.dicom import INDEX_FILE_NAMES
from blindspot.data.fastmri import HDF5_SUFFIXES, FastMRISliceDataset
from blindspot.data.images import ImageDataset, image_kind
from blindspot.data.phantom_dataset import PhantomDataset
from blindspot.errors import BlindspotError, PathLike
from blindspot.validate import check_crop
from blindspot.physics.mri import MaskFunc

FASTMRI = "fastmri"
IMAGES = "images"
PHANTOMS = "phantoms"

#: Options each kind of source accepts (besides ``mask_func`` and ``crop``).
OPTIONS: dict[str, frozenset[str]] = {
    FASTMRI: frozenset({"challenge", "sample_rate", "volume_sample_rate", "use_seed", "seed", "mask_padding",
                        "progress", "coil_maps", "kspace"}),
    IMAGES: frozenset({"resize", "use_seed", "progress"}),
}


def detect_kind(path: PathLike | None) -> str:
    """``"phantoms"`` (``None``), ``"fastmri"`` or ``"images"`` for a file or folder.

    Raises:
        BlindspotError: missing path, a file of no known kind, or a folder that mixes kinds, holds other files or
        holds nothing usable.
    """
    if path is None:
        return PHANTOMS
    path = Path(path)
    if not path.exists():
        raise BlindspotError(path, "no such file or folder")
    if path.is_file():
        if path.suffix.lower() in HDF5_SUFFIXES:
            return FASTMRI
        if image_kind(path) is not None:
            return IMAGES
        raise BlindspotError(path, "not an MRI data file (expected .h5, DICOM, .png or .npy)")
    h5, images, other = [], [], []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or p.name in INDEX_FILE_NAMES:
            continue
        if p.suffix.lower() in HDF5_SUFFIXES:
            h5.append(p)
        elif image_kind(p) is not None:
            images.append(p)
        else:
            other.append(p)
    if h5 and images:
        raise BlindspotError(
            path,
            f"mixes {len(h5)} HDF5 volume(s) and {len(images)} image file(s) (e.g. {h5[0].name}, {images[0].name}); "
            "give one kind per folder",
        )
    if other:
        raise BlindspotError(other[0], "not an MRI data file (expected .h5, DICOM, .png or .npy)")
    if not h5 and not images:
        raise BlindspotError(path, "empty folder: no .h5, DICOM, .png or .npy files")
    return FASTMRI if h5 else IMAGES


def open_mri_dataset(
    path: PathLike | None, mask_func: MaskFunc | None, crop: tuple[int, int] | None = None, **options: Any
) -> Dataset:
    """Open an MRI data source as a dataset of :class:`~blindspot.data.sample.MRISample`.

    Args:
        path: ``None`` for the built-in phantoms, else an HDF5 / image file or folder (see the module docs).
        mask_func: under-sampling mask function (``None`` → fully sampled).
        crop: ``(h, w)`` of inputs and targets. fastMRI: the crop (default: the header's, capped to the data);
            images: the working size (default 320×320: smaller images are zero padded; an explicit crop larger than
            an image is an error naming it); phantoms: passed through.
        **options: passed to the source's constructor; options that are ``None`` (and ``kspace=False``) are dropped.
            fastMRI: ``challenge``, ``sample_rate``, ``volume_sample_rate``, ``use_seed``, ``seed``,
            ``mask_padding``, ``progress``, ``coil_maps``, ``kspace``. Images: ``resize``, ``use_seed``,
            ``progress`` (``coil_maps`` is accepted and has no effect: images are single-coil, so they get no maps).
            Phantoms: whatever :class:`~blindspot.data.phantom_dataset.PhantomDataset` takes (``volumes``, ``slices``,
            ``seed``, ``shape``, ``challenge``, ``num_coils``, ``coil_maps``, ``kspace``, …).
            Multi-coil extras (:mod:`blindspot.data.sample`): ``coil_maps`` (``"full"``, ``"lowres"``, ``"espirit"``)
            estimates the coil sensitivities of multi-coil slices, ``kspace=True`` keeps the masked k-space.
    Raises:
        BlindspotError: bad path or files (see :func:`detect_kind` and each dataset), an option that does not
        apply to the source's kind, or ``kspace=True`` for image files (single-coil magnitudes, no k-space network
        can take them).
    """
    options = {k: v for k, v in options.items() if v is not None and not (k == "kspace" and not v)}
    kind = detect_kind(path)
    if kind == IMAGES and options.get("kspace"):
        raise BlindspotError(path, "image files are single-coil magnitude images; a k-space network needs multi-coil "
                                   "k-space (fastMRI multi-coil files or multi-coil phantoms)")
    if kind == IMAGES:
        options.pop("coil_maps", None)
    if kind == PHANTOMS:
        return PhantomDataset(mask_func=mask_func, crop=crop, **options)
    unknown = sorted(set(options) - OPTIONS[kind])
    if unknown:
        what = "fastMRI HDF5 data" if kind == FASTMRI else "image files"
        raise BlindspotError(path, f"option(s) {', '.join(unknown)} do not apply to {what}")
    if kind == FASTMRI:
        return FastMRISliceDataset(path, mask_func=mask_func, crop=crop, **options)
    dataset = ImageDataset(path, size=crop if crop is not None else (320, 320), mask_func=mask_func, **options)
    if crop is not None and dataset.resize == "crop":  # an asked-for crop is never silently zero padding
        for entry in dataset.entries:
            check_crop(crop, entry.shape, entry.path)
    return dataset
