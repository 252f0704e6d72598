"""Real clinical CT: a circular reconstruction field with pixel padding far below air (DICOM ``PixelPaddingValue``).

A real-style series is written with pydicom the way scanners store it: signed 16-bit pixels, rescale intercept
−1024, the area outside a circular field stored as −2000 (−3024 HU) and declared as ``PixelPaddingValue``. The
padding must be outside the image for normalisation, attacks and metrics: the Gaussian + RI known answer must still
put its invariance inside the 30×30 square, and the metrics must not notice the padding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blindspot.data.dicom import pixel_padding_mask, read_dicom
from blindspot.data.ldct import AIR_HU, field_of_view, load_ct_images, read_ct_hu
from blindspot.errors import BlindspotError

SIZE = 64
RADIUS = 30.5  # px: the field's circle, centred on the image
PAD_STORED = -2000  # stored value of the padding: −3024 HU with intercept −1024


def _circle(size: int = SIZE, radius: float = RADIUS) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    return (yy - c) ** 2 + (xx - c) ** 2 <= radius**2


@pytest.fixture(scope="module")
def low_dose_slice() -> np.ndarray:
    """A 64×64 abdomen phantom slice at 25 % dose, HU (float32): the image inside the field."""
    from blindspot.data.ct_phantom import FOV_MM, PhantomPatient
    from blindspot.physics.ct import LowDoseCT

    hu = PhantomPatient("abdomen", 0).render(0.5, size=SIZE).reshape(1, 1, SIZE, SIZE).to(torch.float32)
    ct = LowDoseCT((SIZE, SIZE), pixel_size_mm=FOV_MM / SIZE)
    low = ct.simulate(hu, (0.25,), generator=torch.Generator().manual_seed(0))[0.25]
    return np.clip(np.rint(low[0, 0].numpy()), -1024, 3071).astype(np.float32)


def write_padded_slice(path: Path, hu: np.ndarray, field: np.ndarray | None, z: float = 0.0, *,
                       padding_tag: bool = True, pad_stored: int = PAD_STORED, series_uid: str = "1.2.3.4.5") -> Path:
    """One CT slice as a scanner writes it: int16 stored values, intercept −1024, ``pad_stored`` outside ``field``
    (declared as ``PixelPaddingValue`` when ``padding_tag``)."""
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset

    stored = np.rint(hu).astype(np.int32) + 1024
    if field is not None:
        stored = np.where(field, stored, pad_stored)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = uid.CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds.SOPClassUID = uid.CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "FOV"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.ImagePositionPatient = [-32.0, -32.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.set_pixel_data(stored.astype(np.int16), photometric_interpretation="MONOCHROME2", bits_stored=16)
    if padding_tag:
        ds.add_new(0x00280120, "SS", pad_stored)  # PixelPaddingValue
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_padding_value_is_read_and_replaced_by_air(tmp_path, low_dose_slice):
    field = _circle()
    f = write_padded_slice(tmp_path / "a.dcm", low_dose_slice, field)
    image = read_dicom(f)
    assert image.pixels[~field].min() == -3024.0  # the raw pixels: padding far below air
    assert np.array_equal(pixel_padding_mask(image.dataset, image.pixels), ~field)
    hu, got = read_ct_hu(f)
    assert np.array_equal(got, field)
    assert (hu[~field] == AIR_HU).all() and np.array_equal(hu[field], low_dose_slice[field])


def test_padding_without_the_tag_and_padding_ranges(tmp_path, low_dose_slice):
    """Without ``PixelPaddingValue``, values far below air touching the border are the padding; a cold spot inside
    the body stays image. ``PixelPaddingRangeLimit`` marks a whole range of stored values."""
    field = _circle()
    hu = low_dose_slice.copy()
    hu[30:32, 30:32] = -1900.0  # impossible values, but inside the field and not touching the border
    f = write_padded_slice(tmp_path / "b.dcm", hu, field, padding_tag=False)
    got = read_ct_hu(f)[1]
    assert np.array_equal(got, field)
    assert field_of_view(hu)[30:32, 30:32].all()

    from pydicom import dcmread

    ds = dcmread(f)
    ds.add_new(0x00280120, "SS", -2100)  # PixelPaddingValue … PixelPaddingRangeLimit: −3124 … −3004 HU
    ds.add_new(0x00280121, "SS", -1980)  # PixelPaddingRangeLimit
    pixels = read_dicom(f).pixels
    assert np.array_equal(pixel_padding_mask(ds, pixels), ~field)


def test_all_padding_is_an_error_naming_the_file(tmp_path, low_dose_slice):
    f = write_padded_slice(tmp_path / "empty.dcm", low_dose_slice, np.zeros((SIZE, SIZE), bool))
    with pytest.raises(BlindspotError, match="empty.dcm.*field of view"):
        read_ct_hu(f)


def test_gaussian_ri_invariance_on_a_real_style_padded_series(tmp_path, low_dose_slice):
    """The known answer on a real-style series (circular field, −3024 HU padding, ``PixelPaddingValue``) through the
    run layer: the structure of the change lies inside the 30×30 square (ratio of 5×5 local means ≥ 5), nothing
    outside the field moves, the network's output changes by at most a few HU outside the square, and the
    normalisation is the in-field pixels' (not skewed by the padding)."""
    from blindspot.attacks.invariance import InvarianceConfig, square_mask
    from blindspot.models.loading import load_model
    from blindspot.runs.images import DataOptions
    from blindspot.runs.invariances import run_invariances

    field = _circle()
    series = tmp_path / "series"
    write_padded_slice(series / "IM1.dcm", low_dose_slice, field, z=0.0)
    (series / "notes.txt").write_text("a note beside the images is ignored")
    cfg = InvarianceConfig(alpha=0.01, iterations=400, lr=0.01, restarts=1, progress=False)
    result = run_invariances(load_model("gaussian-ri"), tmp_path / "run", DataOptions(data=series), cfg, "mse",
                             figures=0)
    norm = result.summary["normalization"]
    inside = low_dose_slice[field].astype(np.float64)
    assert norm["mean"] == pytest.approx(inside.mean(), abs=0.5) and norm["std"] == pytest.approx(inside.std(), rel=1e-3)
    assert len(result.rows) == 1
    outside_square = ~square_mask(SIZE, SIZE, 30, inset=-3).numpy()
    for row in result.rows:
        assert row["square_ratio"] >= 5, row
        arrays = np.load(tmp_path / "run" / "arrays" / f"series_{row['key'].split(':')[1]}.npz")
        dx = arrays["x_inv"][0] - arrays["x"]
        assert np.abs(dx[~field]).max() == 0.0  # out-of-field pixels are not image: never changed
        assert (arrays["x"][~field] == AIR_HU).all()
        df = np.abs(arrays["f_x_inv"][0] - arrays["f_x"])
        assert df[outside_square & field].mean() <= 5.0, df[outside_square & field].mean()  # HU: "a few"
        assert row["mean_abs_change"] >= 50.0  # HU inside the field: a real change, not a no-op


