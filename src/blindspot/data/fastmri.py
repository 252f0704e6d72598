"""fastMRI HDF5 volumes as a slice dataset of :class:`~blindspot.data.sample.MRISample`.

File format (as released by fastMRI; the built-in phantom writer produces the same):

* ``kspace``: single-coil ``(slices, H, W)`` or multi-coil ``(slices, coils, H, W)`` complex (``complex64``) fully
  sampled k-space, phase encoding along ``W``;
* ``reconstruction_esc`` (single-coil) / ``reconstruction_rss`` (multi-coil): ``(slices, h, w)`` float32 targets,
  absent from test sets — the target is then computed as the cropped magnitude (single-coil) or root-sum-of-squares
  (multi-coil) of the fully sampled image;
* ``ismrmrd_header``: ISMRMRD XML. ``encoding/reconSpace/matrixSize`` ``(x, y)`` gives the crop (default 320×320);
  ``encoding/encodingLimits/kspace_encoding_step_1`` ``center`` and ``maximum`` with ``encodedSpace`` ``y`` give the
  acquired columns ``[padding_left, padding_right)`` as in fastMRI (``padding_left = y//2 − center``,
  ``padding_right = padding_left + maximum + 1``);
* attributes ``max`` (the volume's maximum target value, used as SSIM/PSNR data range), ``norm``, ``acquisition``,
  ``patient_id``.

Rules:

* The crop is ``crop`` if given, else the header's reconstruction size, else 320×320; it is then capped to the k-space
  size and to the stored target's size, so every size works.
* Masks are seeded by the volume's name (``fname``: the file name, or its path relative to the root folder when the
  root is a folder with sub-folders), so a volume always gets the same mask, as in fastMRI. Columns outside the
  acquired range ``[padding_left, padding_right)`` are removed from the mask (fastMRI's VarNet transform does the
  same): they hold zero-padding, not measurements. ``mask_padding=False`` keeps the drawn mask.
* ``sample_rate`` keeps that fraction of slices, ``volume_sample_rate`` that fraction of volumes (not both); the
  choice is a seeded shuffle (``seed``), so it is the same on every run.
* Every file is validated when the dataset is built (opens, is HDF5, not truncated, has ``kspace`` of the right
  dimensionality and a complex dtype, a well-formed target and header); every slice is checked for NaN/Inf when read.
  Problems raise :class:`~blindspot.errors.BlindspotError` naming the file (and slice). Nothing is skipped silently.
"""

from __future__ import annotations

import os
import random
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from blindspot.data.sample import MAX_SLICE_ELEMENTS, KspaceTransform, MRISample, check_coil_maps
from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import temporary_sibling
from blindspot.physics.mri import Mask, MaskFunc, Seed, draw_mask
from blindspot.validate import MIN_IMAGE_SIDE, check_crop

SINGLECOIL = "singlecoil"
MULTICOIL = "multicoil"
CHALLENGES = (SINGLECOIL, MULTICOIL)
#: The stored reconstruction used as target for each challenge.
TARGET_KEYS = {SINGLECOIL: "reconstruction_esc", MULTICOIL: "reconstruction_rss"}
#: fastMRI's evaluation crop, used when neither ``crop`` nor a header gives one.
DEFAULT_CROP = (320, 320)
HDF5_SUFFIXES = (".h5", ".hdf5")
ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"
#: File attributes copied into every sample's ``attrs``.
ATTRIBUTE_KEYS = ("max", "norm", "acquisition", "patient_id")


# ------------------------------------------------------------------------------------------------------------------
# ISMRMRD header
# ------------------------------------------------------------------------------------------------------------------
def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _xml_find(root: ET.Element, path: Sequence[str]) -> ET.Element | None:
    """The first element below ``root`` along ``path`` of local tag names (namespace ignored)."""
    node: ET.Element | None = root
    for name in path:
        if node is None:
            return None
        node = next((child for child in node if _local(child.tag) == name), None)
    return node


def _xml_int(root: ET.Element, path: Sequence[str], source: Path) -> int | None:
    node = _xml_find(root, path)
    if node is None or node.text is None:
        return None
    try:
        return int(float(node.text.strip()))
    except ValueError:
        raise BlindspotError(source, f"ismrmrd_header: {'/'.join(path)} is {node.text.strip()!r}, not a number") from None


