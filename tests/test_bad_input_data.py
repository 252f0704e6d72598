"""Bad data and checkpoints through the command line: every case exits 2 with one stderr line that names the file,
and no traceback. Headers are checked before arrays are allocated; degenerate data and damaged networks are refused
instead of giving meaningless figures (SSIM 1.0, PSNR 256 dB, a 0 % attack rate).

Each case builds its input under ``tmp_path`` and returns ``(argv, file the message must name, words it must
contain)``.
"""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from blindspot.cli import main
from blindspot.models.checkpoint import save_checkpoint
from blindspot.models.registry import build_model

from helpers_data import make_dicom, save_dicom, smooth_image, write_singlecoil

TINY_UNET = {"chans": 2, "num_pool_layers": 1}


# ----------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------
def _kspace_file(path: Path, kspace: np.ndarray) -> Path:
    """A fastMRI-style HDF5 file holding only ``kspace`` ``(slices, H, W)``."""
    with h5py.File(path, "w") as hf:
        hf["kspace"] = kspace
    return path


def _inspect(path: Path, *extra: str) -> list[str]:
    return ["data", "inspect", str(path), *extra]


def _evaluate(ckpt: Path, tmp_path: Path) -> list[str]:
    return ["evaluate", str(ckpt), "--no-zero-filled", "--phantom-volumes", "1", "--phantom-slices", "1",
            "--out", str(tmp_path / "ev")]


def _ct_invariances(data: Path, tmp_path: Path) -> list[str]:
    return ["invariances", "--model", "gaussian-ri", "--data", str(data), "--iterations", "1", "--figures", "0",
            "--out", str(tmp_path / "inv")]


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares ``width × height`` (valid CRCs) with one tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def _ct_dicom(path: Path, hu: np.ndarray, **elements) -> Path:
    """A CT slice: int16 stored values with intercept −1024."""
    ds = make_dicom((np.rint(hu) + 1024).astype(np.int16), Modality="CT", RescaleSlope=1, RescaleIntercept=-1024,
                    **elements)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_dicom(ds, path)


def _ct_slice(size: int = 32) -> np.ndarray:
    return (smooth_image((size, size), seed=3) * 800 - 900).astype(np.float32)


def _unet_ckpt(path: Path, poison: float | None = None, hparams: dict | None = None) -> Path:
    model = build_model("unet", **TINY_UNET)
    if poison is not None:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = poison
    save_checkpoint(path, model, "unet", dict(hparams or TINY_UNET), physics={"modality": "mri"})
    return path


def _ldct_tree(root: Path, n: int = 2, size: int = 16) -> Path:
    """LDCT layout of one patient with ``n`` paired slices (written with the package's own writer)."""
    from blindspot.data.ldct import write_ct_slice

    study = root / "L001" / "01-01-2020-NA-study-1"
    for kind, number, uid in (("Full Dose Images", 1, "1.2.3.1"), ("Low Dose Images", 2, "1.2.3.2")):
        for k in range(n):
            write_ct_slice(study / f"{number}.000000-{kind}-1" / f"1-{k + 1:03d}.dcm", _ct_slice(size),
                           patient_id="L001", study_uid="1.2.3", series_uid=uid, frame_uid="1.2.3.9",
                           sop_uid=f"{uid}.{k}", series_number=number, series_description=kind, instance_number=k + 1,
                           z_mm=float(k), pixel_spacing_mm=1.0)
    return study


# ----------------------------------------------------------------------------------------------------------------
# HDF5 (fastMRI): headers before allocation, degenerate data, sizes, crops
# ----------------------------------------------------------------------------------------------------------------
def huge_kspace_declared(tmp_path):
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as hf:  # declared, never written: the file is a few kB
        hf.create_dataset("kspace", shape=(1, 100_000, 100_000), dtype=np.complex64, chunks=(1, 64, 64))
    return _inspect(path), path, "beyond the limit"


def huge_target_declared(tmp_path):
    path = tmp_path / "hugetarget.h5"
    with h5py.File(path, "w") as hf:
        hf["kspace"] = np.ones((1, 16, 16), np.complex64)
        hf.create_dataset("reconstruction_esc", shape=(1, 60_000, 60_000), dtype=np.float32, chunks=(1, 64, 64))
    return _inspect(path), path, "reconstruction_esc declares slices"


def all_zero_kspace(tmp_path):
    path = _kspace_file(tmp_path / "zeros.h5", np.zeros((2, 16, 16), np.complex64))
    return _inspect(path), path, "k-space is all zero"


