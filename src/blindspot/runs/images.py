"""The images an invariance run optimises: built-in phantoms or files, for CT denoisers and MRI networks.

:class:`DataOptions` says what the CLI's data flags say; :func:`open_images` resolves it against a model's
checkpoint physics into a :class:`CTImageSet` (low-dose images in HU with their normalisation: built-in phantoms
simulated at the model's dose, a DICOM series, the LDCT layout or ``.npy`` files) or an :class:`MRIImageSet` (true
images and their acquisition: built-in knee phantoms or fastMRI / image files). Both can also be built from tensors
(:meth:`CTImageSet.from_tensor`, :meth:`MRIImageSet.from_tensor`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from blindspot.data import ldct
from blindspot.data.ct_phantom import PhantomPairs, scanner_of
from blindspot.data.mri import open_mri_dataset
from blindspot.data.sample import collate_mri
from blindspot.errors import BlindspotError, PathLike
from blindspot.models.loading import LoadedModel
from blindspot.physics.acquisition import CartesianMRI
from blindspot.physics.ct import HUNormalization
from blindspot.physics.mri import create_mask_func, low_frequencies_on_grid, mask_on_grid

__all__ = ["CTImageSet", "CTItem", "DataOptions", "ImageBatch", "MRIImageSet", "as_image_set", "open_images"]


@dataclass(frozen=True)
class DataOptions:
    """Which images a run uses (the CLI's data flags). ``None`` takes the checkpoint's setting, else a default.

    Attributes:
        data: CT: a DICOM file or series, the LDCT layout or ``.npy`` images in HU (a file or folder); MRI: fastMRI
            HDF5 or image files. ``None``: the built-in phantoms.
        phantoms: built-in phantoms: CT slices (alternating chest / abdomen), MRI volumes (8 slices each).
        size: phantom side in pixels (CT: the slice, default the checkpoint's training size, else 512; MRI: k-space
            and image, default the checkpoint's phantom geometry, else fastMRI's 640×368 k-space, 320×320 image).
        dose: CT: the simulated dose of the phantoms' network input (default the checkpoint's, else 0.25); with
            ``data``, the low-dose series to take from the LDCT layout.
        mask_type, acceleration, center_fraction, crop: MRI sampling (default the checkpoint's, else random 4x with
            the standard centre fraction) and image size ``(h, w)``.
        limit: use only the first ``limit`` images.
        seed: CT phantoms: patient seeds ``seed·1000 + i`` and the noise seeds of the low-dose simulation.
        skip_bad: CT series in the LDCT layout: leave out member files that are not readable CT images (and their
            partner slices), each printed on stderr and listed in the run's settings (``skipped``).
    """

    data: PathLike | None = None
    phantoms: int = 4
    size: int | None = None
    dose: float | None = None
    mask_type: str | None = None
    acceleration: float | None = None
    center_fraction: float | None = None
    crop: tuple[int, int] | None = None
    limit: int | None = None
    seed: int = 0
    skip_bad: bool = False

    def settings(self) -> dict[str, Any]:
        """JSON-able settings for run folders (``seed`` as ``data_seed``; what ``skip_bad`` left out is recorded by
        :func:`open_ct_images` instead of the flag)."""
        d = dataclasses.asdict(self)
        d.pop("skip_bad")
        d["data"] = None if self.data is None else str(self.data)
        d["crop"] = None if self.crop is None else [int(c) for c in self.crop]
        d["data_seed"] = d.pop("seed")
        return d

    def describe(self) -> str:
        return str(self.data) if self.data is not None else f"phantoms:{self.phantoms}"


@dataclass
class ImageBatch:
    """Images of a run, with their identities.

    Attributes:
        keys: identities (file and slice, LDCT patient and index, phantom name).
        index: positions in the image set (seed the start noise, so results do not depend on the batch).
        images: CT: low-dose images in HU ``(B, 1, H, W)``; MRI: true images ``(B, 1, h, w)`` in the data's units.
        acquisition: MRI only: the acquisition of these images (one column mask each).
        weights: CT only: sampling weights ``(B,)`` (equal probability per LDCT patient), or ``None``.
        field: CT only: the reconstruction fields of view, bool ``(B, 1, H, W)`` (``True`` = image; outside, the
            images hold air, −1000 HU, and attacks and metrics leave those pixels out), or ``None`` when every pixel
            of every image is inside.
    """

    keys: list[str]
    index: list[int]
    images: Tensor
    acquisition: CartesianMRI | None = None
    weights: Tensor | None = None
    field: Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, sel: Sequence[int]) -> "ImageBatch":
        i = torch.as_tensor(list(sel), dtype=torch.long)
        return ImageBatch([self.keys[j] for j in sel], [self.index[j] for j in sel], self.images[i],
                          None if self.acquisition is None else self.acquisition.select(i),
                          None if self.weights is None else self.weights[i],
                          None if self.field is None else self.field[i])


@dataclass
class CTItem:
    """One CT image: identity, a loader of its low-dose image in HU ``(1, H, W)`` — or of ``(image, field)`` with
    its field of view, bool ``(1, H, W)`` — and a sampling weight."""

    key: str
    load: Callable[[], "Tensor | tuple[Tensor, Tensor | None]"]
    weight: float = 1.0


class CTImageSet:
    """Low-dose CT images (loaded lazily, batch by batch) and what is known about their normalisation and dose.

    Args:
        items: the images.
        dose: the dose of the low-dose images, when known (recorded).
        normalization: the HU ↔ network map; ``None`` takes the model's, else one fitted to the first image (the
            same on every resume).
        settings: what identifies the images in run settings.
    """

    modality = "ct"

    def __init__(self, items: Sequence[CTItem], dose: float | None = None,
                 normalization: HUNormalization | None = None, settings: Mapping[str, Any] | None = None) -> None:
        if not items:
            raise BlindspotError(None, "no CT images to use")
        self.items = list(items)
        self.dose = dose
        self.normalization = normalization
        self.settings = dict(settings or {"data": "tensor", "images": len(self.items)})

    @classmethod
    def from_tensor(cls, low_dose_hu: Tensor, keys: Sequence[str] | None = None, dose: float | None = None,
                    normalization: HUNormalization | None = None, field: Tensor | None = None) -> "CTImageSet":
        """Images ``(N, 1, H, W)`` in HU (named ``image-0``, … unless ``keys`` are given), optionally with their
        fields of view ``field`` (bool, same shape; pixels outside are set to air, −1000 HU)."""
        if low_dose_hu.ndim != 4 or low_dose_hu.shape[1] != 1:
            raise BlindspotError(None, f"CT images must be (N, 1, H, W) in HU, got {tuple(low_dose_hu.shape)}")
        if field is not None:
            if tuple(field.shape) != tuple(low_dose_hu.shape):
                raise BlindspotError(None, f"field of view {tuple(field.shape)} does not fit images "
                                           f"{tuple(low_dose_hu.shape)}")
            field = field.to(torch.bool)
            low_dose_hu = torch.where(field, low_dose_hu, torch.full_like(low_dose_hu, ldct.AIR_HU))
        keys = [f"image-{i}" for i in range(low_dose_hu.shape[0])] if keys is None else list(keys)
        items = [CTItem(k, (lambda i=i: low_dose_hu[i] if field is None else (low_dose_hu[i], field[i])))
                 for i, k in enumerate(keys)]
        return cls(items, dose, normalization)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: Sequence[int]) -> ImageBatch:
        """The images ``index`` as one batch (one size; finite values; at least
        :data:`~blindspot.data.ldct.MIN_FIELD_FRACTION` of each inside its field of view, with the field kept)."""
        imgs, fields = [], []
        for i in index:
            it = self.items[i]
            loaded = it.load()
            img, fld = loaded if isinstance(loaded, tuple) else (loaded, None)
            img = img.unsqueeze(0) if img.ndim == 2 else img
            if not torch.isfinite(img).all():
                raise BlindspotError(it.key, "image contains NaN or Inf")
            if fld is not None:
                fld = (fld.unsqueeze(0) if fld.ndim == 2 else fld).to(torch.bool)
                ldct.check_field(it.key, fld.numpy())
            imgs.append(img.to(torch.float32))
            fields.append(fld)
        shapes = {tuple(i.shape) for i in imgs}
        if len(shapes) > 1:
            raise BlindspotError(self.items[index[0]].key, f"images of one batch differ in size {sorted(shapes)}; "
                                                           "use a batch size of 1")
        field = None
        if any(f is not None and not bool(f.all()) for f in fields):
            field = torch.stack([f if f is not None else torch.ones_like(im, dtype=torch.bool)
                                 for f, im in zip(fields, imgs)])
        weights = torch.tensor([self.items[i].weight for i in index], dtype=torch.float32)
        return ImageBatch([self.items[i].key for i in index], list(index), torch.stack(imgs), weights=weights,
                          field=field)

    def batches(self, batch_size: int, todo: Callable[[str], bool] = lambda key: True) -> Iterator[ImageBatch]:
        """Batches of at most ``batch_size`` images, skipping (without loading) those ``todo`` rejects."""
        for start in range(0, len(self.items), batch_size):
            index = [i for i in range(start, min(start + batch_size, len(self.items))) if todo(self.items[i].key)]
            if index:
                yield self.load(index)

    def load_all(self) -> ImageBatch:
        return self.load(range(len(self.items)))

    def normalization_for(self, model: LoadedModel) -> HUNormalization:
        """This set's normalisation, else the model's (its checkpoint's), else one fitted to the first image's
        pixels inside its field of view."""
        if self.normalization is not None:
            return self.normalization
        if model.normalization:
            return HUNormalization.from_dict(model.normalization, model.source)
        first = self.load([0])
        return HUNormalization.fit(first.images if first.field is None else first.images[first.field])


class MRIImageSet:
    """MRI true images with their acquisitions: a data set of :class:`~blindspot.data.sample.MRISample` (read
    batch by batch) or tensors.

    Args:
        dataset: MRI samples; their targets are the truths and their masks (mapped onto the image's columns by
            spatial frequency) the acquisition, k-space simulated from the truth as the FNAF attack does.
        truth, acquisition, keys: tensors instead: truths ``(N, 1, H, W)`` and a :class:`CartesianMRI` of ``1`` or
            ``N`` items (see :meth:`from_tensor`).
        settings: what identifies the images in run settings.
        info: what the records say about the sampling (``mask_type``, ``acceleration``).
    """

    modality = "mri"

    def __init__(self, dataset: Dataset | None = None, *, truth: Tensor | None = None,
                 acquisition: CartesianMRI | None = None, keys: Sequence[str] | None = None,
                 settings: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None) -> None:
        if (dataset is None) == (truth is None):
            raise ValueError("give either a data set or truth tensors")
        self.dataset, self.truth, self.acquisition = dataset, truth, acquisition
        n = len(dataset) if dataset is not None else int(truth.shape[0])
        if n == 0:
            raise BlindspotError(None, "no MRI images to use")
        self.keys = None if keys is None else list(keys)
        self.settings = dict(settings or {"data": "tensor", "images": n})
        self.info = dict(info or {})

    @classmethod
    def from_tensor(cls, truth: Tensor, acquisition: "CartesianMRI | Tensor",
                    keys: Sequence[str] | None = None) -> "MRIImageSet":
        """Truths ``(N, 1, H, W)`` (data units) and their acquisition: a :class:`CartesianMRI` of 1 or ``N`` items
        (its mask on the ``H × W`` grid), or masks mapped onto that grid (:func:`~blindspot.physics.mri.mask_on_grid`):
        column masks ``(N, 1, 1, W')`` / ``(W',)``, 2-D masks ``(N, 1, H', W')`` / ``(H', W')``."""
        if truth.ndim != 4 or truth.shape[1] != 1:
            raise BlindspotError(None, f"MRI truths must be (N, 1, H, W), got {tuple(truth.shape)}")
        N = int(truth.shape[0])
        if not isinstance(acquisition, CartesianMRI):
            mask = torch.as_tensor(acquisition, dtype=torch.float32)
            acquisition = CartesianMRI(mask_on_grid(mask, tuple(truth.shape[-2:])))
        if len(acquisition) not in (1, N):
            raise BlindspotError(None, f"{len(acquisition)} acquisitions for {N} images")
        if len(acquisition) == 1:
            acquisition = acquisition.select(torch.zeros(N, dtype=torch.long))
        keys = [f"image-{i}" for i in range(N)] if keys is None else list(keys)
        return cls(truth=truth, acquisition=acquisition, keys=keys)

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else int(self.truth.shape[0])

    def batches(self, batch_size: int, todo: Callable[[str], bool] = lambda key: True) -> Iterator[ImageBatch]:
        """Batches of at most ``batch_size`` images, without those ``todo`` rejects (data sets are read to know)."""
        if self.dataset is None:
            for start in range(0, len(self), batch_size):
                index = [i for i in range(start, min(start + batch_size, len(self))) if todo(self.keys[i])]
                if index:
                    i = torch.tensor(index)
                    yield ImageBatch([self.keys[j] for j in index], index, self.truth[i], self.acquisition.select(i))
            return
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_mri, num_workers=0)
        start = 0
        for b in loader:
            B = len(b)
            grid = tuple(b.target.shape[-2:])
            acq = CartesianMRI(mask_on_grid(b.mask, grid, B), accelerations=b.acceleration,
                               num_low_frequencies=low_frequencies_on_grid(b.mask, grid, b.num_low_frequencies))
            batch = ImageBatch(b.keys, list(range(start, start + B)), b.target, acq)
            start += B
            sel = [j for j, k in enumerate(batch.keys) if todo(k)]
            if sel:
                yield batch if len(sel) == B else batch.subset(sel)

    def load_all(self) -> ImageBatch:
        """Every image as one batch (one acquisition of ``N`` items)."""
        if self.dataset is None:
            return ImageBatch(list(self.keys), list(range(len(self))), self.truth, self.acquisition)
        parts = list(self.batches(16))
        shapes = sorted({tuple(p.images.shape[-2:]) for p in parts})
        if len(shapes) > 1:
            raise BlindspotError(None, f"the MRI images differ in size {shapes}; give a common crop")
        acq = CartesianMRI(torch.cat([p.acquisition.mask for p in parts]),
                           accelerations=torch.cat([p.acquisition.accelerations for p in parts]))
        return ImageBatch([k for p in parts for k in p.keys], [i for p in parts for i in p.index],
                          torch.cat([p.images for p in parts]), acq)


def open_images(model: LoadedModel, options: DataOptions) -> "CTImageSet | MRIImageSet":
    """The images of ``options`` for ``model``'s modality, with the checkpoint's physics as defaults."""
    return open_ct_images(model, options) if model.modality == "ct" else open_mri_images(model, options)


def open_ct_images(model: LoadedModel, options: DataOptions) -> CTImageSet:
    """CT images: built-in phantoms through the low-dose simulation, or the images of ``options.data``."""
    physics = model.physics
    dose = options.dose if options.dose is not None else float(physics.get("dose", 0.25))
    skipped: list[dict[str, str]] = []
    if options.data is None:
        if options.skip_bad:
            raise BlindspotError("--skip-bad", "is for CT series in the LDCT layout (give --data)")
        if not 0 < dose <= 1:
            raise BlindspotError(None, f"--dose must be in (0, 1], got {dose}")
        size = options.size or int((physics.get("image_shape") or [512])[0])
        items = _phantom_items(options.phantoms, size, dose, physics, options.seed)
    else:
        path = Path(options.data)
        if not path.exists():
            raise BlindspotError(path, "no such file or folder")
        want = options.dose if options.dose is not None else physics.get("dose")
        dose = None if want is None else float(want)
        items, skipped = _file_items(path, dose, options.dose is not None, options.skip_bad)
    if options.limit is not None:
        items = items[: options.limit]
    settings = options.settings()
    if skipped:  # what --skip-bad left out is part of the run's identity (run.json)
        settings["skipped"] = skipped
    return CTImageSet(items, dose, settings=settings)


def _phantom_items(n: int, size: int, dose: float, physics: Mapping[str, Any], seed: int) -> list[CTItem]:
    """The low-dose images of the built-in phantom pairs (:class:`~blindspot.data.ct_phantom.PhantomPairs`, the same
    slices and noise the FNAF attack uses) through the checkpoint's scanner at ``size`` (same field of view)."""
    pairs = PhantomPairs(n, scanner_of(physics, (size, size)), dose, seed)
    return [CTItem(f"phantom-{i}-{size}px-dose{dose:g}", (lambda i=i: pairs[i].low)) for i in range(n)]


def _file_items(path: Path, dose: float | None, dose_given: bool,
                skip_bad: bool = False) -> tuple[list[CTItem], list[dict[str, str]]]:
    """CT images of a path: the LDCT layout (its low-dose images, patient-balanced weights), ``.npy`` images in HU
    (a file or a folder), or one DICOM file / series (HU from the rescale tags); and the files ``skip_bad`` left out
    of an LDCT layout (printed on stderr)."""
    if path.is_dir() and ldct.series_folders(path):
        try:
            patients = ldct.find_ldct(path, dose, skip_bad=skip_bad)
        except BlindspotError:
            if dose is None or dose_given:
                raise
            patients = ldct.find_ldct(path, None, skip_bad=skip_bad)  # the model's dose is not there: the only one
        skipped = ldct.report_skipped(patients)
        data = ldct.LDCTDataset(patients, preload=False)
        weights = data.patient_weights()
        return [CTItem(f"{s.patient}:{s.index}", (lambda i=i: _low_and_field(data, i)), float(weights[i]))
                for i, s in enumerate(data.slices)], skipped
    if skip_bad:
        raise BlindspotError("--skip-bad", f"is for CT series in the LDCT layout; {path} is not one")
    npy = [path] if path.suffix.lower() == ".npy" else (
        sorted(p for p in path.rglob("*.npy") if not any(t.startswith(".") for t in p.relative_to(path).parts))
        if path.is_dir() else [])
    if npy:
        return [CTItem(f.name if f == path else str(f.relative_to(path)), (lambda f=f: _read_npy_hu(f)))
                for f in npy], []
    images = ldct.load_ct_images(path)
    return [CTItem(f"{path.name}:{name}", (lambda i=i: (images.hu[i], None if images.field is None else images.field[i])))
            for i, name in enumerate(images.names)], []


def _low_and_field(data: ldct.LDCTDataset, i: int) -> tuple[Tensor, Tensor]:
    low, _, field = data.read(i)
    return torch.from_numpy(np.array(low)).unsqueeze(0), torch.from_numpy(np.array(field)).unsqueeze(0)


def _read_npy_hu(f: Path) -> tuple[Tensor, Tensor]:
    """A ``.npy`` CT image in HU and its field of view; the header (shape, dtype) is checked before reading."""
    from blindspot.data.sample import MAX_SLICE_ELEMENTS

    try:
        arr = np.load(f, mmap_mode="r", allow_pickle=False)  # header only until the data are used
    except (ValueError, OSError, EOFError) as err:
        raise BlindspotError(f, f"not a readable .npy file ({str(err).splitlines()[0] if str(err) else err!r})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number) \
            or np.iscomplexobj(arr):
        what = f"{arr.dtype} of shape {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise BlindspotError(f, f"expected a 2-D real image in HU, got {what}")
    if arr.size > MAX_SLICE_ELEMENTS:
        raise BlindspotError(f, f"declares a {arr.shape[0]}x{arr.shape[1]} image, beyond the limit of "
                             f"{MAX_SLICE_ELEMENTS:.3g} pixels")
    hu = np.array(arr, dtype=np.float32)
    if not np.isfinite(hu).all():
        raise BlindspotError(f, "image contains NaN or Inf")
    field = ldct.field_of_view(hu)  # no padding tag in a .npy: values far below air at the border are the padding
    ldct.check_field(f, field)
    hu = np.where(field, hu, np.float32(ldct.AIR_HU)).astype(np.float32)
    return torch.from_numpy(hu).unsqueeze(0), torch.from_numpy(field).unsqueeze(0)


def open_mri_images(model: LoadedModel, options: DataOptions) -> MRIImageSet:
    """MRI images: the built-in knee phantoms (``options.phantoms`` volumes) or ``options.data``, with masks drawn
    per volume (seeded by file name, as fastMRI) from the options' or the checkpoint's sampling."""
    if options.skip_bad:
        raise BlindspotError("--skip-bad", "is for CT series in the LDCT layout; this is an MRI network")
    phys = model.physics
    mask_type = options.mask_type or phys.get("mask_type") or "random"
    acc = options.acceleration or float((phys.get("accelerations") or [4.0])[0])
    cf = [options.center_fraction] if options.center_fraction else None
    crop = tuple(options.crop) if options.crop else (tuple(phys["crop"]) if phys.get("crop") else None)
    mask_func = create_mask_func(mask_type, [acc], cf)
    if options.data is None:
        geometry = {k: tuple(v) for k, v in (phys.get("phantom") or {}).items() if k in ("shape", "recon_size")}
        if options.size:
            geometry = {"shape": (options.size, options.size), "recon_size": (options.size, options.size)}
        dataset = open_mri_dataset(None, mask_func, crop, volumes=options.phantoms, **geometry)
    else:
        dataset = open_mri_dataset(options.data, mask_func, crop=crop)
    if options.limit is not None:
        dataset = Subset(dataset, range(min(options.limit, len(dataset))))
    return MRIImageSet(dataset, settings=options.settings(), info={"mask_type": mask_type, "acceleration": acc})


def as_image_set(images: "DataOptions | CTImageSet | MRIImageSet", model: LoadedModel) -> "CTImageSet | MRIImageSet":
    source = open_images(model, images) if isinstance(images, DataOptions) else images
    if source.modality != model.modality:
        raise BlindspotError(model.source or None, f"{model.name!r} is made for {model.modality.upper()}; it cannot "
                                                   f"be given {source.modality.upper()} images")
    return source


# ----------------------------------------------------------------------------------------------------------------
# Models and small helpers
# ----------------------------------------------------------------------------------------------------------------
