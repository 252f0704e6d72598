"""Generic DICOM reading: one image, a folder of files, a sorted series — with one-line errors for bad files.

This module knows nothing about MRI or CT; the MRI image loader (:mod:`blindspot.data.images`) and the CT loaders
build on it. Every problem a user's file can have is raised as :class:`~blindspot.errors.BlindspotError` naming the
file:

* not a DICOM file (no ``DICM`` marker at byte 128 — files without the Part 10 preamble are not accepted);
* a truncated file (pydicom reads those with a warning, or with short element values; both are caught here);
* no pixel data (``PixelData``, ``FloatPixelData`` and ``DoubleFloatPixelData`` all count as pixel data);
* compressed pixel data whose transfer syntax has no decoder installed (the message names the transfer syntax and
  the packages that would decode it);
* several frames where a single 2-D image is expected;
* within a series: images of different sizes, several series mixed in one folder, two images at the same position.

Compressed transfer syntaxes decode through pydicom's pixel-data plugins: JPEG baseline / extended (pylibjpeg-libjpeg
or Pillow), JPEG lossless (pylibjpeg-libjpeg), JPEG-LS (pyjpegls or pylibjpeg), JPEG 2000 and HTJ2K
(pylibjpeg-openjpeg or Pillow) and RLE lossless (pydicom itself).

Pixel values are returned as ``float32`` after the *modality* transform: ``value · RescaleSlope + RescaleIntercept``
when either tag is present (CT Hounsfield units), or the Modality LUT Sequence when that is present instead. No VOI
(window) transform is applied. Colour images (``SamplesPerPixel == 3``) are converted to RGB by pydicom and then to
luminance ``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601); ``MONOCHROME1`` images are returned as stored (their
``photometric`` field tells the caller that low values display bright). :func:`pixel_padding_mask` says which pixels
are the file's ``PixelPaddingValue`` (``PixelPaddingRangeLimit``) padding — the outside of a CT scanner's circular
field of view. Headers are checked before pixels are decoded or allocated (:func:`check_declared_size`: rows ×
columns × frames × samples at most :data:`~blindspot.data.sample.MAX_SLICE_ELEMENTS`).

Example::

    image = read_dicom("scan/IM0001.dcm")
    image.pixels            # (H, W) float32, e.g. HU for CT
    volume, datasets = read_dicom_series("scan/")   # (N, H, W) float32, sorted along the slice normal
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from blindspot.errors import BlindspotError, PathLike

#: File names that are DICOM index files (no image), skipped by :func:`list_dicom_files`.
INDEX_FILE_NAMES = frozenset({"DICOMDIR"})

_PIXEL_DATA_TAG = 0x7FE00010
_SEQUENCE_DELIMITER_ITEM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0, little endian
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class DicomImage:
    """One decoded single-frame DICOM image.

    Attributes:
        path: the file it came from.
        pixels: ``(H, W)`` float32 after the modality transform (e.g. HU for CT; raw stored values for most MR).
        dataset: the pydicom ``Dataset`` (pixel data included, not yet decoded by pydicom's cache).
        rescaled: whether ``RescaleSlope`` / ``RescaleIntercept`` (or a Modality LUT Sequence) were present and applied.
        slope: the rescale slope applied (1.0 when absent).
        intercept: the rescale intercept applied (0.0 when absent).
        transfer_syntax: the transfer syntax UID (``pydicom.uid.UID``; ``.name`` is human readable).
        compressed: whether the pixel data was compressed (encapsulated).
        photometric: the Photometric Interpretation (``MONOCHROME2``, ``MONOCHROME1``, ``RGB``, ``YBR_FULL_422``, …).
        from_color: whether a colour image was converted to luminance.
    """

    path: Path
    pixels: np.ndarray
    dataset: "object"
    rescaled: bool
    slope: float
    intercept: float
    transfer_syntax: "object"
    compressed: bool
    photometric: str
    from_color: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))

    @property
    def modality(self) -> str:
        return str(getattr(self.dataset, "Modality", ""))


# ------------------------------------------------------------------------------------------------------------------
# Recognising and opening files
# ------------------------------------------------------------------------------------------------------------------
def is_dicom_file(path: PathLike) -> bool:
    """Whether ``path`` is a file with the DICOM Part 10 marker (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def list_dicom_files(folder: PathLike, recursive: bool = False) -> list[Path]:
    """The DICOM files in ``folder``, sorted by path.

    A file counts as DICOM when it has the ``DICM`` marker, whatever its extension (series are often stored without
    one). Hidden files and index files (``DICOMDIR``) are skipped. Other files are ignored by this function; callers
    that must not ignore them (e.g. :class:`~blindspot.data.images.ImageDataset`) check them separately.

    Raises:
        BlindspotError: ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BlindspotError(folder, "not a folder")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = [
        p
        for p in candidates
        if p.is_file() and _visible(p, folder) and p.name not in INDEX_FILE_NAMES and is_dicom_file(p)
    ]
    return sorted(files)


class _PydicomLog(logging.Handler):
    """Collects what pydicom logs while reading one file (some corruption is only logged, not raised)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _transfer_syntax(ds, path: Path):
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts is None:
        raise BlindspotError(path, "no Transfer Syntax UID in the file meta information (truncated or corrupt file?)")
    ts = UID(str(ts))
    if not ts.is_transfer_syntax:
        raise BlindspotError(path, f"unknown Transfer Syntax UID {str(ts)!r} (corrupt file, or a private syntax)")
    return ts


def open_dicom(path: PathLike, stop_before_pixels: bool = False):
    """Read a DICOM file into a pydicom ``Dataset`` (pixel data not decoded), turning every failure into one line.

    Args:
        path: the file.
        stop_before_pixels: stop reading at the pixel data (a header-only read; truncation inside the pixel data
            is then not detected).
    Raises:
        BlindspotError: missing, unreadable, not DICOM, truncated or corrupt.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.exists():
        raise BlindspotError(path, "no such file")
    if path.is_dir():
        raise BlindspotError(path, "is a folder, expected a DICOM file")
    if not is_dicom_file(path):
        size = path.stat().st_size
        if size < 132:
            raise BlindspotError(path, f"not a DICOM file (only {size} bytes, no 'DICM' marker at byte 128)")
        raise BlindspotError(path, "not a DICOM file (no 'DICM' marker at byte 128)")
    log = _PydicomLog()
    logger = logging.getLogger("pydicom")
    logger.addHandler(log)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
            except InvalidDicomError as err:
                raise BlindspotError(path, f"not a valid DICOM file ({err})") from None
            except Exception as err:  # pydicom raises many types (EOFError, BytesLengthException, …) for corrupt files
                raise BlindspotError(path, f"corrupt or truncated DICOM file ({type(err).__name__}: {err})") from None
    finally:
        logger.removeHandler(log)
    for text in [str(w.message) for w in caught] + log.messages:
        if "End of file" in text or "EOF" in text or "truncat" in text.lower():
            raise BlindspotError(path, f"truncated DICOM file ({text.split(' in file ')[0]})")
        if "after undefined length delimiter" in text:  # the file ends inside the last delimiter item
            raise BlindspotError(path, f"corrupt or truncated DICOM file ({text})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about odd values when converting them lazily
        ts = _transfer_syntax(ds, path)
    if len(ds):
        last = ds.get_item(list(ds.keys())[-1])
        length, tell = getattr(last, "length", None), getattr(last, "value_tell", None)
        if length is not None and tell is not None and length != 0xFFFFFFFF and tell + length > path.stat().st_size:
            raise BlindspotError(path, f"truncated DICOM file (element {last.tag} ends past the end of the file)")
    if not stop_before_pixels and ts.is_encapsulated and len(ds) and list(ds.keys())[-1] == _PIXEL_DATA_TAG:
        # encapsulated pixel data as the last element must end with the sequence delimiter item; pydicom accepts
        # a file cut inside that item silently
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 8))
            if fh.read(8) != _SEQUENCE_DELIMITER_ITEM:
                raise BlindspotError(path, "truncated DICOM file (the pixel data's sequence delimiter is cut off)")
    return ds


def _frames(ds) -> int:
    try:
        return int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def check_pixel_data(ds, path: PathLike, single_frame: bool = True) -> None:
    """Raise if ``ds`` cannot give a 2-D image: no pixel data, no decoder for its transfer syntax, several frames.

    Cheap: nothing is decoded. Use it to validate a whole data set before reading any pixels.
    """
    from pydicom.pixels import get_decoder

    path = Path(path)
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise BlindspotError(path, "no pixel data (no image in this file; if there should be one, it is truncated)")
    for key in ("Rows", "Columns"):
        if key not in ds:
            raise BlindspotError(path, f"pixel data without the {key} element (corrupt file?)")
    ts = _transfer_syntax(ds, path)
    label = f"{ts.name} ({ts})" if ts.name != str(ts) else str(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise BlindspotError(path, f"compressed pixel data in transfer syntax {label}, which no decoder supports") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin registered"
        raise BlindspotError(
            path, f"compressed pixel data in transfer syntax {label} but no decoder is available ({missing})"
        )
    if single_frame and _frames(ds) > 1:
        raise BlindspotError(path, f"multi-frame image ({_frames(ds)} frames) where a single 2-D image is expected")
    check_declared_size(ds, path)


def check_declared_size(ds, path: PathLike) -> None:
    """Raise :class:`BlindspotError` naming ``path`` when the header declares an empty image or more than
    :data:`~blindspot.data.sample.MAX_SLICE_ELEMENTS` values (rows × columns × frames × samples per pixel),
    before any pixel data is decoded or allocated."""
    from blindspot.data.sample import MAX_SLICE_ELEMENTS

    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError, AttributeError):
        raise BlindspotError(path, "Rows / Columns / SamplesPerPixel are not integers (corrupt header?)") from None
    frames = _frames(ds)
    if min(rows, cols, frames, samples) < 1:
        raise BlindspotError(path, f"header declares an empty image ({rows} rows x {cols} columns, {frames} frames)")
    total = rows * cols * frames * samples
    if total > MAX_SLICE_ELEMENTS:
        raise BlindspotError(path, f"header declares {rows}x{cols} pixels x {frames} frames x {samples} samples = "
                             f"{total:.3g} values, beyond the limit of {MAX_SLICE_ELEMENTS:.3g}")


def _modality_transform(ds, stored: np.ndarray) -> tuple[np.ndarray, bool, float, float]:
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0) if "RescaleSlope" in ds else 1.0
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0) if "RescaleIntercept" in ds else 0.0
        return (stored.astype(np.float64) * slope + intercept).astype(np.float32), True, slope, intercept
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32), True, 1.0, 0.0
    return stored.astype(np.float32), False, 1.0, 0.0


def pixel_padding_mask(ds, pixels: np.ndarray) -> np.ndarray | None:
    """Where ``pixels`` (``(H, W)`` after the modality transform, as :func:`read_dicom` returns them) hold the
    file's *pixel padding* (DICOM PS3.3 C.7.5.1.1.2): bool ``(H, W)``, ``True`` = padding, or ``None`` when the
    file declares no ``PixelPaddingValue``.

    ``PixelPaddingValue`` alone marks pixels equal to it; with ``PixelPaddingRangeLimit`` every value between the
    two (inclusive) is padding. Both are stored values, so they are mapped through the same rescale as the pixels
    (float32 results of the same arithmetic, so the comparison is exact). Scanners store the area outside a
    circular reconstruction field this way, typically at −2000 or −3024 HU.
    """
    if "PixelPaddingValue" not in ds or ds.PixelPaddingValue is None:
        return None

    signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1

    def stored(value) -> float | None:
        if isinstance(value, bytes):  # an ambiguous US/SS value left raw
            return float(int.from_bytes(value[:2], "little", signed=signed)) if len(value) >= 2 else None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0] if len(value) else None
        try:
            return None if value is None else float(value)
        except (TypeError, ValueError):
            return None

    first = stored(ds.PixelPaddingValue)
    if first is None:
        return None
    limit = stored(getattr(ds, "PixelPaddingRangeLimit", None)) if "PixelPaddingRangeLimit" in ds else None
    ends = np.asarray([first] if limit is None else [first, limit], dtype=np.float64)
    mapped, _, _, _ = _modality_transform(ds, ends)
    if limit is None:
        return pixels == mapped[0]
    lo, hi = float(mapped.min()), float(mapped.max())
    return (pixels >= lo) & (pixels <= hi)


def dicom_pixels(ds, path: PathLike) -> DicomImage:
    """Decode the single-frame image of an already opened ``Dataset`` (see :func:`read_dicom`)."""
    path = Path(path)
    check_pixel_data(ds, path, single_frame=True)
    ts = _transfer_syntax(ds, path)
    try:
        from pydicom.pixels import get_decoder

        stored, _ = get_decoder(ts).as_array(ds)  # not ds.pixel_array: that caches a second copy on the dataset
    except Exception as err:  # pydicom and its plugins raise many types for corrupt data
        text = str(err).split("\n")[0]
        if "less than expected" in text or "truncat" in text.lower():
            raise BlindspotError(path, f"truncated pixel data ({text})") from None
        raise BlindspotError(path, f"cannot decode pixel data ({ts.name}): {type(err).__name__}: {text}") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip()
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    from_color = False
    if samples == 3 and stored.ndim == 3 and stored.shape[-1] == 3:  # pydicom returns YBR data as RGB
        rgb = stored.astype(np.float64)
        stored = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        from_color = True
        pixels, rescaled, slope, intercept = stored.astype(np.float32), False, 1.0, 0.0
    else:
        if stored.ndim != 2:
            raise BlindspotError(path, f"pixel data has shape {tuple(stored.shape)}, expected a 2-D image")
        pixels, rescaled, slope, intercept = _modality_transform(ds, stored)
    return DicomImage(
        path=path,
        pixels=pixels,
        dataset=ds,
        rescaled=rescaled,
        slope=slope,
        intercept=intercept,
        transfer_syntax=ts,
        compressed=bool(ts.is_compressed),
        photometric=photometric,
        from_color=from_color,
    )


def _quiet(func):
    """Run ``func`` with Python warnings silenced: pydicom warns about odd element values as it converts them, and a
    command's stderr must stay one line; real problems are raised, not warned."""

    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return func(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = func.__name__, func.__doc__, func
    return wrapper


check_pixel_data = _quiet(check_pixel_data)
dicom_pixels = _quiet(dicom_pixels)


def read_dicom(path: PathLike) -> DicomImage:
    """Read and decode one single-frame DICOM image.

    Args:
        path: a DICOM Part 10 file, native or compressed (JPEG, JPEG-LS, JPEG 2000, RLE).
    Returns:
        :class:`DicomImage` whose ``pixels`` are ``(H, W)`` float32 after the modality rescale (see module docs).
    Raises:
        BlindspotError: naming the file — not DICOM, truncated, no pixel data, no decoder for the transfer syntax
        (named), multi-frame, undecodable pixels.
    """
    path = Path(path)
    return dicom_pixels(open_dicom(path), path)


# ------------------------------------------------------------------------------------------------------------------
# Series
# ------------------------------------------------------------------------------------------------------------------
def slice_positions(datasets: Sequence) -> tuple[np.ndarray, str]:
    """Position of each image along the series' slice normal, and which rule gave it.

    The rule, in order of preference:

    * ``"position"``: every image has ``ImagePositionPatient`` and the first has ``ImageOrientationPatient``; the
      position is ``IPP · n`` (millimetres) with ``n = row × column`` direction cosines of the first image;
    * ``"instance"``: every image has ``InstanceNumber``; the position is that number;
    * ``"order"``: otherwise the given order (``0, 1, …``).
    """
    n = len(datasets)
    first = datasets[0] if n else None
    if n and all("ImagePositionPatient" in ds for ds in datasets) and "ImageOrientationPatient" in first:
        try:
            iop = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
            normal = np.cross(iop[:3], iop[3:6])
            ipp = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets], dtype=np.float64)
            if ipp.shape == (n, 3) and np.linalg.norm(normal) > 0.5:
                return ipp @ normal, "position"
        except (TypeError, ValueError, IndexError):
            pass
    if n and all("InstanceNumber" in ds and ds.InstanceNumber is not None for ds in datasets):
        try:
            return np.asarray([float(ds.InstanceNumber) for ds in datasets], dtype=np.float64), "instance"
        except (TypeError, ValueError):
            pass
    return np.arange(n, dtype=np.float64), "order"


def read_dicom_series(
    folder: PathLike | Iterable[PathLike],
    recursive: bool = False,
    progress: bool = False,
    keep_pixel_data: bool = False,
) -> tuple[np.ndarray, list]:
    """Read one DICOM series into a volume sorted along the slice normal.

    Args:
        folder: a folder holding the series' files (non-DICOM files are ignored), or an explicit list of files.
        recursive: also look in sub-folders.
        progress: show a tqdm bar while reading.
        keep_pixel_data: return the full datasets (pixel data included); by default they are headers only (read
            with ``stop_before_pixels``), so a long series is held once, in ``volume``.
    Returns:
        ``(volume, datasets)``: ``volume`` is ``(N, H, W)`` float32 after the modality rescale (see
        :func:`read_dicom`), ``datasets[i]`` the pydicom ``Dataset`` of ``volume[i]`` (its ``filename`` names the
        file). Slices are sorted by :func:`slice_positions` (``ImagePositionPatient`` along the normal, else
        ``InstanceNumber``, else file name order), ascending.
    Raises:
        BlindspotError: no DICOM files; any file bad (see :func:`read_dicom`); images of different sizes; several
        ``SeriesInstanceUID`` in one folder; two images at the same position.

    Files are read twice: headers first (to check and sort them before decoding anything), then each image is
    decoded straight into its place in ``volume`` (peak memory ≈ the volume plus one image).
    """
    if isinstance(folder, (str, Path)):
        source = Path(folder)
        paths = list_dicom_files(source, recursive=recursive)
        if not paths:
            raise BlindspotError(source, "no DICOM files in this folder")
    else:
        paths = sorted(Path(p) for p in folder)
        if not paths:
            raise BlindspotError(None, "an empty list of DICOM files")
        source = paths[0].parent
    # pass 1: headers only (cheap) — check sizes and series, find the order
    headers = [open_dicom(p, stop_before_pixels=True) for p in paths]
    sizes = []
    for p, ds in zip(paths, headers):
        if "Rows" not in ds or "Columns" not in ds:
            raise BlindspotError(p, "no Rows/Columns elements (no image in this file)")
        check_declared_size(ds, p)
        sizes.append((int(ds.Rows), int(ds.Columns)))
    odd = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
    if odd is not None:
        (h0, w0), (h, w) = sizes[0], sizes[odd]
        raise BlindspotError(
            paths[odd], f"image size {h}x{w} differs from {h0}x{w0} of {paths[0].name} in the same series"
        )
    series = {str(ds.SeriesInstanceUID) for ds in headers if "SeriesInstanceUID" in ds}
    if len(series) > 1:
        raise BlindspotError(source, f"holds {len(series)} different series (SeriesInstanceUID); give one series per folder")
    positions, rule = slice_positions(headers)
    order = np.argsort(positions, kind="stable")
    sorted_pos = positions[order]
    if rule != "order" and len(sorted_pos) > 1:
        same = np.flatnonzero(np.isclose(np.diff(sorted_pos), 0.0, atol=1e-4))
        if same.size:
            a, b = paths[order[same[0]]].name, paths[order[same[0] + 1]].name
            what = "ImagePositionPatient" if rule == "position" else "InstanceNumber"
            raise BlindspotError(source, f"{a} and {b} have the same {what} ({sorted_pos[same[0]]:g})")
    # pass 2: decode straight into the sorted volume
    volume = np.empty((len(paths), *sizes[0]), dtype=np.float32)
    datasets = []
    for k, i in enumerate(tqdm(order, desc="reading DICOM", unit="file", disable=not progress)):
        image = read_dicom(paths[i])
        if image.shape != sizes[0]:
            raise BlindspotError(paths[i], f"decoded image is {image.shape}, but its header says {sizes[0]}")
        volume[k] = image.pixels
        datasets.append(image.dataset if keep_pixel_data else headers[i])
    return volume, datasets