def constant_target(tmp_path):
    path = tmp_path / "flat.h5"
    write_singlecoil(path, slices=2, size=(16, 16), recon=(16, 16))
    with h5py.File(path, "r+") as hf:
        hf["reconstruction_esc"][...] = 3.0
    return _inspect(path), path, "reconstruction_esc is constant"


def tiny_kspace_1x1(tmp_path):
    path = _kspace_file(tmp_path / "one.h5", np.ones((1, 1, 1), np.complex64))
    return _inspect(path), path, "smaller than the 8x8 minimum"


def tiny_kspace_4x4(tmp_path):
    path = _kspace_file(tmp_path / "four.h5", np.ones((1, 4, 4), np.complex64))
    return _inspect(path), path, "smaller than the 8x8 minimum"


def crop_larger_than_data(tmp_path):
    path = tmp_path / "small.h5"
    write_singlecoil(path, slices=1, size=(16, 16), recon=(16, 16))
    return _inspect(path, "--crop", "1000", "1000"), path, "1000 1000 is larger than the 16x16 image"


# ----------------------------------------------------------------------------------------------------------------
# Image files: decompression bombs, sizes, constant images
# ----------------------------------------------------------------------------------------------------------------
def png_decompression_bomb(tmp_path):
    path = _png_header_only(tmp_path / "bomb.png", 30_000, 30_000)  # 9e8 pixels declared in 100 bytes
    return _inspect(path), path, "decompression bomb"


def png_over_our_limit(tmp_path):
    path = _png_header_only(tmp_path / "large.png", 17_000, 17_000)  # 2.9e8 pixels: above 2**28
    return _inspect(path), path, "too large to decode safely"


def png_1x1(tmp_path):
    path = tmp_path / "dot.png"
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(path)
    return _inspect(path), path, "1x1 pixels is smaller than the 8x8 minimum"


def png_constant(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(path)
    return _inspect(path), path, "is constant"


def npy_4x4(tmp_path):
    path = tmp_path / "small.npy"
    np.save(path, smooth_image((4, 4)))
    return _inspect(path), path, "4x4 pixels is smaller"


def npy_constant(tmp_path):
    path = tmp_path / "flat.npy"
    np.save(path, np.full((16, 16), 2.5, np.float32))
    return _inspect(path), path, "is constant"


def dicom_huge_rows_columns(tmp_path):
    ds = make_dicom(np.ones((8, 8), np.uint16))
    ds.Rows, ds.Columns = 60_000, 60_000  # the header asks for 3.6e9 pixels; the file holds 64
    path = save_dicom(ds, tmp_path / "huge.dcm")
    return _inspect(path), path, "beyond the limit"


def dicom_4x4(tmp_path):
    path = save_dicom(make_dicom(np.arange(16, dtype=np.uint16).reshape(4, 4)), tmp_path / "tiny.dcm")
    return _inspect(path), path, "4x4 pixels is smaller"


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def nan_weights_evaluate(tmp_path):
    path = _unet_ckpt(tmp_path / "nan.pt", float("nan"))
    return _evaluate(path, tmp_path), path, "weights contain NaN or Inf"


def inf_weights_evaluate(tmp_path):
    path = _unet_ckpt(tmp_path / "inf.pt", float("inf"))
    return _evaluate(path, tmp_path), path, "weights contain NaN or Inf"


def nan_weights_fnaf(tmp_path):
    path = _unet_ckpt(tmp_path / "nanfnaf.pt", float("nan"))
    return ["fnaf", "--model", str(path), "--out", str(tmp_path / "fnaf")], path, "weights contain NaN or Inf"


def nan_weights_ct_invariances(tmp_path):
    model = build_model("cnn10")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    path = save_checkpoint(tmp_path / "cnn_nan.pt", model, "cnn10", {}, physics={"modality": "ct"})
    return ["invariances", "--model", str(path), "--phantoms", "1", "--size", "32", "--iterations", "1",
            "--out", str(tmp_path / "inv")], path, "weights contain NaN or Inf"


def huge_network_hparams(tmp_path):
    path = tmp_path / "huge.pt"
    state = build_model("unet", **TINY_UNET).state_dict()
    torch.save({"format": "blindspot-checkpoint", "version": 1, "architecture": "unet",
                "hparams": {"chans": 4096, "num_pool_layers": 4}, "state_dict": state, "physics": {"modality": "mri"}},
               path)
    return _evaluate(path, tmp_path), path, "parameters, beyond the limit"


def absurd_hparam_integer(tmp_path):
    path = tmp_path / "absurd.pt"
    state = build_model("unet", **TINY_UNET).state_dict()
    torch.save({"format": "blindspot-checkpoint", "version": 1, "architecture": "unet",
                "hparams": {"chans": 2, "num_pool_layers": 10**9}, "state_dict": state}, path)
    return _evaluate(path, tmp_path), path, "num_pool_layers=1000000000 is beyond the limit"


def pickled_object_checkpoint(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "where": Path("/etc")}, path)  # an object a weights-only load refuses
    return _evaluate(path, tmp_path), path, "pathlib.PosixPath beyond tensors and plain containers"


