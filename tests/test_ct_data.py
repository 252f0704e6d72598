"""CT data: synthetic phantoms, the DICOM writer, the LDCT-layout loader (pairing, HU, patient weights, split,
patches) and its one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blindspot.cli import main
from blindspot.data.ct_phantom import KINDS, PhantomDatasetSpec, PhantomPatient, ct_phantom, write_phantom_dataset
from blindspot.data.dicom import read_dicom
from blindspot.data.ldct import (
    LDCTDataset,
    PatchDataset,
    find_ldct,
    load_ct_images,
    series_dose,
    split_patients,
    write_ct_slice,
)
from blindspot.errors import BlindspotError
from blindspot.physics.ct import HUNormalization
from helpers_data import dicom_header


# ----------------------------------------------------------------------------------------------------------------
# A tiny LDCT tree written directly with pydicom
# ----------------------------------------------------------------------------------------------------------------
def _ct_file(path: Path, stored: np.ndarray, z: float, series_uid: str, description: str, *, slope=2.0,
             intercept=-1000.0, rescale=True, patient="P"):
    ds = dicom_header("CT", patient, "1.2.826.0.1.3680043.8.498.7", series_uid)
    ds.SeriesDescription = description
    ds.ImagePositionPatient = [-10.0, -10.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.set_pixel_data(np.ascontiguousarray(stored.astype(np.uint16)), photometric_interpretation="MONOCHROME2",
                      bits_stored=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _tree(root: Path, slices_per_patient=(1, 2, 4), shape=(12, 12), low_shape=None):
    """Patients P0, P1, P2 with 1, 2, 4 slices. Stored value s of full dose = 500 + 10·k + patient, low dose
    = full + 3; HU = 2·s − 1000. The low-dose files are named in reverse position order (pairing must use positions)."""
    base = root / "LDCT-and-Projection-data"
    for p, n in enumerate(slices_per_patient):
        study = base / f"P{p}" / "01-01-2020-NA-study-123"
        for k in range(n):
            full = np.full(shape, 500 + 10 * k + p)
            low = np.full(low_shape or shape, 503 + 10 * k + p)
            z = -5.0 * k
            _ct_file(study / "1.000000-Full Dose Images-111" / f"1-{k + 1:03d}.dcm", full, z, f"1.2.3.{p}.1",
                     "Full Dose Images", patient=f"P{p}")
            _ct_file(study / "1.000000-Low Dose Images-222" / f"1-{n - k:03d}.dcm", low, z, f"1.2.3.{p}.2",
                     "Low Dose Images", patient=f"P{p}")
    return base


def test_ldct_loader_pairs_by_position_and_converts_to_hu(tmp_path):
    root = _tree(tmp_path)
    patients = find_ldct(tmp_path)  # the parent of LDCT-and-Projection-data works too
    assert [p.patient for p in patients] == ["P0", "P1", "P2"]
    assert [len(p) for p in patients] == [1, 2, 4]
    assert find_ldct(root)[2].slices[0].full_file == patients[2].slices[0].full_file
    ds = LDCTDataset(patients)
    assert len(ds) == 7
    for i, s in enumerate(ds.slices):
        sample = ds[i]
        k = [sl.full_file for sl in patients[int(s.patient[1])].slices].index(s.full_file)
        assert s.low_file.parent.name.startswith("1.000000-Low") and s.low_file != s.full_file
        p = int(s.patient[1])
        # slices are sorted by position (ascending z: k = n−1 … 0); pairing followed positions, not file names
        expected_k = len(patients[p]) - 1 - s.index
        assert k == s.index
        full_hu = 2.0 * (500 + 10 * expected_k + p) - 1000.0
        assert torch.all(sample.full == full_hu) and torch.all(sample.low == full_hu + 6.0)
        assert sample.full.shape == (1, 12, 12)
    # equal-patient sampling weights: every patient's slices sum to 1/3 whatever their number
    w = ds.patient_weights()
    assert float(w.sum()) == pytest.approx(1.0)
    for p in ("P0", "P1", "P2"):
        assert float(sum(w[i] for i, s in enumerate(ds.slices) if s.patient == p)) == pytest.approx(1 / 3)
    # the public convention: no percentage, no known prefix → unknown dose
    assert patients[0].dose is None
    assert series_dose("1.000000-Low Dose Images-1", "L067") == 0.25
    assert series_dose("1.000000-Low Dose Images-1", "C002") == 0.10
    assert series_dose("2.000000-Low Dose Images (10%)-1", "L067") == 0.10


def test_patient_split_and_balanced_patches(tmp_path):
    _tree(tmp_path, slices_per_patient=(1, 2, 4, 3, 5))
    patients = find_ldct(tmp_path)
    train, val, test = split_patients(patients, 0.2, 0.2, seed=1)
    names = [p.patient for part in (train, val, test) for p in part]
    assert sorted(names) == [p.patient for p in patients] and len(set(names)) == 5
    assert (len(train), len(val), len(test)) == (3, 1, 1)
    again = split_patients(patients, 0.2, 0.2, seed=1)
    assert [[p.patient for p in part] for part in again] == [[p.patient for p in part] for part in (train, val, test)]
    with pytest.raises(BlindspotError):
        split_patients(patients[:1], 0.5, 0.0)
    # patches: deterministic per (seed, epoch, index); every patient drawn about equally often
    ds = LDCTDataset(find_ldct(tmp_path))
    norm = HUNormalization(0.0, 100.0)
    patches = PatchDataset(ds, 8, 1500, norm, seed=3, min_body=0.0)
    x, y = patches[5]
    assert x.shape == y.shape == (1, 8, 8)
    assert torch.equal(patches[5][0], x)
    assert torch.allclose(x - y, torch.full_like(x, 6.0 / 100.0))  # low = full + 6 HU, normalised
    full_values = {}
    for i, s in enumerate(ds.slices):
        full_values[round(float(ds[i].full[0, 0, 0]), 3)] = s.patient
    counts: dict[str, int] = {}
    for i in range(len(patches)):
        p = full_values[round(float(norm.to_hu(patches[i][1])[0, 0, 0]), 3)]
        counts[p] = counts.get(p, 0) + 1
    assert set(counts) == {"P0", "P1", "P2", "P3", "P4"}
    for c in counts.values():  # 1500 draws, expected 300 each
        assert 240 < c < 360, counts
    patches.set_epoch(1)
    assert not all(torch.equal(patches[i][1], PatchDataset(ds, 8, 1500, norm, seed=3, min_body=0.0)[i][1])
                   for i in range(20))


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file or folder
# ----------------------------------------------------------------------------------------------------------------
def _one_line(err: BlindspotError, where: Path) -> None:
    assert "\n" not in err.message
    assert err.source is not None and str(where) in err.source


def test_unpaired_series_and_unpaired_slices(tmp_path):
    base = _tree(tmp_path / "a", slices_per_patient=(2,))
    low = next(base.rglob("*Low Dose Images*"))
    for f in low.iterdir():
        f.unlink()
    low.rmdir()
    with pytest.raises(BlindspotError) as info:
        find_ldct(tmp_path / "a")
    _one_line(info.value, next(base.rglob("*Full Dose Images*")))
    assert "without a 'Low Dose Images' series" in info.value.problem

    base = _tree(tmp_path / "b", slices_per_patient=(3,))
    low = next(base.rglob("*Low Dose Images*"))
    victim = sorted(low.iterdir())[0]
    victim.unlink()
    with pytest.raises(BlindspotError) as info:
        find_ldct(tmp_path / "b")
    assert "no low-dose slice at its position" in info.value.problem
    assert "Full Dose Images" in info.value.source


def test_mismatched_shapes(tmp_path):
    _tree(tmp_path, slices_per_patient=(2,), low_shape=(12, 10))
    with pytest.raises(BlindspotError) as info:
        find_ldct(tmp_path)
    assert "differs from 12x12" in info.value.problem and "Low Dose Images" in info.value.source


def test_missing_rescale_tags(tmp_path):
    base = _tree(tmp_path, slices_per_patient=(2,))
    low = sorted(next(base.rglob("*Low Dose Images*")).iterdir())[1]
    _ct_file(low, np.full((12, 12), 500), -0.0, "1.2.3.0.2", "Low Dose Images", rescale=False, patient="P0")
    with pytest.raises(BlindspotError) as info:
        find_ldct(tmp_path)
    _one_line(info.value, low)
    assert "RescaleSlope" in info.value.problem and "HU" in info.value.problem


def test_compressed_pixel_data_without_decoder(tmp_path, monkeypatch, capsys):
    from pydicom import dcmread, uid
    from pydicom.pixels import get_decoder

    base = _tree(tmp_path, slices_per_patient=(2,))
    target = sorted(next(base.rglob("*Full Dose Images*")).iterdir())[0]
    ds = dcmread(target)
    ds.compress(uid.RLELossless)
    ds.save_as(target, enforce_file_format=True)
    assert torch.equal(LDCTDataset(find_ldct(tmp_path))[1].full, LDCTDataset(find_ldct(tmp_path))[1].full)
    decoder = get_decoder(uid.RLELossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pydicom": ("numpy",)})
    with pytest.raises(BlindspotError) as info:
        LDCTDataset(find_ldct(tmp_path))
    _one_line(info.value, target)
    assert "RLE Lossless" in info.value.problem and "no decoder" in info.value.problem
    run = tmp_path.with_name(tmp_path.name + "_run")  # never inside the input data
    code = main(["train", "ct", "--model", "cnn10", "--data", str(tmp_path), "--out", str(run),
                 "--val-fraction", "0", "--test-fraction", "0", "--patch-size", "8", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(target) in err[0]


# ----------------------------------------------------------------------------------------------------------------
# Phantoms and the DICOM writer
# ----------------------------------------------------------------------------------------------------------------
def test_phantoms_are_seeded_and_look_like_ct():
    a = ct_phantom("chest", size=64, seed=3, z=0.5)
    assert torch.equal(a, ct_phantom("chest", size=64, seed=3, z=0.5))
    assert not torch.equal(a, ct_phantom("chest", size=64, seed=4, z=0.5))
    chest = PhantomPatient("chest", 0).render(0.55, size=96)
    abdomen = PhantomPatient("abdomen", 0).render(0.5, size=96)
    for img in (chest, abdomen):
        assert img.shape == (96, 96) and img.dtype == torch.float32 and torch.isfinite(img).all()
        assert float(img.min()) >= -1000.0 and float(img.max()) <= 1000.0
        assert (img == -1000.0).float().mean() > 0.2  # air around the body
        assert ((img > 300) & (img < 1000)).any()  # bone: spine and ribs
        assert ((img > -130) & (img < -70)).float().mean() > 0.02  # fat layers
        assert ((img > 20) & (img < 200)).float().mean() > 0.05  # soft tissue / enhancing organs
    lung = lambda im: ((im > -950) & (im < -700)).float().mean()  # noqa: E731
    assert lung(chest) > 0.1 and lung(chest) > 5 * lung(abdomen)  # (the abdomen: bowel gas edges, table foam)
    # slices of one patient change smoothly: neighbouring positions are more alike than distant ones
    p = PhantomPatient("abdomen", 5)
    s0, s1, s2 = (p.render(z, size=64, slice_seed=0) for z in (0.40, 0.42, 0.9))
    assert (s0 - s1).abs().mean() < (s0 - s2).abs().mean()
    assert set(KINDS) == {"chest", "abdomen"}
    with pytest.raises(BlindspotError):
        PhantomPatient("head", 0)


def test_dicom_writer_round_trip(tmp_path):
    hu = np.linspace(-1024, 2000, 20 * 24, dtype=np.float32).reshape(20, 24)
    path = write_ct_slice(tmp_path / "s.dcm", hu, patient_id="X1", study_uid="1.2.3", series_uid="1.2.3.4",
                          frame_uid="1.2.3.5", sop_uid="1.2.3.6", series_number=1,
                          series_description="Full Dose Images", instance_number=1, z_mm=-12.5, pixel_spacing_mm=0.7)
    image = read_dicom(path)
    assert image.rescaled and image.slope == 1.0 and image.intercept == -1024.0
    assert np.abs(image.pixels - hu).max() <= 0.5
    ds = image.dataset
    assert ds.Modality == "CT" and str(ds.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.2"
    assert float(ds.ImagePositionPatient[2]) == -12.5 and float(ds.PixelSpacing[0]) == pytest.approx(0.7)
    loaded = load_ct_images(path)
    assert loaded.hu.shape == (1, 1, 20, 24) and loaded.pixel_spacing_mm == pytest.approx(0.7)


def test_phantom_dataset_in_ldct_layout(tmp_path, capsys):
    out = tmp_path / "ct"
    args = ["data", "ct-phantoms", "--out", str(out), "--patients", "3", "--min-slices", "1", "--max-slices", "2",
            "--size", "32", "--angles", "40", "--no-progress"]
    assert main(args + ["--panel", str(tmp_path / "panel.png")]) == 0
    assert (tmp_path / "panel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tree = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.dcm"))
    assert tree[0].startswith("LDCT-and-Projection-data/C001/") and "/1.000000-Full Dose Images-" in tree[0]
    assert tree[0].endswith("/1-001.dcm")
    with pytest.raises(BlindspotError, match="--dose"):
        find_ldct(out)  # two low-dose series per study
    for dose in (0.25, 0.10):
        patients = find_ldct(out, dose=dose)
        assert [p.patient for p in patients] == ["C001", "C003", "L002"]
        assert all(p.dose == pytest.approx(dose) for p in patients)
    data = LDCTDataset(find_ldct(out, dose=0.10))
    s = data[0]
    assert s.low.shape == s.full.shape == (1, 32, 32)
    assert float((s.low - s.full).std()) > 1.0 and float(s.full.min()) >= -1024.0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")}
    assert main(args) == 0  # same settings: resumes, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")} == before
    capsys.readouterr()
    assert main(args[:-3] + ["--angles", "41", "--no-progress"]) == 2
    assert "other settings" in capsys.readouterr().err
    # the same spec gives the same files in another folder
    other = write_phantom_dataset(tmp_path / "again", PhantomDatasetSpec(patients=3, min_slices=1, max_slices=2,
                                                                        size=32, n_angles=40), progress=False)
    assert other["complete"]
    first = sorted(out.rglob("*.dcm"))[0]
    twin = tmp_path / "again" / first.relative_to(out)
    assert np.array_equal(read_dicom(first).pixels, read_dicom(twin).pixels)