@dataclass(frozen=True)
class HeaderInfo:
    """What blindspot uses from an ISMRMRD header; ``None`` where the header lacks the element.

    Attributes:
        encoding_size: ``encodedSpace/matrixSize`` ``(x, y, z)``.
        recon_size: ``reconSpace/matrixSize`` ``(x, y, z)``; ``(x, y)`` is the default crop ``(h, w)``.
        kspace_center: ``encodingLimits/kspace_encoding_step_1/center``.
        kspace_maximum: ``encodingLimits/kspace_encoding_step_1/maximum``.
    """

    encoding_size: tuple[int, int, int] | None = None
    recon_size: tuple[int, int, int] | None = None
    kspace_center: int | None = None
    kspace_maximum: int | None = None

    def padding(self, width: int) -> tuple[int, int]:
        """fastMRI's acquired column range ``[left, right)`` for k-space ``width`` columns (the whole width if unknown)."""
        if self.encoding_size is None or self.kspace_center is None or self.kspace_maximum is None:
            return 0, width
        left = self.encoding_size[1] // 2 - self.kspace_center
        return left, left + self.kspace_maximum + 1


def parse_ismrmrd_header(xml: bytes | str, source: PathLike) -> HeaderInfo:
    """Parse the parts of an ISMRMRD XML header that fastMRI uses (see :class:`HeaderInfo`).

    Raises:
        BlindspotError: the XML is malformed or a used element is not a number.
    """
    source = Path(source)
    if isinstance(xml, np.ndarray):
        xml = xml.item() if xml.shape == () else bytes(xml.tobytes())
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise BlindspotError(source, f"ismrmrd_header is not valid XML ({err})") from None

    def size(space: str) -> tuple[int, int, int] | None:
        values = [_xml_int(root, ["encoding", space, "matrixSize", axis], source) for axis in ("x", "y", "z")]
        if values[0] is None or values[1] is None:
            return None
        return (values[0], values[1], values[2] if values[2] is not None else 1)

    limits = ["encoding", "encodingLimits", "kspace_encoding_step_1"]
    return HeaderInfo(
        encoding_size=size("encodedSpace"),
        recon_size=size("reconSpace"),
        kspace_center=_xml_int(root, limits + ["center"], source),
        kspace_maximum=_xml_int(root, limits + ["maximum"], source),
    )


def ismrmrd_header_xml(
    encoding_size: tuple[int, int, int],
    recon_size: tuple[int, int, int],
    kspace_center: int | None = None,
    kspace_maximum: int | None = None,
) -> bytes:
    """A minimal ISMRMRD XML header with the fields fastMRI (and :func:`parse_ismrmrd_header`) reads.

    ``kspace_center`` / ``kspace_maximum`` default to a fully acquired width ``encoding_size[1]``
    (centre ``y // 2``, maximum ``y − 1``).
    """
    ex, ey, ez = (int(v) for v in encoding_size)
    rx, ry, rz = (int(v) for v in recon_size)
    center = ey // 2 if kspace_center is None else int(kspace_center)
    maximum = ey - 1 if kspace_maximum is None else int(kspace_maximum)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<ismrmrdHeader xmlns="{ISMRMRD_NAMESPACE}"><encoding>'
        f"<encodedSpace><matrixSize><x>{ex}</x><y>{ey}</y><z>{ez}</z></matrixSize></encodedSpace>"
        f"<reconSpace><matrixSize><x>{rx}</x><y>{ry}</y><z>{rz}</z></matrixSize></reconSpace>"
        "<encodingLimits><kspace_encoding_step_1>"
        f"<minimum>0</minimum><maximum>{maximum}</maximum><center>{center}</center>"
        "</kspace_encoding_step_1></encodingLimits>"
        "</encoding></ismrmrdHeader>"
    ).encode("utf-8")


