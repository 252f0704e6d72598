"""The synthetic knee phantoms (:mod:`blindspot.data.knee_phantom`) as fastMRI HDF5 files.

A phantom file has fastMRI's layout: ``kspace`` (complex64 ``(slices, H, W)`` single-coil or
``(slices, coils, H, W)`` multi-coil), ``reconstruction_esc`` / ``reconstruction_rss`` (float32 ``(slices, h, w)``),
an ISMRMRD ``ismrmrd_header`` shaped like fastMRI's, and the attributes ``acquisition``, ``patient_id``, ``max`` and
``norm`` (plus ``phantom_seed`` and ``phantom_version``, so a rerun recognises files it already wrote). Files are
written with the fastMRI reader's own writer (:func:`blindspot.data.fastmri.write_fastmri_h5`), so reader and writer
agree on the layout.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from blindspot.data.fastmri import CHALLENGES, ISMRMRD_NAMESPACE, SINGLECOIL, write_fastmri_h5
from blindspot.data.knee_phantom import (
    FASTMRI_KNEE_SHAPE,
    FASTMRI_RECON_SIZE,
    GENERATOR_VERSION,
    RECON_FOV_MM,
    SLICE_SPACING_MM,
    KneeVolume,
    generate_knee_volume,
    phantom_fname,
    phantom_geometry,
    reconstruction_from_kspace,
    volume_seeds,
)
from blindspot.errors import BlindspotError


def fastmri_header_xml(
    shape: Sequence[int],
    recon_size: Sequence[int],
    num_slices: int,
    num_coils: int = 1,
    pixel_spacing_mm: Sequence[float] | None = None,
    slice_thickness_mm: float = SLICE_SPACING_MM,
    acquisition: str = "CORPD_FBK",
) -> bytes:
    """An ISMRMRD XML header shaped like fastMRI's, for fully sampled Cartesian k-space ``(…, H, W)``.

    ``encoding/encodedSpace/matrixSize`` is ``(x=H, y=W, z=1)`` (readout, phase encode), ``reconSpace/matrixSize``
    ``(x=h, y=w, z=1)``; ``encodingLimits/kspace_encoding_step_1`` has ``maximum = W − 1`` and ``center = W // 2``,
    so a fastMRI-style reader computes ``padding_left = W // 2 − center = 0`` and ``padding_right = W`` (every
    column holds data). Fields of view are in mm (``pixel_spacing_mm`` defaults to 140 mm over ``recon_size``).
    """
    H, W = int(shape[0]), int(shape[1])
    h, w = int(recon_size[0]), int(recon_size[1])
    dy, dx = pixel_spacing_mm if pixel_spacing_mm is not None else (RECON_FOV_MM[0] / h, RECON_FOV_MM[1] / w)
    ET.register_namespace("", ISMRMRD_NAMESPACE)
    ns = f"{{{ISMRMRD_NAMESPACE}}}"

    def sub(parent: ET.Element, tag: str, text: Any = None) -> ET.Element:
        el = ET.SubElement(parent, ns + tag)
        if text is not None:
            el.text = f"{text:g}" if isinstance(text, float) else str(text)
        return el

    def xyz(parent: ET.Element, tag: str, x: Any, y: Any, z: Any) -> None:
        el = sub(parent, tag)
        sub(el, "x", x), sub(el, "y", y), sub(el, "z", z)

    def limit(parent: ET.Element, tag: str, maximum: int, center: int) -> None:
        el = sub(parent, tag)
        sub(el, "minimum", 0), sub(el, "maximum", maximum), sub(el, "center", center)

    root = ET.Element(ns + "ismrmrdHeader")
    meas = sub(root, "measurementInformation")
    sub(meas, "patientPosition", "FFS")
    sub(meas, "protocolName", f"{acquisition} (blindspot synthetic knee phantom)")
    system = sub(root, "acquisitionSystemInformation")
    sub(system, "systemVendor", "blindspot")
    sub(system, "systemModel", "synthetic knee phantom")
    sub(system, "systemFieldStrength_T", 3.0)
    sub(system, "receiverChannels", int(num_coils))
    sub(sub(root, "experimentalConditions"), "H1resonanceFrequency_Hz", 127_730_000)
    enc = sub(root, "encoding")
    space = sub(enc, "encodedSpace")
    xyz(space, "matrixSize", H, W, 1)
    xyz(space, "fieldOfView_mm", round(H * dy, 4), round(W * dx, 4), float(slice_thickness_mm))
    space = sub(enc, "reconSpace")
    xyz(space, "matrixSize", h, w, 1)
    xyz(space, "fieldOfView_mm", round(h * dy, 4), round(w * dx, 4), float(slice_thickness_mm))
    sub(enc, "trajectory", "cartesian")
    limits = sub(enc, "encodingLimits")
    limit(limits, "kspace_encoding_step_1", W - 1, W // 2)
    limit(limits, "kspace_encoding_step_2", 0, 0)
    limit(limits, "slice", max(0, int(num_slices) - 1), int(num_slices) // 2)
    limit(limits, "contrast", 0, 0)
    limit(limits, "repetition", 0, 0)
    seq = sub(root, "sequenceParameters")
    fat_sat = acquisition == "CORPDFS_FBK"
    sub(seq, "TR", 3000.0 if fat_sat else 2750.0)
    sub(seq, "TE", 33.0 if fat_sat else 27.0)
    sub(seq, "flipAngle_deg", 90.0)
    sub(seq, "sequence_type", "TurboSpinEcho")
    body = ET.tostring(root, encoding="utf-8")
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + body


def challenge_coils(challenge: str, num_coils: int) -> int | None:
    """The ``num_coils`` argument of :func:`~blindspot.data.knee_phantom.generate_knee_volume` for a fastMRI
    ``challenge``: ``None`` for ``"singlecoil"``, ``num_coils`` (at least 1) for ``"multicoil"``."""
    if challenge not in CHALLENGES:
        raise BlindspotError(None, f"unknown challenge {challenge!r}; choose from {list(CHALLENGES)}")
    if challenge == SINGLECOIL:
        return None
    if int(num_coils) < 1:
        raise BlindspotError(None, f"number of coils must be at least 1, got {num_coils}")
    return int(num_coils)


def write_fastmri_volume(
    path: str | os.PathLike[str],
    kspace: Tensor | np.ndarray,
    reconstruction: Tensor | np.ndarray,
    attrs: dict[str, Any],
    header_xml: bytes,
) -> Path:
    """Write one volume as a fastMRI HDF5 file, atomically (temporary file in the same folder, then rename).

    Checks the arrays and fills in ``max`` / ``norm``, then writes with
    :func:`blindspot.data.fastmri.write_fastmri_h5` (the reader's own writer), so both agree on the layout.

    Args:
        path: the ``.h5`` file to write (parent folders are created).
        kspace: complex64 ``(slices, H, W)`` (single-coil) or ``(slices, coils, H, W)`` (multi-coil).
        reconstruction: float32 ``(slices, h, w)``; stored as ``reconstruction_esc`` (single-coil) or
            ``reconstruction_rss`` (multi-coil).
        attrs: file attributes; fastMRI's are ``acquisition``, ``patient_id``, ``max`` and ``norm`` (``max`` /
            ``norm`` of the reconstruction are filled in when missing). Values must be str, int or float.
        header_xml: the ``ismrmrd_header`` bytes (see :func:`fastmri_header_xml`).

    Returns:
        ``path``.
    """
    path = Path(path)
    k = kspace.detach().cpu().numpy() if isinstance(kspace, Tensor) else np.asarray(kspace)
    rec = reconstruction.detach().cpu().numpy() if isinstance(reconstruction, Tensor) else np.asarray(reconstruction)
    k, rec = k.astype(np.complex64, copy=False), rec.astype(np.float32, copy=False)
    if k.ndim not in (3, 4):
        raise BlindspotError(path, f"k-space must be (slices, H, W) or (slices, coils, H, W), got {k.shape}")
    if rec.ndim != 3 or rec.shape[0] != k.shape[0]:
        raise BlindspotError(path, f"reconstruction must be (slices, h, w) with {k.shape[0]} slices, got {rec.shape}")
    attrs = dict(attrs)
    attrs.setdefault("max", float(rec.max()))
    attrs.setdefault("norm", float(np.linalg.norm(rec.astype(np.float64))))
    write_fastmri_h5(path, k, rec, header=bytes(header_xml), attrs=attrs)
    return path


def volume_arrays(volume: KneeVolume) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """What the fastMRI file of ``volume`` holds: ``(kspace, reconstruction, attrs)``.

    ``kspace`` is complex64 ``F(image)`` (``(S, H, W)`` or ``(S, C, H, W)``), ``reconstruction`` the float32
    ``(S, h, w)`` centre-cropped magnitude / RSS of ``ifft2c(kspace)``, and ``attrs`` the file attributes
    (``acquisition``, ``patient_id``, ``max``, ``norm``, plus ``phantom_seed`` and ``phantom_version``). The
    writer and :class:`~blindspot.data.phantom_dataset.PhantomDataset` both use this, so they agree exactly.
    """
    kspace = volume.kspace()
    rec = reconstruction_from_kspace(kspace, volume.recon_size)
    attrs: dict[str, Any] = {
        **volume.attrs,
        "max": float(rec.max()),
        "norm": float(torch.linalg.vector_norm(rec.to(torch.float64))),
        "phantom_seed": int(volume.seed),
        "phantom_version": int(GENERATOR_VERSION),
    }
    return kspace, rec, attrs


def write_volume_file(
    path: str | os.PathLike[str], volume: KneeVolume, extra_attrs: dict[str, Any] | None = None
) -> Path:
    """Write ``volume`` as the fastMRI file ``path``: its :func:`volume_arrays` plus ``extra_attrs``, with a
    :func:`fastmri_header_xml` header (see :func:`write_fastmri_volume`). Returns ``path``."""
    kspace, rec, attrs = volume_arrays(volume)
    attrs.update(extra_attrs or {})
    S, H, W = volume.image.shape[0], *volume.image.shape[-2:]
    header = fastmri_header_xml((H, W), volume.recon_size, S, volume.num_coils, volume.pixel_spacing_mm,
                                acquisition=volume.acquisition)
    return write_fastmri_volume(path, kspace, rec, attrs, header)


def _existing_matches(path: Path, vseed: int, kspace_shape: tuple[int, ...]) -> bool:
    """Whether ``path`` already holds phantom ``vseed`` with this k-space shape and generator version (resume)."""
    try:
        with h5py.File(path, "r") as hf:
            return (
                int(hf.attrs.get("phantom_seed", -1)) == vseed
                and int(hf.attrs.get("phantom_version", -1)) == GENERATOR_VERSION
                and tuple(hf["kspace"].shape) == kspace_shape
                and ("reconstruction_esc" in hf or "reconstruction_rss" in hf)
                and "ismrmrd_header" in hf
            )
    except (OSError, KeyError, ValueError):
        return False


def write_phantom_volumes(
    out_dir: str | os.PathLike[str],
    volumes: int,
    slices: int,
    seed: int = 0,
    shape: Sequence[int] = FASTMRI_KNEE_SHAPE,
    challenge: str = "singlecoil",
    num_coils: int = 8,
    recon_size: Sequence[int] = FASTMRI_RECON_SIZE,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Write ``volumes`` synthetic knee volumes as fastMRI HDF5 files in ``out_dir``.

    Volume ``v`` has seed ``seed + v`` and file name :func:`phantom_fname` (``file_phantom_000123.h5``). A file
    that already holds the same phantom (seed, shape, generator version) is kept, so an interrupted run resumes; a
    file holding anything else is a :class:`BlindspotError` unless ``overwrite=True``, which rewrites everything.
    Single-coil files hold ``kspace`` ``(slices, H, W)`` and ``reconstruction_esc``; multi-coil files ``kspace``
    ``(slices, num_coils, H, W)`` and ``reconstruction_rss``.

    Returns:
        The paths of all ``volumes`` files, in order.
    """
    coils = challenge_coils(challenge, num_coils)
    if int(slices) < 1:
        raise BlindspotError(None, f"need at least one slice, got {slices}")
    geo = phantom_geometry(shape, recon_size)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BlindspotError(out_dir, "exists and is not a folder")
    k_shape = (int(slices), *geo.shape) if coils is None else (int(slices), coils, *geo.shape)
    paths = []
    for vseed in tqdm(volume_seeds(seed, volumes), desc="phantom volumes", unit="vol", disable=not progress):
        path = out_dir / phantom_fname(vseed)
        if not overwrite and path.exists():
            if not _existing_matches(path, vseed, k_shape):  # never replace other data without overwrite
                raise BlindspotError(path, "already exists and holds other data (another phantom, slice count, size "
                                           "or coils); pass --overwrite to replace it, or choose another folder")
            paths.append(path)
            continue
        vol = generate_knee_volume(vseed, int(slices), geo.shape, geo.recon_size, num_coils=coils)
        paths.append(write_volume_file(path, vol))
        del vol
    return paths