def raw_pickle_checkpoint(tmp_path):
    path = tmp_path / "raw.pt"
    raw = io.BytesIO()
    pickle.dump({"a": 1}, raw, protocol=4)  # a pickle, but no PyTorch checkpoint
    path.write_bytes(raw.getvalue())
    return _evaluate(path, tmp_path), path, "not a loadable checkpoint (corrupt, or not a PyTorch file"


def garbage_checkpoint(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    return _evaluate(path, tmp_path), path, "not a loadable checkpoint"


def folder_as_checkpoint(tmp_path):
    path = tmp_path / "ckpt_dir"
    path.mkdir()
    return _evaluate(path, tmp_path), path, "is a directory, expected a checkpoint file"


# ----------------------------------------------------------------------------------------------------------------
# CT series and images
# ----------------------------------------------------------------------------------------------------------------
def ct_series_with_corrupt_member(tmp_path):
    series = tmp_path / "series"
    _ct_dicom(series / "IM1.dcm", _ct_slice(), ImagePositionPatient=[0, 0, 0])
    _ct_dicom(series / "IM2.dcm", _ct_slice(), ImagePositionPatient=[0, 0, 1])
    bad = series / "IM3.dcm"
    bad.write_bytes(b"garbage, not DICOM" * 20)
    return _ct_invariances(series, tmp_path), bad, "not a DICOM file"


def ldct_corrupt_full_dose_file(tmp_path):
    """A corrupt full-dose member is blamed on itself, not on its low-dose partner."""
    study = _ldct_tree(tmp_path / "LDCT")
    bad = study / "1.000000-Full Dose Images-1" / "1-002.dcm"
    bad.write_bytes(bad.read_bytes()[:100])
    return _ct_invariances(tmp_path / "LDCT", tmp_path), bad, "not a DICOM file"


def ldct_truncated_full_dose_pixels(tmp_path):
    study = _ldct_tree(tmp_path / "LDCT")
    bad = study / "1.000000-Full Dose Images-1" / "1-001.dcm"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - 200])
    return _ct_invariances(tmp_path / "LDCT", tmp_path), bad, "truncated"


def ct_all_padding(tmp_path):
    path = _ct_dicom(tmp_path / "ct" / "pad.dcm", np.full((32, 32), -3024.0), PixelRepresentation=1)
    return _ct_invariances(path, tmp_path), path, "inside the field of view"


def ct_npy_4x4(tmp_path):
    path = tmp_path / "ct4.npy"
    np.save(path, _ct_slice(4))
    return _ct_invariances(path, tmp_path), path, "smaller than the 8x8 minimum"


def ct_npy_huge_declared(tmp_path):
    path = tmp_path / "hugect.npy"
    header = {"descr": "<f4", "fortran_order": False, "shape": (70_000, 70_000)}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(b"\x00" * 64)  # the declared 19.6 GB are not there
    return _ct_invariances(path, tmp_path), path, "npy"


def ct_npy_nan(tmp_path):
    path = tmp_path / "nan.npy"
    img = _ct_slice()
    img[3, 3] = np.nan
    np.save(path, img)
    return _ct_invariances(path, tmp_path), path, "NaN or Inf"