def write_fastmri_h5(
    path: PathLike,
    kspace: np.ndarray,
    target: np.ndarray | None = None,
    *,
    header: bytes | None = None,
    attrs: Mapping[str, Any] | None = None,
    target_key: str | None = None,
    with_header: bool = True,
) -> Path:
    """Write one fastMRI-format volume atomically (temporary file + rename).

    Args:
        path: destination ``.h5`` file.
        kspace: complex ``(slices, H, W)`` (single-coil) or ``(slices, coils, H, W)`` (multi-coil); stored complex64.
        target: ``(slices, h, w)`` reconstruction, stored float32 under ``target_key`` (default: the challenge's key).
        header: ISMRMRD XML (default: :func:`ismrmrd_header_xml` with the k-space size and a 320×320 crop capped to it).
        with_header: write ``ismrmrd_header`` at all (test sets of other tools may lack it).
        attrs: file attributes (``max``, ``norm``, ``acquisition``, ``patient_id``, …).
    """
    path = Path(path)
    kspace = np.asarray(kspace)
    challenge = SINGLECOIL if kspace.ndim == 3 else MULTICOIL
    H, W = kspace.shape[-2:]
    if header is None:
        header = ismrmrd_header_xml((H, W, 1), (min(DEFAULT_CROP[0], H), min(DEFAULT_CROP[1], W), 1))
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_sibling(path)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as hf:
            hf.create_dataset("kspace", data=kspace.astype(np.complex64, copy=False))
            if target is not None:
                hf.create_dataset(target_key or TARGET_KEYS[challenge], data=np.asarray(target, dtype=np.float32))
            if with_header:
                hf.create_dataset("ismrmrd_header", data=np.bytes_(header))
            for key, value in (attrs or {}).items():
                hf.attrs[key] = value
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------------------------------
# Volumes
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeInfo:
    """A validated fastMRI volume (metadata only; no pixel data is held).

    Attributes:
        path: the HDF5 file.
        fname: the volume's name: mask seed and sample identity (``fname:slice``).
        challenge: ``"singlecoil"`` or ``"multicoil"``.
        kspace_shape: the ``kspace`` dataset's shape, ``(slices, H, W)`` or ``(slices, coils, H, W)``.
        target_key: the stored target's key, or ``None`` (targets are computed).
        target_shape: ``(slices, h, w)`` of the stored target, or ``None``.
        header: the parsed ISMRMRD header (all ``None`` when the file has none).
        crop: the effective ``(h, w)`` crop of inputs and targets (see module docs).
        padding: acquired columns ``[left, right)`` (the full width when unknown or out of range).
        attrs: the file attributes (``max``, ``norm``, ``acquisition``, ``patient_id``, and any others).
    """

    path: Path
    fname: str
    challenge: str
    kspace_shape: tuple[int, ...]
    target_key: str | None
    target_shape: tuple[int, ...] | None
    header: HeaderInfo
    crop: tuple[int, int]
    padding: tuple[int, int]
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def num_slices(self) -> int:
        return int(self.kspace_shape[0])

    @property
    def num_coils(self) -> int:
        return int(self.kspace_shape[1]) if len(self.kspace_shape) == 4 else 1

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.kspace_shape[-2]), int(self.kspace_shape[-1])


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _h5_open_problem(err: OSError) -> str:
    text = str(err)
    inner = re.search(r"\((.*)\)\s*$", text)
    detail = inner.group(1) if inner else text
    if "file signature not found" in text:
        return "not an HDF5 file (no HDF5 signature)"
    if "truncated file" in text:
        return f"truncated HDF5 file ({detail})"
    return f"cannot open as HDF5 ({detail})"


