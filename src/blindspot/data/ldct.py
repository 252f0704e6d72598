"""CT data in the layout of the public *LDCT and Projection data* set, plus generic CT DICOM loading.

Layout (TCIA)::

    LDCT-and-Projection-data/<patient>/<study>/<series>/1-NNN.dcm

with series folders named like ``1.000000-Full Dose Images-12345`` and ``1.000000-Low Dose Images-67890``. A study
holding one full-dose series and one or more low-dose series is a *patient* here (a patient folder with several
such studies gives one entry per study). Slices are paired by position along the slice normal
(``ImagePositionPatient``), pixels are converted to HU with the rescale slope and intercept (required), and every
problem is a one-line :class:`~blindspot.errors.BlindspotError` naming the file or folder: a series without its
partner, slices that do not pair, images of different shapes, missing rescale tags, pixel data nobody can decode.

The low-dose level of a series is read from its folder name or ``SeriesDescription`` (``"Low Dose Images (25%)"``
→ 0.25); without a percentage the public set's convention by patient prefix applies (``C…`` chest: 10 %, ``L…``
abdomen and ``N…`` head: 25 %).

Training helpers: :class:`LDCTDataset` (full slices in HU, optional preloading), :meth:`LDCTDataset.patient_weights`
(every patient drawn with equal probability whatever its slice count, DESIGN.md §1.4), :func:`split_patients` (a
seeded patient-level train/val/test split) and :class:`PatchDataset` (random patches, drawn patient-balanced from
``(seed, epoch, index)`` so every epoch is reproducible and resumable under any number of processes).

Real scanner slices store a circular reconstruction field with padding far below air outside it (DICOM
``PixelPaddingValue``, typically −2000 or −3024 HU). :func:`read_ct_hu` honours ``PixelPaddingValue`` /
``PixelPaddingRangeLimit`` and, without them, treats values below :data:`OUT_OF_FIELD_BELOW_HU` that touch the
border as padding (:func:`field_of_view`). Out-of-field pixels are set to air (:data:`AIR_HU`, what the scanner
would have reconstructed in the air around the patient, and what denoisers trained on HU clipped at −1024 expect —
so the network never sees an artificial −3024 HU edge) and the field is carried with every image
(:attr:`CTSample.field`, :attr:`CTBatch.field`, :attr:`CTImages.field`): normalisation statistics
(:meth:`LDCTDataset.normalization`), metrics (:func:`blindspot.metrics.ct_slice_metrics`) and every attack (FNAF:
features, ``T``, dynamic range and IP inside the field; image-domain and natural invariances) leave those pixels out.
Setting them to air once, here, is also what the CT simulation needs: a scanner measured the air around the patient,
never the padding value, so simulated projections of a padded slice see air.

Every member of a series folder must be a readable CT image (a corrupt one is an error naming it);
``find_ldct(..., skip_bad=True)`` — the commands' ``--skip-bad`` — leaves it and its partner out and lists them in
:attr:`LDCTPatient.skipped` (:func:`report_skipped`: rows for ``run.json``, printed on stderr).

Writing: :func:`write_ct_slice` writes a CT Image Storage file (uint16 with intercept −1024, as scanners do) — the
built-in phantoms use it to produce the same layout (:mod:`blindspot.data.ct_phantom`).
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from blindspot.data.dicom import check_declared_size, open_dicom, read_dicom, slice_positions
from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import atomic_write_bytes
from blindspot.physics.ct import HUNormalization
from blindspot.validate import MIN_IMAGE_SIDE, printable

FULL_DOSE_MARK = "Full Dose Images"
LOW_DOSE_MARK = "Low Dose Images"
#: The public data set's low-dose level by patient-ID prefix (chest 10 %, abdomen and head 25 %).
DOSE_BY_PREFIX = {"C": 0.10, "L": 0.25, "N": 0.25}
#: Slices whose positions differ by less than this (mm) are the same slice.
POSITION_TOLERANCE_MM = 0.01
#: HU given to pixels outside the reconstruction field of view (air: the field's rim lies in the air around the
#: patient, so this is what the scanner would have reconstructed there, and what a denoiser trained on clipped
#: [−1024, …] HU data expects).
AIR_HU = -1000.0
#: Pixel values below this (HU) are no attenuation at all (vacuum is −1000, real air −1000 ± noise): where such
#: values touch the image border without a ``PixelPaddingValue``, they are the padding outside a circular field.
OUT_OF_FIELD_BELOW_HU = -1500.0
#: Fewer in-field pixels than this fraction of the image is degenerate data, not a CT slice.
MIN_FIELD_FRACTION = 0.05


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def ldct_uid(*parts: Any) -> str:
    """A deterministic DICOM UID from ``parts`` (same parts → same UID)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def series_folder_name(series_number: int, description: str, series_uid: str) -> str:
    """TCIA's series folder name: ``<number>.000000-<description>-<last 5 digits of the UID>``."""
    digits = re.sub(r"\D", "", series_uid)[-5:]
    return f"{int(series_number)}.000000-{description}-{digits}"


