"""Real clinical CT: a circular reconstruction field with pixel padding far below air (DICOM ``PixelPaddingValue``).

A real-style series is written with pydicom the way scanners store it: signed 16-bit pixels, rescale intercept
−1024, the area outside a circular field stored as −2000 (−3024 HU) and declared as ``PixelPaddingValue``. The
padding must be outside the image for normalisation, attacks and metrics: the Gaussian + RI known answer must still
put its invariance inside the 30×30 square, and the metrics must not notice the padding. FNAF features (and their
neighbourhood T) stay inside the field with intensities from its range, natural invariances never see the padding,
and ``--skip-bad`` lists a corrupt member of such a series that is otherwise a one-line error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from blindspot.data.dicom import pixel_padding_mask, read_dicom
from blindspot.data.ldct import AIR_HU, field_of_view, load_ct_images, read_ct_hu
from blindspot.errors import BlindspotError
from helpers_data import dicom_header

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
    stored = np.rint(hu).astype(np.int32) + 1024
    if field is not None:
        stored = np.where(field, stored, pad_stored)
    ds = dicom_header("CT", "FOV", "1.2.3.4", series_uid)
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


def write_padded_study(root: Path, full: np.ndarray, low: np.ndarray, field: np.ndarray | None,
                       slices: int = 1) -> Path:
    """A padded LDCT study (``root/LDCT/L001/<study>/``): ``slices`` full- and low-dose slices written as a scanner
    stores them (:func:`write_padded_slice`); returns the ``LDCT`` folder."""
    study = root / "LDCT" / "L001" / "01-01-2020-NA-study-1"
    for k in range(slices):
        write_padded_slice(study / "1.000000-Full Dose Images-1" / f"1-{k + 1:03d}.dcm", full, field, z=float(k),
                           series_uid="1.2.3.1")
        write_padded_slice(study / "2.000000-Low Dose Images-2" / f"1-{k + 1:03d}.dcm", low, field, z=float(k),
                           series_uid="1.2.3.2")
    return root / "LDCT"


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
    full = np.clip(low_dose_slice + 5.0, -1024, 3071)
    data = LDCTDataset(find_ldct(write_padded_study(tmp_path, full, low_dose_slice, field, slices=2)))
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
    full = np.clip(low_dose_slice + 40.0 * np.cos(np.arange(SIZE) / 3.0)[None, :], -1024, 3071)
    write_padded_study(tmp_path, full, low_dose_slice, field)
    config = AuditConfig(searches=("rs",), criteria=("recovery",), candidates=1, transfer=False, invariance_images=0,
                         figures=False, beyond=False, device="cpu")
    result = run_audit([(None, "cnn10")], tmp_path / "audit", data=tmp_path / "LDCT", config=config)
    low_row = next(r for r in result.table1 if r["model"] == "Low-dose input")
    stored_full = np.rint(full)  # the series stores integers
    inside = (np.rint(low_dose_slice) - stored_full)[field]
    assert low_row["rmse_hu_mean"] == pytest.approx(float(np.sqrt(np.mean(inside ** 2))), rel=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Attacks on padded slices: FNAF and natural invariances stay inside the field of view
# ----------------------------------------------------------------------------------------------------------------
def _padded_batch(tmp_path, low_dose_slice):
    """A padded LDCT pair (full = low + a smooth offset) read through the loader: ``(CTBatch, field, full HU)``."""
    from blindspot.data.ldct import LDCTDataset, collate_ct, find_ldct

    field = _circle()
    full = np.clip(np.rint(low_dose_slice + 30.0 * np.cos(np.arange(SIZE) / 5.0)[None, :]), -1024, 3071)
    data = LDCTDataset(find_ldct(write_padded_study(tmp_path, full, low_dose_slice, field)))
    return collate_ct([data[0]]), field, full.astype(np.float32)


def _ct_scan():
    from blindspot.data.ct_phantom import FOV_MM
    from blindspot.physics.acquisition import LowDoseCTScan
    from blindspot.physics.ct import HUNormalization, LowDoseCT

    return LowDoseCTScan(LowDoseCT((SIZE, SIZE), pixel_size_mm=FOV_MM / SIZE), 0.25, HUNormalization(0.0, 500.0))


def _tiny_denoiser() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 1, 3, padding=1))


class _Scaled(torch.nn.Module):
    """``f(x) = w ⊙ x``: a "denoiser" that keeps the fraction ``w`` (a fixed ``(H, W)`` map) of each pixel."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