CASES = {f.__name__: f for f in (
    huge_kspace_declared, huge_target_declared, all_zero_kspace, constant_target, tiny_kspace_1x1, tiny_kspace_4x4,
    crop_larger_than_data, png_decompression_bomb, png_over_our_limit, png_1x1, png_constant, npy_4x4, npy_constant,
    dicom_huge_rows_columns, dicom_4x4, nan_weights_evaluate, inf_weights_evaluate, nan_weights_fnaf,
    nan_weights_ct_invariances, huge_network_hparams, absurd_hparam_integer, pickled_object_checkpoint,
    raw_pickle_checkpoint,
    garbage_checkpoint, folder_as_checkpoint, ct_series_with_corrupt_member, ldct_corrupt_full_dose_file,
    ldct_truncated_full_dose_pixels, ct_all_padding, ct_npy_4x4, ct_npy_huge_declared, ct_npy_nan,
)}


@pytest.mark.parametrize("case", list(CASES))
def test_exit_2_one_line_naming_the_file(tmp_path, case, capsys):
    argv, named, words = CASES[case](tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert code == 2, (code, captured.err)
    assert len(err) == 1, err
    assert str(named) in err[0] and words in err[0], err[0]
    assert "weights_only" not in err[0]


def test_skip_bad_lists_what_it_left_out(tmp_path):
    """``find_ldct(..., skip_bad=True)`` leaves out a corrupt member and its partner, and says so."""
    from blindspot.data.ldct import find_ldct

    study = _ldct_tree(tmp_path / "LDCT", n=3)
    bad = study / "1.000000-Full Dose Images-1" / "1-002.dcm"
    bad.write_bytes(b"junk" * 10)
    (patient,) = find_ldct(tmp_path / "LDCT", skip_bad=True)
    assert len(patient.slices) == 2
    partner = study / "2.000000-Low Dose Images-1" / "1-002.dcm"
    skipped = dict(patient.skipped)
    assert set(skipped) == {bad, partner}
    assert "not a DICOM file" in skipped[bad] and skipped[partner] == "its partner slice was skipped"


def test_degenerate_metrics_are_errors_not_perfect_scores():
    """SSIM / PSNR of an all-zero image have no data range: an error, never 1.0 and 256 dB; a constant target with a
    positive range keeps its defined value."""
    from blindspot.errors import BlindspotError
    from blindspot.metrics import VolumeMetrics, psnr, ssim

    zero = torch.zeros(1, 1, 16, 16)
    with pytest.raises(BlindspotError, match="data range"):
        ssim(zero, zero, 0.0)
    with pytest.raises(BlindspotError, match="data range"):
        psnr(zero, zero, 0.0)
    with pytest.raises(BlindspotError, match="vol.h5: slice 3: the target image is all zero"):
        VolumeMetrics().update(zero, zero, ["vol.h5"], [3], torch.zeros(1))
    flat = torch.full((1, 1, 16, 16), 0.5)
    assert float(ssim(flat, flat, 1.0)) == pytest.approx(1.0)  # defined: identical images, positive range
    assert float(ssim(flat * 0.9, flat, 1.0)) < 1.0


def test_training_never_keeps_an_undefined_best(tmp_path):
    """A validation figure that is NaN (degenerate validation data) stops training before any best.pt is chosen."""
    from blindspot.errors import BlindspotError
    from blindspot.training.engine import CheckpointInfo, TrainConfig, Trainer

    model = torch.nn.Conv2d(1, 1, 1)
    data = [(torch.randn(1, 8, 8), torch.randn(1, 8, 8)) for _ in range(2)]

    def loss_fn(m, batch, ctx):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-3, select_metric="ssim", select_mode="max", progress=False)
    trainer = Trainer(model, loss_fn, data, cfg, tmp_path / "run", CheckpointInfo("conv", {}),
                      validate=lambda m, d: {"ssim": float("nan")})
    with pytest.raises(BlindspotError, match="undefined figures"):
        trainer.fit()
    assert not (tmp_path / "run" / "best.pt").exists()


def test_non_finite_network_output_in_an_invariance_attack_names_the_network():
    """One check per batch: a network whose output is NaN is refused, named, before any optimisation."""
    from blindspot.attacks.distances import BoundedMSE
    from blindspot.attacks.invariance import DenoiserTarget, InvarianceAttack, InvarianceConfig
    from blindspot.errors import BlindspotError
    from blindspot.models.adapters import Network

    class Broken(torch.nn.Module):
        def forward(self, x):
            return x * float("nan")

    attack = InvarianceAttack(BoundedMSE(), config=InvarianceConfig(iterations=2, progress=False))
    with pytest.raises(BlindspotError, match="^broken-denoiser: the network's output on the clean images contains NaN"):
        attack(DenoiserTarget(Network(Broken(), "image", name="broken-denoiser")), torch.randn(1, 1, 16, 16))
