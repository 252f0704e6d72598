"""fastMRI HDF5 loading: round trips against the physics, header crop and padding, seeded masks, sampling."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from blindspot.data.fastmri import (
    FastMRISliceDataset,
    ismrmrd_header_xml,
    parse_ismrmrd_header,
    read_volume_info,
)
from blindspot.data.mri import detect_kind, open_mri_dataset
from blindspot.errors import BlindspotError
from blindspot.data.sample import collate_mri
from blindspot.physics.mri import CartesianUndersampling, center_crop, create_mask_func, fft2c, ifft2c

from helpers_data import write_multicoil, write_singlecoil, zero_filled


@pytest.fixture
def mask_func():
    return create_mask_func("random", [4], [0.08])


def test_singlecoil_round_trip(tmp_path, mask_func):
    path = tmp_path / "file1000001.h5"
    kspace, target = write_singlecoil(path, slices=3, size=(32, 40), recon=(24, 20), seed=3)
    ds = FastMRISliceDataset(path, mask_func)
    assert len(ds) == 3 and ds.volumes[0].challenge == "singlecoil"
    for s in range(3):
        sample = ds[s]
        assert sample.fname == "file1000001.h5" and sample.slice_num == s
        assert sample.input.shape == (1, 24, 20) and sample.target.shape == (1, 24, 20)  # crop from the header
        assert sample.mask.shape == (1, 40)
        # the input is the under-sampling operator applied to the stored k-space with the returned mask
        op = CartesianUndersampling(sample.mask, crop=(24, 20))
        _, expected = op.from_kspace(torch.from_numpy(kspace[s])[None, None])
        torch.testing.assert_close(sample.input, expected[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(sample.input[0], zero_filled(kspace[s], sample.mask, (24, 20)), rtol=0, atol=1e-6)
        # the target is the stored reconstruction_esc
        torch.testing.assert_close(sample.target[0], torch.from_numpy(target[s]))
        # the mask is the mask function's, seeded with the file name
        assert torch.equal(sample.mask, mask_func(40, seed="file1000001.h5").mask)
        assert sample.acceleration == 4.0
        assert sample.max_value == pytest.approx(float(target.max()))
        assert sample.attrs["acquisition"] == "CORPD_FBK" and sample.attrs["patient_id"] == "patient3"
        assert sample.attrs["norm"] == pytest.approx(1.5)
        # normalisation statistics are those of the input
        assert float(sample.mean) == pytest.approx(float(sample.input.mean()), rel=1e-5)


def test_multicoil_round_trip(tmp_path, mask_func):
    path = tmp_path / "file_brain.h5"
    kspace, target = write_multicoil(path, slices=2, coils=4, size=(32, 32), recon=(24, 24), seed=1)
    ds = FastMRISliceDataset(path, mask_func)  # challenge detected from the 4-D k-space
    assert ds.volumes[0].challenge == "multicoil" and ds.volumes[0].num_coils == 4
    sample = ds[1]
    assert sample.input.shape == (1, 24, 24)
    torch.testing.assert_close(sample.input[0], zero_filled(kspace[1], sample.mask, (24, 24)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sample.target[0], torch.from_numpy(target[1]))
    assert FastMRISliceDataset(path, mask_func, challenge="multicoil")[0].attrs["challenge"] == "multicoil"


def test_multicoil_kspace_and_maps_on_request(tmp_path, mask_func):
    """``kspace=True`` keeps the masked multi-coil k-space; ``coil_maps="full"`` gives maps on the crop with
    ``S_c · RSS = x_c`` there."""
    path = tmp_path / "file_mc.h5"
    kspace, _ = write_multicoil(path, slices=1, coils=3, size=(32, 40), recon=(24, 24), seed=2)
    plain = FastMRISliceDataset(path, mask_func)[0]
    sample = open_mri_dataset(path, mask_func, kspace=True, coil_maps="full")[0]
    assert torch.equal(sample.input, plain.input) and plain.kspace is None and plain.sens_maps is None
    full = torch.from_numpy(kspace[0])
    torch.testing.assert_close(sample.kspace, full * sample.mask, rtol=0, atol=0)
    coils = center_crop(ifft2c(full), (24, 24))
    rss = coils.abs().pow(2).sum(0, keepdim=True).sqrt()
    torch.testing.assert_close(sample.sens_maps * rss, coils, rtol=0, atol=1e-5 * float(rss.max()))
    batch = collate_mri([sample, sample])
    assert batch.kspace.shape == (2, 3, 32, 40) and batch.mask.shape == (2, 1, 1, 40)


def test_targets_computed_when_absent(tmp_path):
    """Test-set files have no reconstruction: the target is the cropped magnitude / RSS of the full image."""
    single = tmp_path / "single.h5"
    multi = tmp_path / "multi.h5"
    k1, _ = write_singlecoil(single, slices=2, size=(32, 32), recon=(20, 24), with_target=False)
    k2, _ = write_multicoil(multi, slices=2, coils=3, size=(32, 32), recon=(24, 24), with_target=False)
    s1 = FastMRISliceDataset(single)[1]
    expected1 = center_crop(ifft2c(torch.from_numpy(k1[1])), (20, 24)).abs()
    torch.testing.assert_close(s1.target[0], expected1, rtol=0, atol=1e-6)
    torch.testing.assert_close(s1.input, s1.target, rtol=0, atol=1e-6)  # fully sampled: input = target
    assert s1.max_value == pytest.approx(float(s1.target.max()))  # no 'max' attribute: the slice's maximum
    s2 = FastMRISliceDataset(multi)[0]
    coil_images = center_crop(ifft2c(torch.from_numpy(k2[0])), (24, 24))
    torch.testing.assert_close(s2.target[0], coil_images.abs().pow(2).sum(0).sqrt(), rtol=1e-5, atol=1e-6)


def test_crop_rules(tmp_path):
    # no header: fastMRI's 320x320, capped to the k-space
    path = tmp_path / "noheader.h5"
    write_singlecoil(path, size=(40, 36), recon=None, header=None, with_target=False)
    info = read_volume_info(path)
    assert info.header.recon_size is None and info.crop == (40, 36)
    assert FastMRISliceDataset(path)[0].input.shape == (1, 40, 36)
    # an explicit crop wins over the header; one larger than the stored target is an error (what is recorded is
    # what is used), as is one smaller than any network accepts
    path2 = tmp_path / "header.h5"
    write_singlecoil(path2, size=(32, 32), recon=(24, 24))
    assert FastMRISliceDataset(path2, crop=(16, 12))[0].target.shape == (1, 16, 12)
    with pytest.raises(BlindspotError, match="--crop: 30 30 is larger than the 24x24 image of .*header.h5"):
        FastMRISliceDataset(path2, crop=(30, 30))
    with pytest.raises(BlindspotError, match="crop 4x4 is smaller"):
        FastMRISliceDataset(path2, crop=(4, 4))


def test_header_padding_removes_unacquired_columns(tmp_path, mask_func):
    """fastMRI: padding_left = y//2 - center, padding_right = padding_left + maximum + 1."""
    header = ismrmrd_header_xml((32, 40, 1), (24, 24, 1), kspace_center=17, kspace_maximum=33)
    info = parse_ismrmrd_header(header, "x.h5")
    assert info.encoding_size == (32, 40, 1) and info.recon_size == (24, 24, 1)
    assert info.padding(40) == (3, 37)
    path = tmp_path / "padded.h5"
    kspace, _ = write_singlecoil(path, size=(32, 40), recon=(24, 24), header=header)
    sample = FastMRISliceDataset(path, mask_func)[0]
    drawn = mask_func(40, seed="padded.h5").mask
    assert torch.equal(sample.mask[:, 3:37], drawn[:, 3:37])
    assert sample.mask[:, :3].sum() == 0 and sample.mask[:, 37:].sum() == 0
    torch.testing.assert_close(sample.input[0], zero_filled(kspace[0], sample.mask, (24, 24)), rtol=0, atol=1e-6)
    unpadded = FastMRISliceDataset(path, mask_func, mask_padding=False)[0]
    assert torch.equal(unpadded.mask, drawn)