@pytest.mark.parametrize("family", ["walk", "disc"])
def test_fnaf_features_lie_inside_the_field_and_use_its_range(tmp_path, low_dose_slice, family, monkeypatch):
    """On a padded slice every FNAF feature, with its neighbourhood T, lies inside the field; the intensities are
    drawn from the in-field dynamic range (not one the −3024 HU padding sets); the chosen attack is inside too."""
    from blindspot.attacks.features import FeatureSampler, Region, neighbourhood
    from blindspot.attacks.fnaf import FnafObjective, Truths
    from blindspot.attacks.search import FiniteDifferenceSearch, RandomSearch

    batch, field, full = _padded_batch(tmp_path, low_dose_slice)
    assert batch.field is not None
    fld = torch.from_numpy(field)
    search = RandomSearch(sampler=FeatureSampler(family, intensity_range=(0.25, 0.5)), region=Region("center", 1.0),
                          objective=FnafObjective(dilation=3), n_candidates=16)
    net, acq = _tiny_denoiser(), _ct_scan()
    ctx = search.prepare(net, batch, acq)
    in_range = float(full[field].max() - full[field].min())
    assert float(ctx.dynamic_range[0]) == pytest.approx(in_range, abs=1e-3)
    assert ctx.region[0].any() and not (ctx.region[0] & ~fld).any()
    feats = search.sample(ctx, range(400))
    values, support = feats.render((SIZE, SIZE))
    T = neighbourhood(support, 3) > 0
    assert not (T & ~fld).any()  # neither a feature nor its T touches a pixel outside the field
    assert float(feats.intensity.min()) >= 0.25 * in_range - 1e-3
    assert float(feats.intensity.max()) <= 0.5 * in_range + 1e-3
    result = search(net, batch, acq)
    assert not (result.support[0] & ~fld).any() and bool(result.evaluation.accepted[0])
    # FD on a network that loses features the more, the nearer the top-left corner (outside the circle): every
    # candidate it evaluates stays inside the field (a step that would leave the allowed centres is not taken)
    ramp = (torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None, :]).to(torch.float32) / (2 * SIZE)
    seen: list[Tensor] = []
    evaluate = FnafObjective.evaluate

    def spy(self, model, ctx, image_idx, feature, support, return_images=False):
        seen.append(support.detach().clone())
        return evaluate(self, model, ctx, image_idx, feature, support, return_images)

    monkeypatch.setattr(FnafObjective, "evaluate", spy)
    fd = FiniteDifferenceSearch(sampler=search.sampler, region=search.region, iterations=4, restarts=4,
                                location_step=6.0, objective=FnafObjective(criterion="recovery", dilation=3),
                                coordinates=("location",))
    fd(_Scaled(ramp), batch, acq)
    assert len(seen) > 1 and not any((sup & ~fld).any() for sup in seen)
    # the same slice as a bare tensor with its padding and no field: the padding would set the range
    padded = torch.where(fld, torch.from_numpy(full), torch.tensor(-3024.0)).reshape(1, 1, SIZE, SIZE)
    bare = search.prepare(net, Truths(padded, ["bare"], [0]), acq)
    assert float(bare.dynamic_range[0]) == pytest.approx(float(full[field].max()) + 3024.0, abs=1e-3)
    # and given with its field, the padding is air and the range the in-field one
    fielded = search.prepare(net, Truths(padded, ["bare"], [0], field=fld.reshape(1, 1, SIZE, SIZE)), acq)
    assert float(fielded.dynamic_range[0]) == pytest.approx(in_range, abs=1e-3)
    assert (fielded.target[0, 0][~fld] == AIR_HU).all()


def test_fnaf_feature_outside_the_field_is_impossible(tmp_path, low_dose_slice):
    """No centre outside the field is allowed (a region that lies outside it falls back to the field), a feature
    planted outside is never an accepted attack, and T and the noise level of d' count only in-field pixels."""
    from blindspot.attacks.features import FeatureSampler, Features, Region
    from blindspot.attacks.fnaf import FnafObjective

    batch, field, full = _padded_batch(tmp_path, low_dose_slice)
    fld = torch.from_numpy(field)
    corner = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    corner[:6, :6] = True  # outside the circle
    objective = FnafObjective(criterion="recovery", dilation=2)
    net, acq = _tiny_denoiser(), _ct_scan()
    ctx = objective.prepare(net, batch, acq, Region("mask", mask=corner), reach=FeatureSampler("disc").reach)
    assert not (ctx.region[0] & corner).any() and ctx.region[0].any() and not (ctx.region[0] & ~fld).any()
    one = lambda r, c: Features("disc", torch.tensor([[float(r), float(c)]]), torch.tensor([[2.0, 2.0]]),  # noqa: E731
                                torch.zeros(1), torch.tensor([80.0]), torch.zeros(1, dtype=torch.int64))
    idx = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        v_out, s_out = one(3, 3).render((SIZE, SIZE))
        outside = objective.evaluate(net, ctx, idx, v_out, s_out, return_images=True)
        v_in, s_in = one(32, 32).render((SIZE, SIZE))
        inside = objective.evaluate(net, ctx, idx, v_in, s_in)
    assert not bool(outside.accepted[0]) and bool(inside.accepted[0])
    assert not (outside.images["T"][0, 0].bool() & ~fld).any()
    noise = (low_dose_slice - full)[field].astype(np.float64)  # the observed pair's noise, inside the field
    sigma = float(acq.noise_sigma(ctx.measurement)[0])
    assert sigma == pytest.approx(float(noise.std(ddof=1)), rel=1e-4)


