"""Plain images as MRI ground truths, and DICOM reading (uncompressed, RLE, JPEG-LS, JPEG 2000, JPEG baseline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom import uid
from skimage.transform import resize as sk_resize

from blindspot.data.dicom import list_dicom_files, read_dicom, read_dicom_series, slice_positions
from blindspot.data.images import ImageDataset, fit_to_size
from blindspot.data.mri import detect_kind, open_mri_dataset
from blindspot.physics.mri import create_mask_func, fft2c, ifft2c

from helpers_data import jpeg_baseline_dicom, make_dicom, save_dicom, smooth_image


def _u16(shape, seed=0, top=4000):
    return np.round(smooth_image(shape, seed) * top).astype(np.uint16)


# ------------------------------------------------------------------------------------------------------------------
# size rule
# ------------------------------------------------------------------------------------------------------------------
def test_fit_to_size_crop_and_pad():
    image = np.arange(6 * 9, dtype=np.float32).reshape(6, 9)
    out = fit_to_size(image, (4, 12), "crop")
    assert out.shape == (4, 12)
    # rows 1..4 kept (offset (6-4)//2 = 1); 3 columns of zeros: 1 before, 2 after
    np.testing.assert_array_equal(out[:, 1:10], image[1:5])
    assert out[:, 0].sum() == 0 and out[:, 10:].sum() == 0
    # padding then cropping back is the identity (same offset rule both ways)
    np.testing.assert_array_equal(fit_to_size(fit_to_size(image, (11, 14)), (6, 9)), image)


def test_fit_to_size_resample_keeps_aspect():
    image = smooth_image((32, 64))
    out = fit_to_size(image, (16, 16), "resample")  # scale 1/4: content 8x16, padded to 16x16
    ref = sk_resize(image.astype(np.float64), (8, 16), order=1, mode="edge", preserve_range=True, anti_aliasing=True)
    np.testing.assert_allclose(out[4:12], ref, atol=1e-6)
    assert out[:4].sum() == 0 and out[12:].sum() == 0
    up = fit_to_size(image[:16, :16], (32, 32), "resample")  # enlarging fills the frame exactly
    assert up.shape == (32, 32) and up.min() > 0


# ------------------------------------------------------------------------------------------------------------------
# PNG and NumPy
# ------------------------------------------------------------------------------------------------------------------
def test_png_grayscale_is_the_target_and_kspace_is_simulated(tmp_path):
    pixels = np.round(smooth_image((40, 48)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "knee.png")
    mask_func = create_mask_func("equispaced", [4], [0.08])
    ds = ImageDataset(tmp_path / "knee.png", size=(32, 32), mask_func=mask_func)
    sample = ds[0]
    y = torch.from_numpy(pixels[4:36, 8:40].astype(np.float32))  # centre crop
    torch.testing.assert_close(sample.target[0], y)
    expected = ifft2c(fft2c(y) * sample.mask).abs()  # A(y) = |F^-1(M F(y))|
    torch.testing.assert_close(sample.input[0], expected, rtol=0, atol=1e-4)
    assert torch.equal(sample.mask, mask_func(32, seed="knee.png").mask)
    assert sample.fname == "knee.png" and sample.max_value == float(y.max())
    full = ImageDataset(tmp_path / "knee.png", size=(32, 32))[0]  # fully sampled: input = target
    torch.testing.assert_close(full.input, full.target, rtol=0, atol=1e-4)


def test_png_modes(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100 + np.arange(8, dtype=np.uint8)[None, :], 200, 50  # not constant
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], -1)).save(tmp_path / "rgba.png")
    u16 = _u16((8, 8))
    Image.fromarray(u16).save(tmp_path / "u16.png")
    ds = ImageDataset(tmp_path, size=None)
    by_name = {ds[i].fname: ds[i] for i in range(len(ds))}
    lum = (0.299 * (100 + torch.arange(8.0)) + 0.587 * 200 + 0.114 * 50).expand(1, 8, 8)
    torch.testing.assert_close(by_name["rgb.png"].target, lum)
    torch.testing.assert_close(by_name["rgba.png"].target, lum)
    torch.testing.assert_close(by_name["u16.png"].target[0], torch.from_numpy(u16.astype(np.float32)))


def test_npy_2d_3d_complex_and_padding(tmp_path):
    small = smooth_image((20, 24))
    np.save(tmp_path / "small.npy", small)
    volume = smooth_image((3, 32, 32), seed=2) * np.array([1.0, 2.0, 3.0], np.float32)[:, None, None]
    np.save(tmp_path / "volume.npy", volume)
    cplx = smooth_image((32, 32), seed=4) * np.exp(1j * 0.7)
    np.save(tmp_path / "complex.npy", cplx.astype(np.complex64))
    mask_func = create_mask_func("random", [4], [0.08])
    ds = ImageDataset(tmp_path, size=(32, 32), mask_func=mask_func)
    assert len(ds) == 1 + 1 + 3
    items = [ds[i] for i in range(len(ds))]
    assert [(s.fname, s.slice_num) for s in items] == [
        ("complex.npy", 0), ("small.npy", 0), ("volume.npy", 0), ("volume.npy", 1), ("volume.npy", 2)
    ]
    torch.testing.assert_close(items[0].target[0], torch.from_numpy(np.abs(cplx).astype(np.float32)))
    padded = items[1].target[0]
    torch.testing.assert_close(padded[6:26, 4:28], torch.from_numpy(small))  # zero-padded evenly
    assert padded[:6].sum() == 0 and padded[:, :4].sum() == 0
    vol_items = items[2:]
    assert all(torch.equal(s.mask, vol_items[0].mask) for s in vol_items)  # one volume, one mask
    assert not torch.equal(items[1].mask, vol_items[0].mask)
    assert all(s.max_value == pytest.approx(float(volume.max())) for s in vol_items)  # the volume's maximum
    torch.testing.assert_close(vol_items[2].target[0], torch.from_numpy(volume[2]))


# ------------------------------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------------------------------
def test_dicom_uncompressed_with_rescale(tmp_path):
    stored = _u16((24, 28))
    path = save_dicom(make_dicom(stored, RescaleSlope=0.5, RescaleIntercept=10), tmp_path / "mr.dcm")
    image = read_dicom(path)
    assert image.rescaled and not image.compressed and image.modality == "MR"
    np.testing.assert_allclose(image.pixels, stored * 0.5 + 10, rtol=0, atol=1e-4)
    plain = read_dicom(save_dicom(make_dicom(stored), tmp_path / "plain.dcm"))
    assert not plain.rescaled and plain.slope == 1.0 and plain.intercept == 0.0
    np.testing.assert_array_equal(plain.pixels, stored.astype(np.float32))
    sample = ImageDataset(path, size=(24, 28))[0]
    torch.testing.assert_close(sample.target[0], torch.from_numpy(image.pixels))


@pytest.mark.parametrize(
    "syntax", [uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless], ids=["rle", "jpeg-ls", "jpeg2000"]
)
def test_dicom_lossless_compression_decodes_exactly(tmp_path, syntax):
    stored = _u16((32, 40), seed=1)
    ds = make_dicom(stored)
    ds.compress(syntax)
    path = save_dicom(ds, tmp_path / "c.dcm")
    image = read_dicom(path)
    assert image.compressed and image.transfer_syntax == syntax
    np.testing.assert_array_equal(image.pixels, stored.astype(np.float32))
    sample = ImageDataset(path, size=(32, 40))[0]
    torch.testing.assert_close(sample.target[0], torch.from_numpy(stored.astype(np.float32)))


def test_dicom_jpeg_baseline_within_tolerance(tmp_path):
    pixels = np.round(smooth_image((32, 32), seed=5) * 255).astype(np.uint8)
    path = save_dicom(jpeg_baseline_dicom(pixels, quality=95), tmp_path / "jpeg.dcm")
    image = read_dicom(path)
    assert image.compressed and image.transfer_syntax == uid.JPEGBaseline8Bit
    error = np.abs(image.pixels - pixels.astype(np.float32))
    assert error.mean() < 2.0 and error.max() < 16
    assert ImageDataset(path, size=(32, 32))[0].target.shape == (1, 32, 32)


def test_color_dicom_becomes_luminance(tmp_path):
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 120, 240
    ds = make_dicom(np.zeros((8, 10), np.uint8))
    ds.set_pixel_data(rgb, photometric_interpretation="RGB", bits_stored=8)
    image = read_dicom(save_dicom(ds, tmp_path / "rgb.dcm"))
    assert image.from_color and image.pixels.shape == (8, 10)
    np.testing.assert_allclose(image.pixels, 0.299 * 10 + 0.587 * 120 + 0.114 * 240, rtol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    stored = _u16((16, 16), seed=2)
    ds = make_dicom(stored)
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = save_dicom(ds, tmp_path / "m1.dcm")
    target = ImageDataset(path, size=None)[0].target[0].numpy()
    np.testing.assert_allclose(target, stored.min() + stored.max() - stored.astype(np.float32))


def test_dicom_series_sorted_along_the_normal(tmp_path):
    z = [3.0, -1.5, 0.0, 1.5]
    for i, zi in enumerate(z):
        ds = make_dicom(np.full((8, 8), i, np.uint16), ImagePositionPatient=[0.0, 0.0, zi],
                        ImageOrientationPatient=[1, 0, 0, 0, 1, 0], InstanceNumber=10 - i)
        save_dicom(ds, tmp_path / f"im{i}")  # no extension: found by the DICM marker
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert [p.name for p in list_dicom_files(tmp_path)] == ["im0", "im1", "im2", "im3"]
    volume, datasets = read_dicom_series(tmp_path)
    assert volume.shape == (4, 8, 8) and volume.dtype == np.float32
    assert [v[0, 0] for v in volume] == [1, 2, 3, 0]  # z = -1.5, 0, 1.5, 3
    assert [float(d.ImagePositionPatient[2]) for d in datasets] == sorted(z)
    assert all("PixelData" not in d for d in datasets)  # headers only by default
    _, full = read_dicom_series(tmp_path, keep_pixel_data=True)
    assert all("PixelData" in d for d in full)
    for d in datasets:  # InstanceNumber fallback when positions are missing
        del d.ImagePositionPatient
    positions, rule = slice_positions(datasets)
    assert rule == "instance" and list(positions) == [9, 8, 7, 10]


def test_dispatch_and_mixed_image_kinds(tmp_path):
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", np.ones((16, 16), np.float32))
    save_dicom(make_dicom(_u16((16, 16))), tmp_path / "c.dcm")
    assert detect_kind(tmp_path) == "images"
    ds = open_mri_dataset(tmp_path, None, crop=(16, 16), resize="resample")
    assert isinstance(ds, ImageDataset) and len(ds) == 3
    assert ds.summary()["file_kinds"] == {"dicom": 1, "npy": 1, "png": 1}


def test_phantoms_by_default():
    """``None`` opens the built-in phantoms (written by another module; skipped until it exists)."""
    pytest.importorskip("blindspot.data.phantom_dataset")
    import inspect

    from blindspot.data.phantom_dataset import PhantomDataset
    from blindspot.data.sample import MRISample

    accepted = inspect.signature(PhantomDataset).parameters
    small = {k: v for k, v in {"volumes": 1, "slices": 1, "shape": (64, 64)}.items() if k in accepted}
    ds = open_mri_dataset(None, create_mask_func("random", [4], [0.08]), crop=(32, 32), **small)
    assert isinstance(ds, PhantomDataset) and len(ds) >= 1
    assert isinstance(ds[0], MRISample) and ds[0].input.shape == (1, 32, 32)
