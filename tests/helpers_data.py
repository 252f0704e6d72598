"""Small files for data tests: fastMRI-format HDF5 volumes, DICOM datasets, smooth test images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from blindspot.data.fastmri import ismrmrd_header_xml, write_fastmri_h5
from blindspot.physics.mri import center_crop, fft2c, ifft2c, rss


def smooth_image(shape: tuple[int, ...], seed: int = 0, low: float = 0.1) -> np.ndarray:
    """A positive, smooth-ish float32 test image ``shape`` (last two axes are H, W) with values in ``[low, 1]``."""
    rng = np.random.default_rng(seed)
    H, W = shape[-2:]
    yy, xx = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, W), indexing="ij")
    base = np.zeros(shape, dtype=np.float64)
    for _ in range(4):
        cy, cx, r = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0.2, 0.6)
        base = base + rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    base = base + 0.05 * rng.random(shape)
    base = (base - base.min()) / (base.max() - base.min())
    return (low + (1 - low) * base).astype(np.float32)


def complex_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Complex images (magnitude from :func:`smooth_image`, smooth phase), complex64 of ``shape``."""
    mag = smooth_image(shape, seed)
    H, W = shape[-2:]
    yy, xx = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, W), indexing="ij")
    phase = np.pi * 0.3 * (yy + 0.5 * xx) + 0.1 * seed
    return (mag * np.exp(1j * phase)).astype(np.complex64)


def write_singlecoil(
    path: Path,
    slices: int = 3,
    size: tuple[int, int] = (32, 32),
    recon: tuple[int, int] | None = (24, 24),
    seed: int = 0,
    with_target: bool = True,
    attrs: dict | None = None,
    header: bytes | None | str = "default",
) -> tuple[np.ndarray, np.ndarray | None]:
    """A single-coil fastMRI file: k-space = F(complex image); target = |image| cropped to ``recon`` (as ESC)."""
    images = torch.from_numpy(complex_volume((slices, *size), seed))
    kspace = fft2c(images).numpy()
    crop = recon or size
    target = center_crop(images.abs(), crop).numpy() if with_target else None
    if header == "default":
        header = ismrmrd_header_xml((*size, 1), (*crop, 1))
    if attrs is None:
        attrs = {"acquisition": "CORPD_FBK", "patient_id": f"patient{seed}", "norm": 1.5}
        if target is not None:
            attrs["max"] = float(target.max())
    write_fastmri_h5(path, kspace, target, header=header, attrs=attrs, with_header=header is not None)
    return kspace, target


def write_multicoil(
    path: Path,
    slices: int = 2,
    coils: int = 4,
    size: tuple[int, int] = (32, 32),
    recon: tuple[int, int] = (24, 24),
    seed: int = 0,
    with_target: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A multi-coil fastMRI file: coil images = image × smooth coil sensitivities; target = RSS cropped."""
    image = complex_volume((slices, 1, *size), seed)
    H, W = size
    yy, xx = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, W), indexing="ij")
    angles = np.linspace(0, 2 * np.pi, coils, endpoint=False)
    sens = np.stack([np.exp(-((yy - 0.8 * np.sin(a)) ** 2 + (xx - 0.8 * np.cos(a)) ** 2)) for a in angles])
    coil_images = torch.from_numpy((image * sens[None]).astype(np.complex64))  # (slices, coils, H, W)
    kspace = fft2c(coil_images).numpy()
    target = center_crop(rss(coil_images, dim=1)[:, 0], recon).numpy() if with_target else None
    write_fastmri_h5(
        path,
        kspace,
        target,
        header=ismrmrd_header_xml((*size, 1), (*recon, 1)),
        attrs={"acquisition": "AXT2", "patient_id": f"p{seed}", **({"max": float(target.max())} if with_target else {})},
    )
    return kspace, target


def zero_filled(kspace: np.ndarray, mask: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """Reference ``|F⁻¹(M k)|`` (RSS over coils when ``kspace`` is ``(coils, H, W)``), cropped: ``(h, w)``."""
    k = torch.from_numpy(kspace)
    image = center_crop(ifft2c(k * mask.reshape(1, -1)), crop)
    if image.ndim == 3:
        return image.abs().pow(2).sum(0).sqrt()
    return image.abs()


def dicom_header(modality: str, patient: str, study_uid: str, series_uid: str) -> "object":
    """A DICOM dataset with its file meta and identity: a new SOP instance of the MR or CT image storage class
    (``modality`` ``"MR"`` or ``"CT"``), the patient, study and series."""
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset

    sop_class = uid.MRImageStorage if modality == "MR" else uid.CTImageStorage
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientID = patient
    return ds


def make_dicom(pixels: np.ndarray, bits_stored: int | None = None, **elements) -> "object":
    """A minimal MR image DICOM dataset (explicit VR little endian) holding ``pixels`` (uint8/uint16 ``(H, W)``)."""
    ds = dicom_header("MR", "test", "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2")
    if bits_stored is None:
        bits_stored = 8 if pixels.dtype == np.uint8 else 12
    ds.set_pixel_data(np.ascontiguousarray(pixels), photometric_interpretation="MONOCHROME2", bits_stored=bits_stored)
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def save_dicom(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_baseline_dicom(pixels: np.ndarray, quality: int = 95):
    """An 8-bit greyscale image encoded with Pillow as JPEG baseline and encapsulated in a DICOM dataset."""
    import io

    from PIL import Image
    from pydicom import uid
    from pydicom.encaps import encapsulate

    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    ds = make_dicom(pixels.astype(np.uint8), bits_stored=8)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    return ds