def test_natural_invariances_ignore_out_of_field_pixels():
    """Known answer: changing only out-of-field pixels changes none of the losses. Training patches lie wholly
    inside the field (the losses of a step are bit-identical whatever the padding holds), the generator's change is
    cut to the field on whole images, and every evaluation figure is an in-field mean."""
    from blindspot.attacks.natural import (ImageTarget, NaturalConfig, NaturalInvarianceTrainer, PatchSampler,
                                           evaluate_samples)

    fld = torch.from_numpy(_circle()).reshape(1, 1, SIZE, SIZE).expand(2, 1, SIZE, SIZE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, SIZE, SIZE, generator=g)
    x_other = torch.where(fld, x, torch.full_like(x, 99.0))  # the same images, other padding
    sampler = PatchSampler(x_other, 24, field=fld)
    patches = sampler(64, torch.Generator().manual_seed(1))
    assert not (patches == 99.0).any()
    assert torch.equal(patches, PatchSampler(x, 24, field=fld)(64, torch.Generator().manual_seed(1)))

    cfg = NaturalConfig(patch=16, batch_size=4, n_critic=1, scales=2, channels=4, z_channels=1, critic_channels=4,
                        critic_depth=2)
    net = _tiny_denoiser().eval()
    rows = [NaturalInvarianceTrainer(ImageTarget(net, imgs, fld), config=cfg).train_step() for imgs in (x, x_other)]
    assert rows[0] == rows[1]

    trainer = NaturalInvarianceTrainer(ImageTarget(net, x, fld), config=cfg)
    target = trainer.target
    samples = (x + torch.where(fld, 0.5, 0.0)).unsqueeze(1)  # + 0.5 inside the field: a known change
    garbage = torch.where(fld, samples[:, 0], torch.full_like(x, -7.0)).unsqueeze(1)  # other values outside
    m = evaluate_samples(target, x, samples, trainer.critic, patch=16, scale=2.0)
    m2 = evaluate_samples(target, x, garbage, trainer.critic, patch=16, scale=2.0)
    for k in m:
        assert torch.equal(m[k], m2[k]), k
    assert torch.allclose(m["mean_abs_change"], torch.full((2,), 1.0), atol=1e-6)  # 0.5 × scale 2 over the field
    assert torch.allclose(target.realise(garbage[:, 0], torch.arange(2)), samples[:, 0])


def test_skip_bad_lists_a_corrupt_member_and_without_it_names_the_file(tmp_path, low_dose_slice, capsys):
    """``fnaf --skip-bad`` on a padded series with one corrupt low-dose member: the member and its partner are
    listed on stderr (one line each) and in ``run.json``; without the flag the same series is a one-line error
    naming the file (exit 2)."""
    import json

    from blindspot.cli import main

    field = _circle()
    data = write_padded_study(tmp_path, low_dose_slice, low_dose_slice, field, slices=2)
    bad = next((data / "L001").rglob("2.000000-Low Dose Images-2/1-002.dcm"))
    bad.write_bytes(b"DICM but not really: a corrupt member")
    common = ["fnaf", "--model", "cnn10", "--data", str(data), "--candidates", "1", "--no-figures",
              "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1-002.dcm" in err[0] and "Traceback" not in err[0], err
    assert main([*common, "--skip-bad", "--out", str(tmp_path / "run")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("blindspot: skipped")]
    assert len(err) == 2 and any(str(bad) in line for line in err), err
    skipped = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["skipped"]
    assert {row["file"] for row in skipped} == {str(bad), str(bad).replace("2.000000-Low Dose Images-2",
                                                                            "1.000000-Full Dose Images-1")}
    assert all(row["reason"] for row in skipped)
    assert main(["fnaf", "--model", "cnn10", "--skip-bad", "--out", str(tmp_path / "phantoms")]) == 2  # no series
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--skip-bad" in err[0], err