def study_folder_name(study_date: str, description: str, study_uid: str) -> str:
    """TCIA's study folder name: ``<MM-DD-YYYY>-NA-<description>-<last 5 digits of the UID>``."""
    digits = re.sub(r"\D", "", study_uid)[-5:]
    date = f"{study_date[4:6]}-{study_date[6:8]}-{study_date[0:4]}"
    return f"{date}-NA-{description}-{digits}"


def write_ct_slice(
    path: PathLike,
    hu: "np.ndarray | Tensor",
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    sop_uid: str,
    series_number: int,
    series_description: str,
    instance_number: int,
    z_mm: float,
    pixel_spacing_mm: float,
    slice_thickness_mm: float = 3.0,
    study_date: str = "20200101",
    study_description: str = "",
    body_part: str = "",
    kvp: float = 120.0,
    exposure_mas: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write one CT slice as a DICOM Part 10 file (CT Image Storage, explicit VR little endian), atomically.

    Args:
        path: the file to write.
        hu: ``(H, W)`` image in HU; stored as uint16 ``round(HU) + 1024`` clipped to 12 bits
            (``RescaleIntercept = −1024``, ``RescaleSlope = 1``), so values are kept to ±0.5 HU in [−1024, 3071].
        z_mm: table position of the slice (``ImagePositionPatient[2]`` and ``SliceLocation``).
        pixel_spacing_mm: square pixel size; the image is centred on the scanner axis.
        extra: further data elements by keyword (e.g. ``{"ConvolutionKernel": "FBP shepp-logan"}``).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    arr = hu.detach().cpu().numpy() if isinstance(hu, Tensor) else np.asarray(hu)
    if arr.ndim != 2 or not np.isfinite(arr).all():
        raise ValueError(f"write_ct_slice needs a finite (H, W) image, got shape {arr.shape}")
    stored = np.clip(np.rint(arr.astype(np.float64)) + 1024.0, 0, 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.Manufacturer = "blindspot (synthetic)"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.SeriesNumber = int(series_number)
    ds.InstanceNumber = int(instance_number)
    if body_part:
        ds.BodyPartExamined = body_part
    ds.KVP = f"{kvp:g}"
    if exposure_mas is not None:
        ds.Exposure = int(round(exposure_mas))
    ds.SliceThickness = f"{slice_thickness_mm:g}"
    ds.PatientPosition = "FFS"
    H, W = arr.shape
    ds.ImagePositionPatient = [f"{-(W / 2 - 0.5) * pixel_spacing_mm:.4f}", f"{-(H / 2 - 0.5) * pixel_spacing_mm:.4f}",
                               f"{z_mm:.4f}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = f"{z_mm:.4f}"
    ds.PixelSpacing = [f"{pixel_spacing_mm:.6f}", f"{pixel_spacing_mm:.6f}"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = H, W
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Finding and pairing series
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LDCTSlice:
    """A paired slice: the full-dose and low-dose files at one position (mm along the slice normal)."""

    patient: str
    full_file: Path
    low_file: Path
    position_mm: float
    index: int  # position order within the patient (0 = lowest position)


@dataclass
class LDCTPatient:
    """One study with a full-dose series and its chosen low-dose series, slices paired and sorted by position.

    ``patient`` is the patient folder name (plus ``"/<study>"`` when a patient has several paired studies).
    """

    patient: str
    study: Path
    full_series: Path
    low_series: Path
    dose: float | None
    slices: list[LDCTSlice] = field(default_factory=list)
    #: files left out by ``find_ldct(..., skip_bad=True)``, each with the reason (empty otherwise)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slices)


_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def series_dose(name: str, patient: str) -> float | None:
    """The low-dose fraction of a series from its name/description (``25%`` → 0.25), else the patient prefix rule."""
    m = _PERCENT.search(name)
    if m:
        return float(m.group(1)) / 100.0
    prefix = patient[:1].upper()
    return DOSE_BY_PREFIX.get(prefix)


def _series_kind(name: str) -> str | None:
    low = name.lower()
    if FULL_DOSE_MARK.lower() in low:
        return "full"
    if LOW_DOSE_MARK.lower() in low:
        return "low"
    return None


def series_folders(root: Path) -> list[Path]:
    """Folders under ``root`` (or ``root`` itself) whose name marks a full- or low-dose series."""
    found = []
    candidates = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    for p in candidates:
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if _series_kind(p.name) is not None:
            found.append(p)
    return found


#: Suffixes of files in a series folder that are not images (notes, manifests), ignored; any other visible file
#: must be a readable DICOM image.
NON_IMAGE_SUFFIXES = frozenset({".txt", ".xml", ".json", ".csv", ".md", ".html", ".pdf", ".log", ".ini", ".tsv"})


def _series_member_files(series: Path) -> list[Path]:
    """Every visible regular file of a series folder that should be an image (sorted): DICOM or not, so that a
    corrupt member is reported, never silently left out."""
    from blindspot.data.dicom import INDEX_FILE_NAMES

    return sorted(p for p in series.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name not in INDEX_FILE_NAMES and p.suffix.lower() not in NON_IMAGE_SUFFIXES)


def _check_ct_header(f: Path, ds: Any) -> None:
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        missing = [k for k in ("RescaleSlope", "RescaleIntercept") if k not in ds]
        raise BlindspotError(f, f"no {' / '.join(missing)}: cannot convert the CT pixel values to HU")
    if "Rows" not in ds or "Columns" not in ds:
        raise BlindspotError(f, "no Rows/Columns elements (no image in this file)")
    check_declared_size(ds, f)


def _headers(series: Path, skipped: list[tuple[Path, str]] | None = None) -> tuple[list[Path], list[Any], np.ndarray]:
    """Header-only read of one series: files, datasets and positions sorted by position; checks CT rescale tags.

    Every member file must be a readable CT DICOM image; a bad one is a :class:`BlindspotError` naming it, or, when
    ``skipped`` is a list, is appended to it as ``(file, reason)`` and left out.
    """
    files, headers = [], []
    for f in _series_member_files(series):
        try:
            ds = open_dicom(f, stop_before_pixels=True)
            _check_ct_header(f, ds)
        except BlindspotError as err:
            if skipped is None:
                raise
            skipped.append((f, err.problem))
            continue
        files.append(f)
        headers.append(ds)
    if not files:
        raise BlindspotError(series, "no DICOM files in this series folder")
    uids = {str(ds.SeriesInstanceUID) for ds in headers if "SeriesInstanceUID" in ds}
    if len(uids) > 1:
        raise BlindspotError(series, f"holds {len(uids)} different series (SeriesInstanceUID); one series per folder")
    positions, rule = slice_positions(headers)
    if rule != "position":
        raise BlindspotError(series, "slices lack ImagePositionPatient/ImageOrientationPatient, so they cannot be "
                             "paired by position")
    order = np.argsort(positions, kind="stable")
    files = [files[i] for i in order]
    headers = [headers[i] for i in order]
    positions = positions[order]
    dup = np.flatnonzero(np.diff(positions) < POSITION_TOLERANCE_MM)
    if dup.size:
        raise BlindspotError(files[dup[0] + 1], f"has the same position ({positions[dup[0]]:.3f} mm) as "
                             f"{files[dup[0]].name}")
    return files, headers, positions


def _pair(patient: str, full: Path, low: Path, skipped: list[tuple[Path, str]] | None = None) -> list[LDCTSlice]:
    f_files, f_hdr, f_pos = _headers(full, skipped)
    l_files, l_hdr, l_pos = _headers(low, skipped)
    if skipped:  # a bad member's partner is left out with it
        f_keep = [i for i, pos in enumerate(f_pos) if np.abs(l_pos - pos).min(initial=np.inf) < POSITION_TOLERANCE_MM]
        l_keep = [k for k, pos in enumerate(l_pos) if np.abs(f_pos - pos).min(initial=np.inf) < POSITION_TOLERANCE_MM]
        skipped.extend((f_files[i], "its partner slice was skipped") for i in range(len(f_files)) if i not in f_keep)
        skipped.extend((l_files[k], "its partner slice was skipped") for k in range(len(l_files)) if k not in l_keep)
        f_files, f_hdr, f_pos = [f_files[i] for i in f_keep], [f_hdr[i] for i in f_keep], f_pos[f_keep]
        l_files, l_hdr, l_pos = [l_files[k] for k in l_keep], [l_hdr[k] for k in l_keep], l_pos[l_keep]
        if not f_files:
            raise BlindspotError(full, "no usable slice pairs left after skipping bad files")
    # every full-dose slice must have a low-dose slice at its position, and vice versa
    j = np.searchsorted(l_pos, f_pos)
    pairs = []
    for i, pos in enumerate(f_pos):
        best = None
        for k in (j[i] - 1, j[i]):
            if 0 <= k < len(l_pos) and abs(l_pos[k] - pos) < POSITION_TOLERANCE_MM:
                best = k
        if best is None:
            raise BlindspotError(f_files[i], f"no low-dose slice at its position {pos:.3f} mm in {low}")
        pairs.append((i, best))
    used = {k for _, k in pairs}
    if len(used) != len(l_files):
        k = min(set(range(len(l_files))) - used)
        raise BlindspotError(l_files[k], f"no full-dose slice at its position {l_pos[k]:.3f} mm in {full}")
    out = []
    for n, (i, k) in enumerate(pairs):
        fs, ls = (int(f_hdr[i].Rows), int(f_hdr[i].Columns)), (int(l_hdr[k].Rows), int(l_hdr[k].Columns))
        if fs != ls:
            raise BlindspotError(l_files[k], f"image size {ls[0]}x{ls[1]} differs from {fs[0]}x{fs[1]} of its "
                                 f"full-dose slice {f_files[i]}")
        out.append(LDCTSlice(patient, f_files[i], l_files[k], float(f_pos[i]), n))
    return out


def find_ldct(root: PathLike, dose: float | None = None, skip_bad: bool = False) -> list[LDCTPatient]:
    """Find and pair the studies under ``root`` (the ``LDCT-and-Projection-data`` folder, its parent, a patient or a
    study folder).

    Args:
        root: folder to search.
        dose: which low-dose series to use when a study has several (e.g. the phantoms' 25 % and 10 %); ``None``
            accepts a study's only low-dose series.
        skip_bad: leave out member files that are not readable CT DICOM images (and their partner slices) instead
            of failing; each patient's :attr:`LDCTPatient.skipped` lists them with the reason.
    Returns:
        Patients sorted by name, each with its paired slices sorted by position.
    Raises:
        BlindspotError: no series found; a full-dose series without a low-dose partner or the reverse; several
        low-dose series and no ``dose`` (or none at ``dose``); unpaired slices; different shapes; missing rescale tags.
    """
    root = Path(root)
    if not root.is_dir():
        raise BlindspotError(root, "not a folder (expected the LDCT-and-Projection-data layout)")
    series = series_folders(root)
    if not series:
        raise BlindspotError(root, f"no series folders named '...{FULL_DOSE_MARK}...' or '...{LOW_DOSE_MARK}...' "
                             "(expected LDCT-and-Projection-data/<patient>/<study>/<series>/)")
    studies: dict[Path, dict[str, list[Path]]] = {}
    for s in series:
        studies.setdefault(s.parent, {"full": [], "low": []})[_series_kind(s.name)].append(s)
    by_patient: dict[str, list[Path]] = {}
    for study in studies:
        by_patient.setdefault(study.parent.name if study != root else study.name, []).append(study)
    patients = []
    for study, groups in sorted(studies.items()):
        pname = study.parent.name if study != root else study.name
        if len(by_patient[pname]) > 1:
            pname = f"{pname}/{study.name}"
        if not groups["full"]:
            raise BlindspotError(groups["low"][0], f"low-dose series without a '{FULL_DOSE_MARK}' series beside it")
        if not groups["low"]:
            raise BlindspotError(groups["full"][0], f"full-dose series without a '{LOW_DOSE_MARK}' series beside it")
        if len(groups["full"]) > 1:
            raise BlindspotError(study, f"holds {len(groups['full'])} full-dose series; expected one")
        lows = [(s, series_dose(s.name, pname)) for s in groups["low"]]
        if dose is None:
            if len(lows) > 1:
                levels = ", ".join(f"{d:g}" if d is not None else "?" for _, d in lows)
                raise BlindspotError(study, f"holds {len(lows)} low-dose series (doses {levels}); choose one with "
                                     "--dose")
            low, low_dose = lows[0]
        else:
            match = [(s, d) for s, d in lows if d is not None and math.isclose(d, dose, rel_tol=1e-3)]
            if not match:
                levels = ", ".join(f"{d:g}" if d is not None else "unknown" for _, d in lows)
                raise BlindspotError(study, f"no low-dose series at dose {dose:g} (found {levels})")
            low, low_dose = match[0]
        patient = LDCTPatient(pname, study, groups["full"][0], low, low_dose)
        patient.slices = _pair(pname, patient.full_series, patient.low_series, patient.skipped if skip_bad else None)
        patients.append(patient)
    return sorted(patients, key=lambda p: p.patient)


def report_skipped(patients: Sequence[LDCTPatient]) -> list[dict[str, str]]:
    """The files ``find_ldct(..., skip_bad=True)`` left out, as JSON rows ``{"file": …, "reason": …}`` in patient
    order (for a run's ``run.json``), each also printed with its reason on stderr, one line each (nothing is left
    out silently). Under ``torchrun`` every process skips the same files and only rank 0 (``RANK``) prints them."""
    rows = [{"file": printable(f), "reason": reason} for p in patients for f, reason in p.skipped]
    if os.environ.get("RANK", "0") == "0":
        for row in rows:
            print(f"blindspot: skipped {row['file']}: {row['reason']}", file=sys.stderr)
    return rows


def split_patients(
    patients: Sequence[LDCTPatient], val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0
) -> tuple[list[LDCTPatient], list[LDCTPatient], list[LDCTPatient]]:
    """Seeded patient-level split into (train, val, test): no patient is in two parts.

    Each non-zero fraction gets at least one patient (and train keeps at least one); same seed → same split.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise BlindspotError(None, f"bad split fractions val {val_fraction}, test {test_fraction}")
    n = len(patients)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise BlindspotError(None, f"{n} patients cannot be split into train/val/test with fractions "
                             f"{val_fraction}/{test_fraction}: need more patients")
    order = np.random.default_rng(seed).permutation(n)
    ordered = sorted(patients, key=lambda p: p.patient)
    pick = lambda idx: sorted((ordered[i] for i in idx), key=lambda p: p.patient)  # noqa: E731
    return pick(order[n_val + n_test:]), pick(order[:n_val]), pick(order[n_val:n_val + n_test])


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CTSample:
    """One paired slice in HU: ``low`` and ``full`` are ``(1, H, W)`` float32.

    ``field`` is the reconstruction field of view, bool ``(1, H, W)`` (``True`` = inside, the pixels that are
    image), or ``None`` when every pixel is (phantoms). Outside it, ``low`` and ``full`` hold :data:`AIR_HU`.
    """

    low: Tensor
    full: Tensor
    patient: str
    index: int
    position_mm: float
    field: Tensor | None = None


@dataclass
class CTBatch:
    """Collated :class:`CTSample` items: ``low``/``full`` ``(B, 1, H, W)`` HU; ``field`` bool ``(B, 1, H, W)``
    (``True`` inside the field of view) or ``None`` when every pixel of every slice is inside."""

    low: Tensor
    full: Tensor
    patient: list[str]
    index: list[int]
    field: Tensor | None = None

    def to(self, device: torch.device | str) -> "CTBatch":
        return CTBatch(self.low.to(device), self.full.to(device), self.patient, self.index,
                       None if self.field is None else self.field.to(device))

    def __len__(self) -> int:
        return int(self.low.shape[0])

    @property
    def keys(self) -> list[str]:
        return [f"{p}:{i}" for p, i in zip(self.patient, self.index)]


def collate_ct(samples: Sequence[CTSample]) -> CTBatch:
    """``DataLoader`` collate function for :class:`CTSample` (equal shapes required)."""
    fields = None
    if any(s.field is not None for s in samples):
        fields = torch.stack([s.field if s.field is not None else torch.ones_like(s.low, dtype=torch.bool)
                              for s in samples])
    return CTBatch(
        torch.stack([s.low for s in samples]),
        torch.stack([s.full for s in samples]),
        [s.patient for s in samples],
        [int(s.index) for s in samples],
        fields,
    )


def field_of_view(hu: np.ndarray, padding: np.ndarray | None = None) -> np.ndarray:
    """The reconstruction field of view of a CT slice: bool ``(H, W)``, ``True`` = inside (image).

    Outside are the pixels ``padding`` marks (the file's ``PixelPaddingValue``, see
    :func:`blindspot.data.dicom.pixel_padding_mask`) and, for files without it, the 8-connected regions of values
    below :data:`OUT_OF_FIELD_BELOW_HU` that touch the image border (the padding of a circular field; isolated
    low values inside the body are kept as image).

    Args:
        hu: ``(H, W)`` HU.
        padding: bool ``(H, W)`` padding mask, or ``None``.
    """
    from scipy import ndimage

    outside = np.zeros(hu.shape, dtype=bool) if padding is None else np.asarray(padding, dtype=bool).copy()
    low = hu < OUT_OF_FIELD_BELOW_HU
    if low.any():
        labels, _ = ndimage.label(low, structure=np.ones((3, 3), dtype=bool))
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        border = border[border > 0]
        if border.size:
            outside |= np.isin(labels, border)
    return ~outside


def read_ct_hu(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CT DICOM slice in HU with its field of view.

    Returns:
        ``(hu, field)``: ``hu`` ``(H, W)`` float32 with the pixels outside the field set to :data:`AIR_HU`;
        ``field`` bool ``(H, W)`` (:func:`field_of_view`).
    Raises:
        BlindspotError: naming the file — unreadable (see :func:`~blindspot.data.dicom.read_dicom`), no rescale
        tags, non-finite values, or fewer than :data:`MIN_FIELD_FRACTION` of its pixels inside the field.
    """
    from blindspot.data.dicom import pixel_padding_mask

    path = Path(path)
    image = read_dicom(path)
    if not image.rescaled:
        raise BlindspotError(path, "no RescaleSlope / RescaleIntercept: cannot convert the CT pixel values to HU")
    hu = image.pixels
    if not np.isfinite(hu).all():
        raise BlindspotError(path, "pixel values are not finite")
    field = field_of_view(hu, pixel_padding_mask(image.dataset, hu))
    check_field(path, field)
    if not field.all():
        hu = np.where(field, hu, np.float32(AIR_HU)).astype(np.float32)
    return hu, field


def check_field(source: PathLike | None, field: np.ndarray) -> None:
    """Raise :class:`BlindspotError` naming ``source`` when less than :data:`MIN_FIELD_FRACTION` of ``field`` ``(H,
    W)`` is inside the field of view (an all-padding image has nothing to denoise or measure), or the image is
    smaller than :data:`~blindspot.validate.MIN_IMAGE_SIDE` on a side."""
    if min(field.shape[-2:]) < MIN_IMAGE_SIDE:
        raise BlindspotError(source, f"image of {field.shape[-2]}x{field.shape[-1]} pixels is smaller than the "
                             f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} minimum")
    frac = float(np.mean(field)) if field.size else 0.0
    if frac < MIN_FIELD_FRACTION:
        raise BlindspotError(source, f"only {100 * frac:.1f}% of the pixels lie inside the field of view (the rest is "
                             "pixel padding or values below −1500 HU): no image to use")


class LDCTDataset(Dataset):
    """Paired slices of some patients as :class:`CTSample` (HU).

    Args:
        patients: from :func:`find_ldct` (or one part of :func:`split_patients`).
        preload: read every slice into memory now (``None``: when there are at most 2048 slices). Preloading also
            surfaces every bad file before training starts.
        progress: tqdm bar while preloading.
    """

    def __init__(self, patients: Sequence[LDCTPatient], preload: bool | None = None, progress: bool = False) -> None:
        self.patients = list(patients)
        self.slices = [s for p in self.patients for s in p.slices]
        if not self.slices:
            raise BlindspotError(None, "no CT slices (no patients given)")
        self._cache: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        if preload is None:
            preload = len(self.slices) <= 2048
        if preload:
            from tqdm.auto import tqdm

            self._cache = [self._read(s) for s in tqdm(self.slices, desc="reading CT", unit="slice", disable=not progress)]

    def _read(self, s: LDCTSlice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(low, full, field)``: each file is read (and blamed) on its own; the pair's field is where both are."""
        (full, f_field), (low, l_field) = read_ct_hu(s.full_file), read_ct_hu(s.low_file)
        if full.shape != low.shape:
            raise BlindspotError(s.low_file, f"image size {low.shape} differs from {full.shape} of {s.full_file}")
        field = f_field & l_field
        if not field.all():
            check_field(s.low_file, field)
            low = np.where(field, low, np.float32(AIR_HU)).astype(np.float32)
            full = np.where(field, full, np.float32(AIR_HU)).astype(np.float32)
        return low, full, field

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> CTSample:
        s = self.slices[i]
        low, full, field = self.read(i)
        return CTSample(torch.from_numpy(np.array(low, copy=True)).unsqueeze(0),
                        torch.from_numpy(np.array(full, copy=True)).unsqueeze(0), s.patient, s.index, s.position_mm,
                        None if field.all() else torch.from_numpy(np.array(field, copy=True)).unsqueeze(0))

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(low, full, field)`` of slice ``i``: HU arrays ``(H, W)`` (:data:`AIR_HU` outside the field of view)
        and the field of view, bool ``(H, W)`` (no copy when preloaded)."""
        return self._cache[i] if self._cache is not None else self._read(self.slices[i])

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(low, full)`` HU arrays ``(H, W)`` of slice ``i`` (no copy when preloaded)."""
        low, full, _ = self.read(i)
        return low, full

    def patient_weights(self) -> Tensor:
        """Sampling weight of each slice, ``(N,)`` float64 summing to 1: ``1 / (n_patients · n_slices(patient))``,
        so every patient is drawn with equal probability whatever its number of slices."""
        counts: dict[str, int] = {}
        for s in self.slices:
            counts[s.patient] = counts.get(s.patient, 0) + 1
        w = torch.tensor([1.0 / (len(counts) * counts[s.patient]) for s in self.slices], dtype=torch.float64)
        return w / w.sum()

    def normalization(self, max_slices: int = 256) -> HUNormalization:
        """Mean and std (HU) of the low-dose images' pixels inside their fields of view (at most ``max_slices``
        evenly spread slices): the network's input normalisation, applied to input and target alike."""
        idx = np.unique(np.linspace(0, len(self) - 1, min(len(self), max_slices)).round().astype(int))
        total, total_sq, n = 0.0, 0.0, 0
        for i in idx:
            low, _, field = self.read(int(i))
            low = low[field].astype(np.float64)
            total += float(low.sum())
            total_sq += float((low**2).sum())
            n += low.size
        mean = total / n
        std = math.sqrt(max(total_sq / n - mean**2, 1e-12))
        return HUNormalization(mean, std)


class PatchDataset(Dataset):
    """Random training patches ``(x, y)`` (normalised low dose, normalised full dose), each ``(1, p, p)``.

    Item ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``: the slice is drawn with
    :meth:`LDCTDataset.patient_weights` (equal probability per patient) and the patch position uniformly; patches
    that are almost all air (fewer than ``min_body`` of their full-dose pixels above −900 HU) are redrawn up to 10
    times. With random flips / 90° rotations when ``augment``.

    Args:
        slices: the training :class:`LDCTDataset`.
        patch_size: ``p`` in pixels (images smaller than ``p`` are an error).
        samples_per_epoch: the epoch length.
        normalization: HU ↔ network units.
        seed: base seed.
    """

    def __init__(self, slices: LDCTDataset, patch_size: int, samples_per_epoch: int, normalization: HUNormalization,
                 seed: int = 0, augment: bool = True, min_body: float = 0.1) -> None:
        self.slices, self.patch, self.n = slices, int(patch_size), int(samples_per_epoch)
        self.norm, self.seed, self.augment, self.min_body = normalization, int(seed), augment, float(min_body)
        self.weights = slices.patient_weights().numpy()
        self.epoch = 0
        if self.n < 1:
            raise BlindspotError(None, f"samples per epoch must be >= 1, got {samples_per_epoch}")
        small = next((s for s in range(len(slices)) if min(slices.pair(s)[0].shape) < self.patch), None) \
            if slices._cache is not None else None
        if small is not None:
            shape = slices.pair(small)[0].shape
            raise BlindspotError(slices.slices[small].full_file, f"image {shape[0]}x{shape[1]} is smaller than the "
                                 f"{self.patch}x{self.patch} training patch")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        p = self.patch
        for _ in range(10):
            s = int(rng.choice(len(self.weights), p=self.weights))
            low, full = self.slices.pair(s)
            H, W = low.shape
            if H < p or W < p:
                raise BlindspotError(self.slices.slices[s].full_file, f"image {H}x{W} is smaller than the {p}x{p} "
                                     "training patch")
            r, c = int(rng.integers(0, H - p + 1)), int(rng.integers(0, W - p + 1))
            y = full[r : r + p, c : c + p]
            if (y > -900.0).mean() >= self.min_body:
                break
        x = low[r : r + p, c : c + p]
        pair = np.stack([x, y])
        if self.augment:
            pair = np.rot90(pair, k=int(rng.integers(0, 4)), axes=(1, 2))
            if rng.uniform() < 0.5:
                pair = pair[:, :, ::-1]
        t = torch.from_numpy(np.ascontiguousarray(pair, dtype=np.float32)).unsqueeze(1)  # (2, 1, p, p)
        t = self.norm.to_network(t)
        return t[0], t[1]


# ----------------------------------------------------------------------------------------------------------------
# Generic CT images
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CTImages:
    """CT images in HU ``(N, 1, H, W)`` float32 (:data:`AIR_HU` outside the field of view), their names, pixel
    spacing (mm, ``None`` when unknown) and fields of view, bool ``(N, 1, H, W)`` (``True`` = inside)."""

    hu: Tensor
    names: list[str]
    pixel_spacing_mm: float | None
    field: Tensor | None = None


def load_ct_images(path: PathLike) -> CTImages:
    """One CT DICOM file, or a folder holding one DICOM series (sorted by position), in HU.

    Every file must carry ``RescaleSlope`` and ``RescaleIntercept`` (no guessing of HU); every visible file of the
    folder (but notes such as ``.txt``, :data:`NON_IMAGE_SUFFIXES`) must be a readable DICOM image. Pixels outside
    each slice's field of view (:func:`field_of_view`) are set to :data:`AIR_HU` and reported in ``field``.
    """
    from blindspot.data.dicom import pixel_padding_mask, read_dicom_series

    path = Path(path)
    if path.is_dir():
        files = _series_member_files(path)  # every member: a corrupt file is reported, never skipped
        if not files:
            raise BlindspotError(path, "no DICOM files in this folder")
        for f in files:
            _check_ct_header(f, open_dicom(f, stop_before_pixels=True))
        volume, datasets = read_dicom_series(files)
        names = [Path(str(getattr(ds, "filename", "") or f"slice{i}")).name for i, ds in enumerate(datasets)]
        fields = np.empty(volume.shape, dtype=bool)
        for k, ds in enumerate(datasets):
            if not np.isfinite(volume[k]).all():
                raise BlindspotError(path / names[k], "pixel values are not finite")
            fields[k] = field_of_view(volume[k], pixel_padding_mask(ds, volume[k]))
            check_field(path / names[k], fields[k])
        volume = np.where(fields, volume, np.float32(AIR_HU)).astype(np.float32)
        return CTImages(torch.from_numpy(volume).unsqueeze(1), names, _spacing(datasets[0]),
                        torch.from_numpy(fields).unsqueeze(1))
    pixels, field = read_ct_hu(path)
    ds = open_dicom(path, stop_before_pixels=True)
    return CTImages(torch.from_numpy(pixels).reshape(1, 1, *pixels.shape), [path.name], _spacing(ds),
                    torch.from_numpy(field).reshape(1, 1, *field.shape))


def _spacing(ds: Any) -> float | None:
    try:
        values = [float(v) for v in ds.PixelSpacing]
        return float(values[0]) if values else None
    except (AttributeError, TypeError, ValueError):
        return None