def open_h5(path: PathLike):
    """Open an HDF5 file read-only, turning a missing, non-HDF5 or truncated file into one line."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise BlindspotError(path, "no such file")
    if path.is_dir():
        raise BlindspotError(path, "is a folder, expected an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise BlindspotError(path, _h5_open_problem(err)) from None


def _check_dataset(hf, key: str, path: Path):
    import h5py

    obj = hf.get(key)
    if obj is None:
        return None
    if not isinstance(obj, h5py.Dataset):
        raise BlindspotError(path, f"'{key}' is an HDF5 group, expected a dataset")
    return obj


def check_slice_size(path: PathLike, key: str, shape: Sequence[int]) -> None:
    """Raise :class:`BlindspotError` naming ``path`` when one slice of dataset ``key`` (``shape[1:]``) declares more
    than :data:`MAX_SLICE_ELEMENTS` elements — checked from the header, before any array is allocated."""
    n = int(np.prod([int(d) for d in shape[1:]], dtype=object))
    if n > MAX_SLICE_ELEMENTS:
        raise BlindspotError(path, f"{key} declares slices of {'x'.join(str(int(d)) for d in shape[1:])} = {n:.3g} "
                             f"elements, beyond the limit of {MAX_SLICE_ELEMENTS:.3g}")


def read_volume_info(
    path: PathLike, fname: str | None = None, challenge: str | None = None, crop: tuple[int, int] | None = None
) -> VolumeInfo:
    """Open and validate one fastMRI file; return its metadata (see :class:`VolumeInfo`).

    Args:
        path: the ``.h5`` file.
        fname: the volume's name (default: the file name).
        challenge: ``"singlecoil"`` / ``"multicoil"``, or ``None`` to take it from the k-space dimensionality.
        crop: requested ``(h, w)``; ``None`` → the header's reconstruction size, else 320×320.
    Raises:
        BlindspotError: naming the file — not HDF5, truncated, missing ``kspace``, wrong dimensionality or dtype,
        bad target, bad header, bad ``max`` attribute.
    """
    path = Path(path)
    if challenge is not None and challenge not in CHALLENGES:
        raise BlindspotError(None, f"unknown challenge {challenge!r}; choose from {list(CHALLENGES)}")
    with open_h5(path) as hf:
        try:
            kspace = _check_dataset(hf, "kspace", path)
            if kspace is None:
                keys = ", ".join(sorted(hf.keys())) or "none"
                raise BlindspotError(path, f"missing key 'kspace' (keys present: {keys})")
            shape = tuple(int(s) for s in kspace.shape)
            if len(shape) not in (3, 4):
                raise BlindspotError(
                    path,
                    f"kspace has {len(shape)} dimensions {shape}; expected (slices, H, W) for single-coil "
                    "or (slices, coils, H, W) for multi-coil",
                )
            found = SINGLECOIL if len(shape) == 3 else MULTICOIL
            if challenge is not None and challenge != found:
                expected = "(slices, H, W)" if challenge == SINGLECOIL else "(slices, coils, H, W)"
                raise BlindspotError(
                    path, f"kspace has shape {shape} ({found}) but challenge {challenge} expects {expected}"
                )
            if not np.issubdtype(kspace.dtype, np.complexfloating):
                raise BlindspotError(path, f"kspace dtype {kspace.dtype} is not complex")
            if min(shape) < 1:
                raise BlindspotError(path, f"kspace has an empty dimension {shape}")
            check_slice_size(path, "kspace", shape)

            target_key = TARGET_KEYS[found]
            target = _check_dataset(hf, target_key, path)
            target_shape = None
            if target is not None:
                target_shape = tuple(int(s) for s in target.shape)
                if len(target_shape) != 3 or target_shape[0] != shape[0] or min(target_shape) < 1:
                    raise BlindspotError(
                        path,
                        f"{target_key} has shape {target_shape}; expected ({shape[0]}, h, w) to match kspace {shape}",
                    )
                if not np.issubdtype(target.dtype, np.floating):
                    raise BlindspotError(path, f"{target_key} dtype {target.dtype} is not a real floating type")
                check_slice_size(path, target_key, target_shape)
            else:
                target_key = None

            header_ds = _check_dataset(hf, "ismrmrd_header", path)
            header = parse_ismrmrd_header(header_ds[()], path) if header_ds is not None else HeaderInfo()
            attrs = {str(k): _attr_value(v) for k, v in hf.attrs.items()}
        except BlindspotError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise BlindspotError(path, f"corrupt HDF5 file ({type(err).__name__}: {err})") from None

    for key in ("max", "norm"):
        if key in attrs:
            try:
                value = float(attrs[key])
            except (TypeError, ValueError):
                raise BlindspotError(path, f"attribute '{key}' is {attrs[key]!r}, not a number") from None
            if not np.isfinite(value) or value <= 0:
                raise BlindspotError(path, f"attribute '{key}' is {value}, expected a positive finite number")
            attrs[key] = value

    H, W = shape[-2:]
    if min(H, W) < MIN_IMAGE_SIDE:
        raise BlindspotError(path, f"k-space of {H}x{W} is smaller than the {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} "
                             "minimum any network here accepts")
    if crop is not None:
        want = (int(crop[0]), int(crop[1]))
        if min(want) < MIN_IMAGE_SIDE:
            raise BlindspotError(None, f"crop {want[0]}x{want[1]} is smaller than the {MIN_IMAGE_SIDE}x"
                                 f"{MIN_IMAGE_SIDE} minimum any network here accepts")
        for cap in [(H, W)] + ([target_shape[1:]] if target_shape is not None else []):
            check_crop(want, cap, path)  # what is cropped is what is recorded: never capped silently
    elif header.recon_size is not None:
        want = (header.recon_size[0], header.recon_size[1])
    else:
        want = DEFAULT_CROP
    caps = [(H, W)] + ([target_shape[1:]] if target_shape is not None else [])
    eff = (min([want[0]] + [c[0] for c in caps]), min([want[1]] + [c[1] for c in caps]))
    if min(eff) < 1:
        raise BlindspotError(path, f"crop {want} from the header is not a positive size")
    left, right = header.padding(W)
    padding = (left, right) if 0 <= left < right <= W else (0, W)
    return VolumeInfo(
        path=path,
        fname=fname or path.name,
        challenge=found,
        kspace_shape=shape,
        target_key=target_key,
        target_shape=target_shape,
        header=header,
        crop=eff,
        padding=padding,
        attrs=attrs,
    )


def find_hdf5_files(root: PathLike) -> list[tuple[Path, str]]:
    """``(path, fname)`` of the HDF5 files under ``root`` (a file, or a folder searched recursively), sorted.

    ``fname`` is the path relative to the folder (just the file name for files directly in it). Hidden files are
    ignored; any other visible file in the folder is an error (a fastMRI folder holds only ``.h5`` files).
    """
    root = Path(root)
    if not root.exists():
        raise BlindspotError(root, "no such file or folder")
    if root.is_file():
        return [(root, root.name)]
    found: list[tuple[Path, str]] = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.suffix.lower() not in HDF5_SUFFIXES:
            raise BlindspotError(p, "not an HDF5 (.h5) file; a fastMRI folder must hold only .h5 files")
        found.append((p, rel.as_posix()))
    if not found:
        raise BlindspotError(root, "empty folder: no .h5 files")
    return found


class _PaddedMask:
    """Wraps a mask function and removes the columns outside ``[left, right)`` from every mask it draws."""

    def __init__(self, inner: MaskFunc, left: int, right: int):
        self.inner, self.left, self.right = inner, left, right
        self.two_dimensional = bool(getattr(inner, "two_dimensional", False))

    def __call__(self, width: int, seed: Seed = None, height: int | None = None) -> Mask:
        drawn = draw_mask(self.inner, width, height or 0, seed)
        mask = drawn.mask.clone()
        mask[..., : self.left] = 0
        mask[..., self.right :] = 0
        return Mask(mask, drawn.acceleration, drawn.center_fraction, drawn.num_low_frequencies, drawn.calibration)

    def __repr__(self) -> str:
        return f"{self.inner!r} on columns [{self.left}, {self.right})"


def _nonfinite_problem(array: np.ndarray, what: str) -> str | None:
    finite = np.isfinite(array)
    if finite.all():
        return None
    nan = int(np.isnan(array).sum())
    inf = int(array.size - finite.sum()) - nan
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    return f"{what} contains {' and '.join(p for p in parts if p)} values"


class FastMRISliceDataset(Dataset):
    """Slices of fastMRI HDF5 volumes as :class:`~blindspot.data.sample.MRISample` (see the module docs for rules).

    Args:
        root: one ``.h5`` file or a folder of them (searched recursively; hidden files ignored).
        mask_func: draws the under-sampling mask; ``None`` → fully sampled (input = zero-filled full k-space).
        challenge: ``"singlecoil"`` / ``"multicoil"``; ``None`` → each file's from its k-space dimensionality.
        crop: ``(h, w)`` of inputs and targets; ``None`` → each file's header (else 320×320); capped per file.
        sample_rate: fraction of slices kept (seeded choice).
        volume_sample_rate: fraction of volumes kept (seeded choice); not together with ``sample_rate < 1``.
        use_seed: seed each volume's mask with its ``fname`` (fastMRI); else the mask function's own generator.
        seed: seed of the slice / volume sampling.
        mask_padding: remove columns outside the header's acquired range from the mask.
        progress: tqdm bar while validating files (``None``: only on a terminal).
        coil_maps: multi-coil volumes only: estimate each slice's coil sensitivities (``"full"`` from the fully
            sampled coil images, ``"lowres"`` / ``"espirit"`` from the auto-calibration columns of the masked k-space;
            :class:`~blindspot.data.sample.KspaceTransform`) into ``sample.sens_maps``; ``None``: none. Too few
            calibration columns for the estimator is an error naming the file and slice.
        kspace: keep each slice's masked k-space in ``sample.kspace`` (for k-space networks such as VarNet).

    Items are :class:`MRISample` with ``input``/``target`` ``(1, h, w)`` float32, ``mask`` ``(1, W)``,
    ``max_value`` = the file's ``max`` attribute (else the stored target volume's maximum, else the slice's).
    """

    def __init__(
        self,
        root: PathLike,
        mask_func: MaskFunc | None = None,
        challenge: str | None = None,
        crop: tuple[int, int] | None = None,
        sample_rate: float = 1.0,
        volume_sample_rate: float | None = None,
        use_seed: bool = True,
        seed: int = 0,
        mask_padding: bool = True,
        progress: bool | None = None,
        coil_maps: str | None = None,
        kspace: bool = False,
    ) -> None:
        self.root = Path(root)
        self.coil_maps = check_coil_maps(coil_maps)
        self.keep_kspace = bool(kspace)
        self.mask_func = mask_func
        self.challenge = challenge
        self.use_seed = use_seed
        self.mask_padding = mask_padding
        sample_rate = 1.0 if sample_rate is None else float(sample_rate)
        if not 0.0 < sample_rate <= 1.0:
            raise BlindspotError(None, f"sample_rate must be in (0, 1], got {sample_rate}")
        if volume_sample_rate is not None:
            volume_sample_rate = float(volume_sample_rate)
            if not 0.0 < volume_sample_rate <= 1.0:
                raise BlindspotError(None, f"volume_sample_rate must be in (0, 1], got {volume_sample_rate}")
            if sample_rate < 1.0:
                raise BlindspotError(None, "give sample_rate (slices) or volume_sample_rate (volumes), not both")

        files = find_hdf5_files(self.root)
        self.volumes: list[VolumeInfo] = [
            read_volume_info(path, fname, challenge, crop)
            for path, fname in tqdm(files, desc="checking HDF5 files", unit="file", disable=_disable(progress))
        ]
        rng = random.Random(seed)
        keep_volumes = list(range(len(self.volumes)))
        if volume_sample_rate is not None and volume_sample_rate < 1.0:
            rng.shuffle(keep_volumes)
            keep_volumes = sorted(keep_volumes[: round(len(keep_volumes) * volume_sample_rate)])
        samples = [(v, s) for v in keep_volumes for s in range(self.volumes[v].num_slices)]
        if sample_rate < 1.0:
            order = list(range(len(samples)))
            rng.shuffle(order)
            samples = [samples[i] for i in sorted(order[: round(len(samples) * sample_rate)])]
        if not samples:
            raise BlindspotError(
                self.root,
                f"sampling keeps no slice (sample_rate={sample_rate}, volume_sample_rate={volume_sample_rate})",
            )
        self.samples: list[tuple[int, int]] = samples
        self._volume_max: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_volumes(self) -> int:
        """Volumes that contribute at least one slice."""
        return len({v for v, _ in self.samples})

    def read_slice(self, index: int) -> tuple[VolumeInfo, int, np.ndarray, np.ndarray | None]:
        """Raw data of item ``index``: ``(volume, slice_num, kspace, target)``.

        ``kspace`` is complex64 ``(H, W)`` or ``(coils, H, W)``; ``target`` float32 ``(h, w)`` or ``None``.

        Raises:
            BlindspotError: naming the file and slice — unreadable data, NaN/Inf in k-space or target.
        """
        v, s = self.samples[index]
        vol = self.volumes[v]
        with open_h5(vol.path) as hf:
            try:
                kspace = np.asarray(hf["kspace"][s])
                target = np.asarray(hf[vol.target_key][s]) if vol.target_key else None
            except (OSError, KeyError, ValueError, TypeError) as err:
                raise BlindspotError(vol.path, f"slice {s}: cannot read data ({type(err).__name__}: {err})") from None
        problem = _nonfinite_problem(kspace, "k-space")
        if problem is None and target is not None:
            problem = _nonfinite_problem(target, vol.target_key)
        if problem is None and not kspace.any():
            problem = "k-space is all zero (no signal: every metric of it would be meaningless)"
        if problem is None and target is not None and float(target.max()) == float(target.min()):
            problem = f"{vol.target_key} is constant ({float(target.max()):g}): no image to reconstruct or score"
        if problem is not None:
            raise BlindspotError(vol.path, f"slice {s}: {problem}")
        return vol, s, kspace.astype(np.complex64, copy=False), None if target is None else target.astype(np.float32)

    def _max_value(self, v: int) -> float | None:
        vol = self.volumes[v]
        if "max" in vol.attrs:
            return float(vol.attrs["max"])
        if vol.target_key is None:
            return None
        if v not in self._volume_max:
            with open_h5(vol.path) as hf:
                try:  # slice by slice: peak memory one slice, whatever the volume declares
                    ds = hf[vol.target_key]
                    value = max(float(np.nanmax(ds[i])) for i in range(ds.shape[0]))
                except (OSError, ValueError) as err:
                    raise BlindspotError(vol.path, f"cannot read {vol.target_key} ({err})") from None
            if not (np.isfinite(value) and value > 0):
                raise BlindspotError(vol.path, f"{vol.target_key} has maximum {value:g}: an all-zero or negative "
                                     "volume has no data range for SSIM / PSNR")
            self._volume_max[v] = value
        return self._volume_max[v]

    def transform_for(self, vol: VolumeInfo) -> KspaceTransform:
        """The :class:`KspaceTransform` of a volume (its crop, its acquired-column mask)."""
        mask_func = self.mask_func
        if mask_func is not None and self.mask_padding and vol.padding != (0, vol.image_size[1]):
            mask_func = _PaddedMask(mask_func, *vol.padding)
        return KspaceTransform(mask_func, crop=vol.crop, use_seed=self.use_seed, coil_maps=self.coil_maps,
                               kspace=self.keep_kspace)

    def __getitem__(self, index: int) -> MRISample:
        vol, s, kspace, target = self.read_slice(index)
        attrs = {key: vol.attrs[key] for key in ATTRIBUTE_KEYS if key in vol.attrs}
        attrs.update(challenge=vol.challenge, padding=vol.padding, crop=vol.crop, path=str(vol.path))
        return self.transform_for(vol)(
            torch.from_numpy(kspace),
            None if target is None else torch.from_numpy(target),
            vol.fname,
            s,
            max_value=self._max_value(self.samples[index][0]),
            attrs=attrs,
        )

    def check(self, progress: bool | None = None) -> int:
        """Read every slice (k-space and target) and raise on the first bad one; returns the number read."""
        for i in tqdm(range(len(self)), desc="reading slices", unit="slice", disable=_disable(progress)):
            self.read_slice(i)
        return len(self)

    def summary(self) -> dict[str, Any]:
        """Counts, shapes, challenges and attributes, as plain JSON-able values."""
        used = sorted({v for v, _ in self.samples})
        vols = [self.volumes[v] for v in used]

        def counts(values) -> dict[str, int]:
            out: dict[str, int] = {}
            for value in values:
                out[str(value)] = out.get(str(value), 0) + 1
            return dict(sorted(out.items()))

        maxima = [float(v.attrs["max"]) for v in vols if "max" in v.attrs]
        return {
            "kind": "fastmri",
            "root": str(self.root),
            "volumes": len(vols),
            "slices": len(self.samples),
            "challenge": counts(v.challenge for v in vols),
            "kspace_shape": counts("x".join(map(str, v.kspace_shape[1:])) for v in vols),
            "crop": counts(f"{v.crop[0]}x{v.crop[1]}" for v in vols),
            "target": counts(v.target_key or "computed" for v in vols),
            "acquisition": counts(v.attrs.get("acquisition", "unknown") for v in vols),
            "patients": len({v.attrs["patient_id"] for v in vols if "patient_id" in v.attrs}),
            "max": [min(maxima), max(maxima)] if maxima else None,
        }


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