def test_masks_seeded_per_volume(tmp_path, mask_func):
    for i in range(2):
        write_singlecoil(tmp_path / f"file{i}.h5", slices=2, size=(32, 64), recon=(24, 24), seed=i)
    ds = FastMRISliceDataset(tmp_path, mask_func)
    masks = {(s.fname, s.slice_num): s.mask for s in (ds[i] for i in range(len(ds)))}
    assert torch.equal(masks[("file0.h5", 0)], masks[("file0.h5", 1)])  # same volume, same mask
    assert not torch.equal(masks[("file0.h5", 0)], masks[("file1.h5", 0)])  # other volume, other mask
    again = FastMRISliceDataset(tmp_path, create_mask_func("random", [4], [0.08]))
    assert torch.equal(again[2].mask, masks[("file1.h5", 0)])  # same file name, same mask, whatever the run
    unseeded = FastMRISliceDataset(tmp_path, create_mask_func("random", [4], [0.08], seed=5), use_seed=False)
    assert not torch.equal(unseeded[0].mask, unseeded[1].mask)  # the function's own generator advances


def test_sample_rates_are_seeded(tmp_path):
    for i in range(4):
        write_singlecoil(tmp_path / f"vol{i}.h5", slices=5, size=(16, 16), recon=(16, 16), seed=i)
    full = FastMRISliceDataset(tmp_path)
    assert len(full) == 20 and full.num_volumes == 4
    half = FastMRISliceDataset(tmp_path, sample_rate=0.5, seed=1)
    assert len(half) == 10 and half.samples == FastMRISliceDataset(tmp_path, sample_rate=0.5, seed=1).samples
    assert half.samples != FastMRISliceDataset(tmp_path, sample_rate=0.5, seed=2).samples
    assert set(half.samples) <= set(full.samples)
    vol = FastMRISliceDataset(tmp_path, volume_sample_rate=0.5, seed=0)
    assert vol.num_volumes == 2 and len(vol) == 10  # whole volumes
    assert {v for v, _ in vol.samples} == {v for v, _ in FastMRISliceDataset(tmp_path, volume_sample_rate=0.5).samples}


