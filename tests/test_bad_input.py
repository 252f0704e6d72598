"""Every bad MRI input ends with one line naming the file and the problem — in the library and through
``blindspot data inspect`` (exit code 2, no traceback). Nothing is skipped silently."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from pydicom import uid
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder

from blindspot.cli import main
from blindspot.data.dicom import read_dicom, read_dicom_series
from blindspot.data.fastmri import FastMRISliceDataset, ismrmrd_header_xml
from blindspot.data.mri import open_mri_dataset
from blindspot.errors import BlindspotError

from helpers_data import make_dicom, save_dicom, smooth_image, write_singlecoil


# ------------------------------------------------------------------------------------------------------------------
# Each case writes a bad input under tmp_path and returns (path given to the tool, file the message must name,
# words the message must contain, extra CLI arguments).
# ------------------------------------------------------------------------------------------------------------------
def _good_h5(tmp_path: Path, name: str = "file1.h5", **kw) -> Path:
    path = tmp_path / name
    write_singlecoil(path, slices=3, size=(16, 16), recon=(16, 16), **kw)
    return path


def _truncated_h5(tmp_path):
    path = _good_h5(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path, path, "truncated HDF5 file", []


def _not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("this is not HDF5\n" * 20)
    return path, path, "not an HDF5 file", []


def _empty_h5(tmp_path):
    path = tmp_path / "empty.h5"
    path.write_bytes(b"")
    return path, path, "not an HDF5 file", []


def _missing_kspace(tmp_path):
    path = tmp_path / "nokspace.h5"
    with h5py.File(path, "w") as hf:
        hf["reconstruction_esc"] = np.ones((2, 8, 8), np.float32)
    return path, path, "missing key 'kspace' (keys present: reconstruction_esc)", []


def _kspace_is_group(tmp_path):
    path = tmp_path / "group.h5"
    with h5py.File(path, "w") as hf:
        hf.create_group("kspace")
    return path, path, "'kspace' is an HDF5 group", []


def _kspace_2d(tmp_path):
    path = tmp_path / "flat.h5"
    with h5py.File(path, "w") as hf:
        hf["kspace"] = np.ones((16, 16), np.complex64)
    return path, path, "kspace has 2 dimensions (16, 16)", []


def _kspace_5d(tmp_path):
    path = tmp_path / "five.h5"
    with h5py.File(path, "w") as hf:
        hf["kspace"] = np.ones((1, 2, 2, 8, 8), np.complex64)
    return path, path, "kspace has 5 dimensions", []


def _kspace_real(tmp_path):
    path = tmp_path / "real.h5"
    with h5py.File(path, "w") as hf:
        hf["kspace"] = np.ones((2, 8, 8), np.float32)
    return path, path, "kspace dtype float32 is not complex", []


def _target_mismatch(tmp_path):
    path = tmp_path / "target.h5"
    with h5py.File(path, "w") as hf:
        hf["kspace"] = np.ones((3, 8, 8), np.complex64)
        hf["reconstruction_esc"] = np.ones((2, 8, 8), np.float32)
    return path, path, "reconstruction_esc has shape (2, 8, 8); expected (3, h, w)", []


def _challenge_mismatch(tmp_path):
    path = _good_h5(tmp_path)
    return path, path, "but challenge multicoil expects (slices, coils, H, W)", ["--challenge", "multicoil"]


def _bad_header(tmp_path):
    path = _good_h5(tmp_path, header=b"<ismrmrdHeader><encoding>")
    return path, path, "ismrmrd_header is not valid XML", []


def _bad_max(tmp_path):
    path = _good_h5(tmp_path, attrs={"max": float("nan")})
    return path, path, "attribute 'max' is nan", []


def _nan_kspace(tmp_path):
    path = _good_h5(tmp_path, name="nan.h5")
    with h5py.File(path, "r+") as hf:
        k = hf["kspace"][2]
        k[3, 4] = np.nan
        hf["kspace"][2] = k
    return path, path, "slice 2: k-space contains 1 NaN values", []


def _inf_kspace(tmp_path):
    path = _good_h5(tmp_path, name="inf.h5")
    with h5py.File(path, "r+") as hf:
        k = hf["kspace"][1]
        k[0, :2] = np.inf
        hf["kspace"][1] = k
    return path, path, "slice 1: k-space contains 2 Inf values", []


def _nan_target(tmp_path):
    path = _good_h5(tmp_path, name="nantarget.h5")
    with h5py.File(path, "r+") as hf:
        t = hf["reconstruction_esc"][0]
        t[0, 0] = np.nan
        hf["reconstruction_esc"][0] = t
    return path, path, "slice 0: reconstruction_esc contains 1 NaN values", []


def _bad_volume_in_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _good_h5(folder, "a.h5")
    bad = folder / "b.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 8)
    return folder, bad, "HDF5", []


def _empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / ".DS_Store").write_bytes(b"hidden")
    return folder, folder, "empty folder", []


def _mixed_folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _good_h5(folder, "a.h5")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(folder / "b.png")
    return folder, folder, "mixes 1 HDF5 volume(s) and 1 image file(s)", []


def _other_file_in_folder(tmp_path):
    folder = tmp_path / "withtext"
    folder.mkdir()
    _good_h5(folder, "a.h5")
    (folder / "readme.txt").write_text("hello")
    return folder, folder / "readme.txt", "not an MRI data file", []


def _unknown_file(tmp_path):
    path = tmp_path / "scan.xyz"
    path.write_text("?")
    return path, path, "not an MRI data file", []


def _missing_path(tmp_path):
    path = tmp_path / "nowhere"
    return path, path, "no such file or folder", []


def _dicom_without_pixels(tmp_path):
    ds = make_dicom(np.ones((8, 8), np.uint16))
    del ds.PixelData
    path = save_dicom(ds, tmp_path / "nopixels.dcm")
    return path, path, "no pixel data", []


def _not_dicom(tmp_path):
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"\0" * 300)
    return path, path, "not a DICOM file", []


def _truncated_dicom(tmp_path):
    path = save_dicom(make_dicom(np.ones((16, 16), np.uint16)), tmp_path / "cut.dcm")
    path.write_bytes(path.read_bytes()[:-100])
    return path, path, "truncated", []


def _truncated_compressed_dicom(tmp_path):
    ds = make_dicom(np.round(smooth_image((16, 16)) * 4000).astype(np.uint16))
    ds.compress(uid.RLELossless)
    path = save_dicom(ds, tmp_path / "cut_rle.dcm")
    path.write_bytes(path.read_bytes()[:-40])
    return path, path, "truncated", []


def _unsupported_syntax(tmp_path):
    ds = make_dicom(np.ones((8, 8), np.uint8))
    ds.PixelData = encapsulate([b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    path = save_dicom(ds, tmp_path / "video.dcm")
    return path, path, "transfer syntax MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100)", []


def _multiframe_dicom(tmp_path):
    ds = make_dicom(np.ones((3, 8, 8), np.uint16))
    path = save_dicom(ds, tmp_path / "frames.dcm")
    return path, path, "multi-frame image (3 frames)", []


def _not_png(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"GIF89a" + b"\0" * 50)
    return path, path, "not a PNG image", []


def _truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.round(smooth_image((32, 32)) * 255).astype(np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-30])
    return path, path, "corrupt or truncated PNG", []


def _nan_npy(tmp_path):
    path = tmp_path / "nan.npy"
    image = smooth_image((3, 8, 8))
    image[1, 2, 2] = np.nan
    np.save(path, image)
    return path, path, "slice 1: contains 1 NaN values", []


def _negative_npy(tmp_path):
    path = tmp_path / "negative.npy"
    np.save(path, smooth_image((8, 8)) - 0.5)
    return path, path, "has negative values", []


def _blank_npy(tmp_path):
    path = tmp_path / "blank.npy"
    np.save(path, np.zeros((8, 8), np.float32))
    return path, path, "is blank", []


def _npy_1d(tmp_path):
    path = tmp_path / "line.npy"
    np.save(path, np.ones(16, np.float32))
    return path, path, "array has shape (16,)", []


def _npy_objects(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return path, path, "not a readable NumPy .npy array", []


def _truncated_npy(tmp_path):
    path = tmp_path / "cut.npy"
    np.save(path, np.ones((16, 16), np.float32))
    path.write_bytes(path.read_bytes()[:-64])
    return path, path, "truncated or corrupt .npy file", []


CASES = {
    "truncated-h5": _truncated_h5,
    "not-hdf5": _not_hdf5,
    "empty-h5": _empty_h5,
    "missing-kspace": _missing_kspace,
    "kspace-group": _kspace_is_group,
    "kspace-2d": _kspace_2d,
    "kspace-5d": _kspace_5d,
    "kspace-real": _kspace_real,
    "target-shape": _target_mismatch,
    "challenge-mismatch": _challenge_mismatch,
    "bad-header": _bad_header,
    "bad-max": _bad_max,
    "nan-kspace": _nan_kspace,
    "inf-kspace": _inf_kspace,
    "nan-target": _nan_target,
    "bad-volume-in-folder": _bad_volume_in_folder,
    "empty-folder": _empty_folder,
    "mixed-folder": _mixed_folder,
    "other-file-in-folder": _other_file_in_folder,
    "unknown-file": _unknown_file,
    "missing-path": _missing_path,
    "dicom-no-pixels": _dicom_without_pixels,
    "not-dicom": _not_dicom,
    "truncated-dicom": _truncated_dicom,
    "truncated-compressed-dicom": _truncated_compressed_dicom,
    "unsupported-transfer-syntax": _unsupported_syntax,
    "multiframe-dicom": _multiframe_dicom,
    "not-png": _not_png,
    "truncated-png": _truncated_png,
    "nan-npy": _nan_npy,
    "negative-npy": _negative_npy,
    "blank-npy": _blank_npy,
    "npy-1d": _npy_1d,
    "npy-objects": _npy_objects,
    "truncated-npy": _truncated_npy,
}


def _open_and_read(path: Path, extra: list[str]) -> None:
    challenge = extra[1] if extra[:1] == ["--challenge"] else None
    open_mri_dataset(path, None, challenge=challenge).check()


@pytest.mark.parametrize("case", list(CASES))
def test_library_raises_one_line_naming_the_file(tmp_path, case):
    path, culprit, words, extra = CASES[case](tmp_path)
    with pytest.raises(BlindspotError) as info:
        _open_and_read(path, extra)
    err = info.value
    assert err.source == str(culprit)
    assert words in err.problem
    assert "\n" not in err.message and err.message.startswith(str(culprit))


@pytest.mark.parametrize("case", list(CASES))
def test_cli_exits_2_with_one_line(tmp_path, case, capsys):
    path, culprit, words, extra = CASES[case](tmp_path)
    code = main(["data", "inspect", str(path), *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"blindspot: error: {culprit}: ") and words in lines[0]


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.8, 0.95, 0.99])
def test_every_truncation_of_an_hdf5_file_is_caught(tmp_path, fraction):
    path = _good_h5(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(BlindspotError) as info:
        FastMRISliceDataset(path).check()
    assert info.value.source == str(path)


@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian, uid.JPEGLSLossless, uid.JPEG2000Lossless])
def test_every_truncation_of_a_dicom_file_is_caught(tmp_path, syntax):
    ds = make_dicom(np.round(smooth_image((32, 32)) * 4000).astype(np.uint16))  # JPEG 2000 needs >= 32 px here
    if syntax != uid.ExplicitVRLittleEndian:
        ds.compress(syntax)
    data = save_dicom(ds, tmp_path / "full.dcm").read_bytes()
    # cuts in the preamble, file meta, data set, pixel data and the final delimiter (checked at every byte offline)
    for cut in sorted({1, 100, 140, 200, 300, 400, len(data) // 2, len(data) - 60, len(data) - 9, len(data) - 1}):
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(BlindspotError) as info:
            read_dicom(path)
        assert info.value.source == str(path), cut


def test_compressed_dicom_without_decoder(tmp_path, monkeypatch, capsys):
    """Simulate an installation without any JPEG-LS plugin: the message names the transfer syntax."""
    ds = make_dicom(np.round(smooth_image((16, 16)) * 4000).astype(np.uint16))
    ds.compress(uid.JPEGLSLossless)
    path = save_dicom(ds, tmp_path / "jls.dcm")
    decoder = get_decoder(uid.JPEGLSLossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pyjpegls": ("pyjpegls",)})
    with pytest.raises(BlindspotError) as info:
        read_dicom(path)
    assert info.value.source == str(path)
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in info.value.problem
    assert "no decoder is available (pyjpegls - requires pyjpegls)" in info.value.problem
    assert main(["data", "inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no decoder is available" in err[0] and str(path) in err[0]


def test_dicom_series_with_mismatched_shapes(tmp_path):
    save_dicom(make_dicom(np.ones((8, 8), np.uint16), InstanceNumber=1), tmp_path / "a.dcm")
    save_dicom(make_dicom(np.ones((8, 10), np.uint16), InstanceNumber=2), tmp_path / "b.dcm")
    with pytest.raises(BlindspotError) as info:
        read_dicom_series(tmp_path)
    assert info.value.source == str(tmp_path / "b.dcm") and "image size 8x10 differs from 8x8" in info.value.problem


def test_dicom_series_problems(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BlindspotError, match="no DICOM files"):
        read_dicom_series(empty)
    same = tmp_path / "same"
    same.mkdir()
    for name in ("a.dcm", "b.dcm"):
        save_dicom(make_dicom(np.ones((8, 8), np.uint16), InstanceNumber=4), same / name)
    with pytest.raises(BlindspotError, match="a.dcm and b.dcm have the same InstanceNumber"):
        read_dicom_series(same)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_dicom(make_dicom(np.ones((8, 8), np.uint16), InstanceNumber=1), mixed / "a.dcm")
    save_dicom(make_dicom(np.ones((8, 8), np.uint16), InstanceNumber=2, SeriesInstanceUID="1.2.3"), mixed / "b.dcm")
    with pytest.raises(BlindspotError, match="holds 2 different series"):
        read_dicom_series(mixed)


def test_bad_options_are_one_line_errors(tmp_path):
    path = _good_h5(tmp_path)
    with pytest.raises(BlindspotError, match=r"sample_rate must be in \(0, 1\]"):
        FastMRISliceDataset(path, sample_rate=1.5)
    with pytest.raises(BlindspotError, match="not both"):
        FastMRISliceDataset(path, sample_rate=0.5, volume_sample_rate=0.5)
    with pytest.raises(BlindspotError, match="keeps no slice"):
        FastMRISliceDataset(path, sample_rate=0.1)
    with pytest.raises(BlindspotError, match="do not apply to fastMRI HDF5 data"):
        open_mri_dataset(path, None, resize="resample")
    png = tmp_path / "x.png"
    Image.fromarray(np.ones((8, 8), np.uint8)).save(png)
    with pytest.raises(BlindspotError, match="challenge do not apply to image files"):
        open_mri_dataset(png, None, challenge="singlecoil")
    with pytest.raises(BlindspotError, match="unknown resize mode"):
        open_mri_dataset(png, None, resize="stretch")


def test_inspect_summary_and_json(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        _good_h5(folder, f"file{i}.h5", seed=i)
    out = tmp_path / "summary.json"
    assert main(["data", "inspect", str(folder), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "volumes: 2    slices: 6" in text and "challenge: singlecoil (2)" in text
    assert "read all 6 slices" in text
    import json

    summary = json.loads(out.read_text())
    assert summary["checked_slices"] == 6 and summary["patients"] == 2
    assert summary["acquisition"] == {"CORPD_FBK": 2}


def test_header_with_non_numeric_values(tmp_path):
    header = ismrmrd_header_xml((16, 16, 1), (16, 16, 1)).replace(b"<x>16</x>", b"<x>sixteen</x>", 1)
    path = _good_h5(tmp_path, header=header)
    with pytest.raises(BlindspotError, match="encodedSpace/matrixSize/x is 'sixteen', not a number"):
        FastMRISliceDataset(path)


# ------------------------------------------------------------------------------------------------------------------
# The validation layer (blindspot.validate): argparse types with physical limits, sizes, output paths.
# ------------------------------------------------------------------------------------------------------------------
def test_argument_types_accept_the_range_and_refuse_the_rest():
    import argparse

    from blindspot import validate as v

    good = {v.acceleration: ["1", "4", "8.5", "32"], v.dose: ["1", "0.25", "1e-3"], v.fraction: ["0.5", "1e-9"],
            v.unit_fraction: ["1", "0.001"], v.positive_float: ["1e-12", "3"], v.non_negative_int: ["0", "7"],
            v.image_side: ["8", "16", "4096"], v.positive_int: ["1"]}
    bad = {v.acceleration: ["0", "0.99", "nan", "inf", "-4", "33", "x"], v.dose: ["0", "-0.5", "1.01", "nan"],
           v.fraction: ["0", "1", "nan"], v.unit_fraction: ["0", "5", "-1", "inf"],
           v.positive_float: ["0", "-1", "nan", "-inf"], v.non_negative_int: ["-1", "1.5", "nan"],
           v.image_side: ["1", "7", "4097", "16.0"], v.positive_int: ["0", "-3"]}
    for parse, texts in good.items():
        for text in texts:
            assert parse(text) == float(text)
    for parse, texts in bad.items():
        for text in texts:
            with pytest.raises(argparse.ArgumentTypeError):
                parse(text)


def test_hparam_values_are_parsed_and_type_checked():
    import argparse

    from blindspot import validate as v
    from blindspot.models.registry import model_defaults

    assert v.hparam("chans=16") == ("chans", 16) and v.hparam("dilations=[1,2]") == ("dilations", [1, 2])
    assert v.hparam("num-pool-layers=3") == ("num_pool_layers", 3) and v.hparam("name=abc") == ("name", "abc")
    for text in ("chans", "=3", "chans=NaN", "chans=Infinity", "chans=1e400", "dilations=[1, -Infinity]", "1x=2"):
        with pytest.raises(argparse.ArgumentTypeError):
            v.hparam(text)
    defaults = model_defaults("unet")
    v.check_hparam_types({"chans": 8, "drop_prob": 0}, defaults)  # an int is a fine float
    for hp, words in (({"chans": "abc"}, "chans must be an integer"), ({"chans": 8.5}, "chans must be an integer"),
                      ({"chans": True}, "chans must be an integer"), ({"nosuch": 1}, "unknown hyper-parameter")):
        with pytest.raises(BlindspotError, match=words) as info:
            v.check_hparam_types(hp, defaults)
        assert info.value.source == "--hparam"


def test_sizes_and_output_paths(tmp_path):
    from blindspot import validate as v

    assert v.check_array_bytes((8, 640, 368), 8, "--x") == 8 * 640 * 368 * 8
    with pytest.raises(BlindspotError, match=r"9999x4096x4096 \(.* GiB\), beyond the limit") as info:
        v.check_array_bytes((9999, 4096, 4096), 8, "--slices/--shape")
    assert info.value.source == "--slices/--shape"
    v.check_crop((16, 16), (3, 40, 40), "img.npy")
    with pytest.raises(BlindspotError, match="64 40 is larger than the 40x40 image of img.npy") as info:
        v.check_crop((64, 40), (40, 40), "img.npy")
    assert info.value.source == "--crop"
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.npy").write_bytes(b"x")
    for out, words in ((data, "is or lies inside the input data"), (data / "sub" / "run", "inside the input data"),
                       (tmp_path, "holds the input data"), (data / "a.npy", "exists and is not a folder")):
        with pytest.raises(BlindspotError, match=words):
            v.check_output_folder(out, inputs=[data])
    run = tmp_path / "run"
    assert v.check_output_folder(run, inputs=[data, None]) == run  # absent: fine, nothing created
    assert not run.exists()
    run.mkdir()
    (run / "table.md").write_text("old")
    with pytest.raises(BlindspotError, match=r"already holds results \(table.md\); pass --overwrite"):
        v.check_output_folder(run, results=["table.md", "x.csv"])
    v.check_output_folder(run, results=["table.md"], overwrite=True)
    with pytest.raises(BlindspotError, match="already exists; pass --overwrite"):
        v.check_output_file(run / "table.md", "--json")
    assert v.check_output_file(run / "table.md", "--json", overwrite=True) == run / "table.md"
    with pytest.raises(BlindspotError, match="is a folder"):
        v.check_output_file(run, "--json", overwrite=True)
    assert v.printable(Path(os.fsdecode(b"a\xffb.npy"))) == "a\\xffb.npy"