def test_padding_does_not_change_table1_metrics(tmp_path, low_dose_slice):
    """CT Table-1 metrics (RMSE in HU, windowed PSNR / SSIM) of a slice and its denoised version are the same with
    and without −3024 HU padding outside the field, when both are read through the loader."""
    from blindspot.metrics import ct_slice_metrics as field_metrics
    from blindspot.physics.ct import parse_window

    field = _circle()
    full = low_dose_slice.copy()
    pred = np.clip(np.rint(full + 20 * np.sin(np.arange(SIZE))[None, :]), -1024, 3071).astype(np.float32)
    clean = tmp_path / "clean"
    padded = tmp_path / "padded"
    for folder, fld in ((clean, None), (padded, field)):
        write_padded_slice(folder / "full" / "1.dcm", full, fld)
        write_padded_slice(folder / "pred" / "1.dcm", pred, fld)
    window = parse_window("abdomen")

    def metrics(folder: Path, use_field: bool):
        a, b = load_ct_images(folder / "pred"), load_ct_images(folder / "full")
        f = (a.field & b.field) if use_field else None
        return field_metrics(a.hu, b.hu, window, field=f)

    ref = metrics(clean, False)  # the slice as it would be without padding, scored over the field only
    ref_field = field_metrics(load_ct_images(clean / "pred").hu, load_ct_images(clean / "full").hu, window,
                              field=torch.from_numpy(field).reshape(1, 1, SIZE, SIZE))
    got = metrics(padded, True)
    for k in ("rmse_hu", "psnr", "ssim"):
        assert torch.allclose(got[k], ref_field[k], atol=1e-5), (k, got[k], ref_field[k])
    # whole-image metrics of the unpadded slice differ only by the out-of-field air: same order, finite
    assert all(torch.isfinite(v).all() for v in ref.values())