def test_dataloader_and_dispatch(tmp_path, mask_func):
    for i in range(2):
        write_singlecoil(tmp_path / f"f{i}.h5", slices=2, size=(32, 32), recon=(24, 24), seed=i)
    assert detect_kind(tmp_path) == "fastmri"
    ds = open_mri_dataset(tmp_path, mask_func, challenge="singlecoil")
    assert isinstance(ds, FastMRISliceDataset)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_mri)))
    assert batch.input.shape == (4, 1, 24, 24) and batch.mask.shape == (4, 1, 1, 32)
    assert batch.keys == ["f0.h5:0", "f0.h5:1", "f1.h5:0", "f1.h5:1"]
    x, y = batch.normalized()
    assert x.abs().max() <= 6 and torch.isfinite(y).all()


def test_nested_folders_get_relative_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_singlecoil(tmp_path / "a" / "file.h5", slices=1, size=(16, 16), recon=(16, 16))
    write_singlecoil(tmp_path / "b" / "file.h5", slices=1, size=(16, 16), recon=(16, 16), seed=1)
    (tmp_path / ".hidden.txt").write_text("ignored")
    ds = FastMRISliceDataset(tmp_path)
    assert [ds[i].fname for i in range(len(ds))] == ["a/file.h5", "b/file.h5"]


def test_stored_complex128_and_attrs_roundtrip(tmp_path):
    """k-space stored as complex128 is accepted (read as complex64); fastMRI-like attrs are kept."""
    path = tmp_path / "c128.h5"
    image = np.ones((1, 16, 16), np.complex128)
    with h5py.File(path, "w") as hf:
        hf["kspace"] = fft2c(torch.from_numpy(image)).numpy()
        hf.attrs["acquisition"] = "CORPDFS_FBK"
        hf.attrs["max"] = np.float64(2.0)
    sample = FastMRISliceDataset(path)[0]
    assert sample.input.dtype == torch.float32
    torch.testing.assert_close(sample.target, torch.ones(1, 16, 16), rtol=0, atol=1e-6)
    assert sample.max_value == 2.0 and sample.attrs["acquisition"] == "CORPDFS_FBK"


def test_volumes_of_different_kspace_widths_batch_together(tmp_path, mask_func):
    """fastMRI knee k-space is 368 or 372 columns wide: such volumes share a batch once cropped, their masks mapped
    onto the image's columns (what I-RIM and the attack do with a mask anyway); equal widths keep theirs."""
    from blindspot.physics.mri import resample_mask

    write_singlecoil(tmp_path / "a.h5", slices=2, size=(32, 32), recon=(24, 24), seed=0)
    write_singlecoil(tmp_path / "b.h5", slices=2, size=(32, 36), recon=(24, 24), seed=1)
    ds = open_mri_dataset(tmp_path, mask_func, challenge="singlecoil")
    samples = [ds[i] for i in range(len(ds))]
    assert {s.mask.shape[-1] for s in samples} == {32, 36}
    batch = collate_mri(samples)
    assert batch.mask.shape == (4, 1, 1, 24)
    for i, s in enumerate(samples):
        assert torch.equal(batch.mask[i].reshape(-1), resample_mask(s.mask.reshape(-1), 24))
    same = collate_mri(samples[:2])
    assert same.mask.shape == (2, 1, 1, samples[0].mask.shape[-1])
    from blindspot.errors import BlindspotError

    other = ds[0]
    other.target = other.target[..., :20]
    with pytest.raises(BlindspotError, match="different sizes"):
        collate_mri([samples[1], other])
