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

Writing: :func:`write_ct_slice` writes a CT Image Storage file (uint16 with intercept −1024, as scanners do) — the
built-in phantoms use it to produce the same layout (:mod:`blindspot.data.ct_phantom`).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from blindspot.data.dicom import list_dicom_files, open_dicom, read_dicom, slice_positions
from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import atomic_write_bytes
from blindspot.physics.ct import HUNormalization

FULL_DOSE_MARK = "Full Dose Images"
LOW_DOSE_MARK = "Low Dose Images"
#: The public data set's low-dose level by patient-ID prefix (chest 10 %, abdomen and head 25 %).
DOSE_BY_PREFIX = {"C": 0.10, "L": 0.25, "N": 0.25}
#: Slices whose positions differ by less than this (mm) are the same slice.
POSITION_TOLERANCE_MM = 0.01


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


def _headers(series: Path) -> tuple[list[Path], list[Any], np.ndarray]:
    """Header-only read of one series: files, datasets and positions sorted by position; checks CT rescale tags."""
    files = list_dicom_files(series)
    if not files:
        raise BlindspotError(series, "no DICOM files in this series folder")
    headers = [open_dicom(f, stop_before_pixels=True) for f in files]
    for f, ds in zip(files, headers):
        if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
            missing = [k for k in ("RescaleSlope", "RescaleIntercept") if k not in ds]
            raise BlindspotError(f, f"no {' / '.join(missing)}: cannot convert the CT pixel values to HU")
        if "Rows" not in ds or "Columns" not in ds:
            raise BlindspotError(f, "no Rows/Columns elements (no image in this file)")
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


def _pair(patient: str, full: Path, low: Path) -> list[LDCTSlice]:
    f_files, f_hdr, f_pos = _headers(full)
    l_files, l_hdr, l_pos = _headers(low)
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


def find_ldct(root: PathLike, dose: float | None = None) -> list[LDCTPatient]:
    """Find and pair the studies under ``root`` (the ``LDCT-and-Projection-data`` folder, its parent, a patient or a
    study folder).

    Args:
        root: folder to search.
        dose: which low-dose series to use when a study has several (e.g. the phantoms' 25 % and 10 %); ``None``
            accepts a study's only low-dose series.
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
        patient.slices = _pair(pname, patient.full_series, patient.low_series)
        patients.append(patient)
    return sorted(patients, key=lambda p: p.patient)


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
    """One paired slice in HU: ``low`` and ``full`` are ``(1, H, W)`` float32."""

    low: Tensor
    full: Tensor
    patient: str
    index: int
    position_mm: float


@dataclass
class CTBatch:
    """Collated :class:`CTSample` items: ``low``/``full`` ``(B, 1, H, W)`` HU."""

    low: Tensor
    full: Tensor
    patient: list[str]
    index: list[int]

    def to(self, device: torch.device | str) -> "CTBatch":
        return CTBatch(self.low.to(device), self.full.to(device), self.patient, self.index)

    def __len__(self) -> int:
        return int(self.low.shape[0])

    @property
    def keys(self) -> list[str]:
        return [f"{p}:{i}" for p, i in zip(self.patient, self.index)]


def collate_ct(samples: Sequence[CTSample]) -> CTBatch:
    """``DataLoader`` collate function for :class:`CTSample` (equal shapes required)."""
    return CTBatch(
        torch.stack([s.low for s in samples]),
        torch.stack([s.full for s in samples]),
        [s.patient for s in samples],
        [int(s.index) for s in samples],
    )


def _read_hu(path: Path) -> np.ndarray:
    image = read_dicom(path)
    if not image.rescaled:
        raise BlindspotError(path, "no RescaleSlope / RescaleIntercept: cannot convert the CT pixel values to HU")
    if not np.isfinite(image.pixels).all():
        raise BlindspotError(path, "pixel values are not finite")
    return image.pixels


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
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        if preload is None:
            preload = len(self.slices) <= 2048
        if preload:
            from tqdm.auto import tqdm

            self._cache = [self._read(s) for s in tqdm(self.slices, desc="reading CT", unit="slice", disable=not progress)]

    def _read(self, s: LDCTSlice) -> tuple[np.ndarray, np.ndarray]:
        full, low = _read_hu(s.full_file), _read_hu(s.low_file)
        if full.shape != low.shape:
            raise BlindspotError(s.low_file, f"image size {low.shape} differs from {full.shape} of {s.full_file}")
        return low, full

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> CTSample:
        s = self.slices[i]
        low, full = self._cache[i] if self._cache is not None else self._read(s)
        return CTSample(torch.from_numpy(np.array(low, copy=True)).unsqueeze(0),
                        torch.from_numpy(np.array(full, copy=True)).unsqueeze(0), s.patient, s.index, s.position_mm)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(low, full)`` HU arrays ``(H, W)`` of slice ``i`` (no copy when preloaded)."""
        return self._cache[i] if self._cache is not None else self._read(self.slices[i])

    def patient_weights(self) -> Tensor:
        """Sampling weight of each slice, ``(N,)`` float64 summing to 1: ``1 / (n_patients · n_slices(patient))``,
        so every patient is drawn with equal probability whatever its number of slices."""
        counts: dict[str, int] = {}
        for s in self.slices:
            counts[s.patient] = counts.get(s.patient, 0) + 1
        w = torch.tensor([1.0 / (len(counts) * counts[s.patient]) for s in self.slices], dtype=torch.float64)
        return w / w.sum()

    def normalization(self, max_slices: int = 256) -> HUNormalization:
        """Mean and std (HU) of the low-dose images (at most ``max_slices`` evenly spread slices): the network's
        input normalisation, applied to input and target alike."""
        idx = np.unique(np.linspace(0, len(self) - 1, min(len(self), max_slices)).round().astype(int))
        total, total_sq, n = 0.0, 0.0, 0
        for i in idx:
            low = self.pair(int(i))[0].astype(np.float64)
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
    """CT images in HU ``(N, 1, H, W)`` float32, their names and pixel spacing (mm, ``None`` when unknown)."""

    hu: Tensor
    names: list[str]
    pixel_spacing_mm: float | None


def load_ct_images(path: PathLike) -> CTImages:
    """One CT DICOM file, or a folder holding one DICOM series (sorted by position), in HU.

    Every file must carry ``RescaleSlope`` and ``RescaleIntercept`` (no guessing of HU).
    """
    from blindspot.data.dicom import read_dicom_series

    path = Path(path)
    if path.is_dir():
        files = list_dicom_files(path)
        if not files:
            raise BlindspotError(path, "no DICOM files in this folder")
        for f in files:
            ds = open_dicom(f, stop_before_pixels=True)
            if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
                raise BlindspotError(f, "no RescaleSlope / RescaleIntercept: cannot convert the CT pixel values to HU")
        volume, datasets = read_dicom_series(path)
        names = [Path(str(getattr(ds, "filename", "") or f"slice{i}")).name for i, ds in enumerate(datasets)]
        return CTImages(torch.from_numpy(volume).unsqueeze(1), names, _spacing(datasets[0]))
    pixels = _read_hu(path)
    ds = open_dicom(path, stop_before_pixels=True)
    return CTImages(torch.from_numpy(pixels).reshape(1, 1, *pixels.shape), [path.name], _spacing(ds))


def _spacing(ds: Any) -> float | None:
    try:
        values = [float(v) for v in ds.PixelSpacing]
        return float(values[0]) if values else None
    except (AttributeError, TypeError, ValueError):
        return None