def test_ldct_layout_carries_the_field_and_normalises_inside_it(tmp_path, low_dose_slice):
    """A padded LDCT pair: each sample carries the field, out-of-field pixels are air in both doses, the
    normalisation statistics are those of the in-field pixels, and batches stack the fields."""
    from blindspot.data.ldct import LDCTDataset, collate_ct, find_ldct

    field = _circle()
    study = tmp_path / "LDCT" / "L001" / "01-01-2020-NA-study-1"
    full = np.clip(low_dose_slice + 5.0, -1024, 3071)
    for k in range(2):
        write_padded_slice(study / "1.000000-Full Dose Images-1" / f"1-{k + 1:03d}.dcm", full, field, z=float(k),
                           series_uid="1.2.3.1")
        write_padded_slice(study / "2.000000-Low Dose Images-2" / f"1-{k + 1:03d}.dcm", low_dose_slice, field,
                           z=float(k), series_uid="1.2.3.2")
    data = LDCTDataset(find_ldct(tmp_path / "LDCT"))
    sample = data[0]
    assert sample.field is not None and torch.equal(sample.field[0], torch.from_numpy(field))
    assert (sample.low[0][~sample.field[0]] == AIR_HU).all() and (sample.full[0][~sample.field[0]] == AIR_HU).all()
    norm = data.normalization()
    inside = low_dose_slice[field].astype(np.float64)
    assert norm.mean == pytest.approx(inside.mean(), abs=1e-3) and norm.std == pytest.approx(inside.std(), rel=1e-4)
    batch = collate_ct([data[0], data[1]])
    assert batch.field.shape == (2, 1, SIZE, SIZE) and batch.field.dtype == torch.bool


def test_ct_audit_table1_is_measured_inside_the_field(tmp_path, low_dose_slice):
    """The CT audit's Table 1 on padded LDCT slices: the low-dose input's RMSE is the in-field RMSE of low against
    full (out-of-field air would otherwise count as perfectly denoised pixels)."""
    from blindspot.runs.audit import AuditConfig, run_audit

    field = _circle()
    study = tmp_path / "LDCT" / "L001" / "01-01-2020-NA-study-1"
    full = np.clip(low_dose_slice + 40.0 * np.cos(np.arange(SIZE) / 3.0)[None, :], -1024, 3071)
    write_padded_slice(study / "1.000000-Full Dose Images-1" / "1-001.dcm", full, field, series_uid="1.2.3.1")
    write_padded_slice(study / "2.000000-Low Dose Images-2" / "1-001.dcm", low_dose_slice, field,
                       series_uid="1.2.3.2")
    config = AuditConfig(searches=("rs",), criteria=("recovery",), candidates=1, transfer=False, invariance_images=0,
                         figures=False, beyond=False, device="cpu")
    result = run_audit([(None, "cnn10")], tmp_path / "audit", data=tmp_path / "LDCT", config=config)
    low_row = next(r for r in result.table1 if r["model"] == "Low-dose input")
    stored_full = np.rint(full)  # the series stores integers
    inside = (np.rint(low_dose_slice) - stored_full)[field]
    assert low_row["rmse_hu_mean"] == pytest.approx(float(np.sqrt(np.mean(inside ** 2))), rel=1e-3)
