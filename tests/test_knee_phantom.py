"""Synthetic knee phantoms: determinism, sizes, anatomy placement, contrast, fastMRI files, dataset, CLI."""

from __future__ import annotations

import dataclasses
import os
import re

import h5py
import numpy as np
import pytest
import torch

from blindspot.cli import main
from blindspot.data.fastmri import FastMRISliceDataset, parse_ismrmrd_header
from blindspot.data.knee_files import fastmri_header_xml, write_fastmri_volume, write_phantom_volumes
from blindspot.data.knee_phantom import (
    ACQUISITIONS,
    KneeRenderer,
    draw_knee_params,
    generate_knee_volume,
    phantom_fname,
    reconstruction_from_kspace,
)
from blindspot.data.phantom_dataset import PhantomDataset
from blindspot.data.sample import KspaceTransform
from blindspot.errors import BlindspotError
from blindspot.physics.mri import center_crop, create_mask_func, fft2c, ifft2c

SMALL = (64, 48)  # k-space size used by most tests
RECON = (40, 40)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_same_seed_same_volume_other_seed_differs():
    a = generate_knee_volume(3, 3, SMALL, RECON)
    b = generate_knee_volume(3, 3, SMALL, RECON)
    c = generate_knee_volume(4, 3, SMALL, RECON)
    assert torch.equal(a.image, b.image)
    assert a.patient_id == b.patient_id and a.acquisition == b.acquisition
    assert a.patient_id != c.patient_id
    assert (a.image - c.image).abs().mean() > 0.1 * a.image.abs().mean()


def test_chunking_does_not_change_the_volume():
    whole = generate_knee_volume(5, 4, SMALL, RECON, chunk_pixels=1 << 22)
    per_slice = generate_knee_volume(5, 4, SMALL, RECON, chunk_pixels=1)
    torch.testing.assert_close(whole.image, per_slice.image, rtol=0, atol=1e-5)


def test_renderer_parts_compose_the_volume():
    vol = generate_knee_volume(2, 3, SMALL, RECON, num_coils=2, return_sensitivities=True)
    renderer = KneeRenderer.for_volume(vol)
    assert list(renderer.chunks(1)) == [(0, 1), (1, 2), (2, 3)] and list(renderer.chunks(1 << 20)) == [(0, 3)]
    anatomy = renderer.anatomy(0, 3, renderer.textures(renderer.slice_generators(0, 3)))
    field = renderer.receive_field(0, 3, 2)
    assert anatomy.shape == (3, *SMALL) and anatomy.dtype == torch.float32
    assert torch.equal(field, vol.sensitivities)
    # image = anatomy × field + noise, the noise of the documented level.
    noise = vol.image - anatomy.unsqueeze(1) * field
    assert abs(float(noise.abs().square().mean().sqrt()) - vol.noise_std) < 0.1 * vol.noise_std
    one_by_one = [renderer.anatomy(i, i + 1, renderer.textures(renderer.slice_generators(i, i + 1)))
                  for i in range(3)]
    assert torch.equal(torch.cat(one_by_one), anatomy)
    assert renderer.knee_y.shape == (1, *SMALL) and renderer.receive_field(0, 3, None).shape == (3, *SMALL)


@pytest.mark.parametrize(
    "shape, recon, expect_recon",
    [
        ((64, 64), None, (64, 64)),
        ((64, 48), (40, 40), (40, 40)),
        ((48, 96), (32, 64), (32, 64)),
        ((80, 37), None, (80, 37)),
    ],
)
def test_shapes_and_dtypes(shape, recon, expect_recon):
    vol = generate_knee_volume(1, 3, shape, recon)
    assert vol.image.shape == (3, *shape) and vol.image.dtype == torch.complex64
    assert vol.recon_size == expect_recon and vol.challenge == "singlecoil" and vol.num_coils == 1
    assert torch.isfinite(torch.view_as_real(vol.image)).all()
    assert vol.slice_positions_mm.shape == (3,)
    # 140 mm field of view over the reconstruction crop.
    assert vol.pixel_spacing_mm == pytest.approx((140.0 / expect_recon[0], 140.0 / expect_recon[1]))
    rec = reconstruction_from_kspace(vol.kspace(), vol.recon_size)
    assert rec.shape == (3, *expect_recon) and rec.dtype == torch.float32


def test_multicoil_volume():
    vol = generate_knee_volume(2, 2, SMALL, RECON, num_coils=4, return_sensitivities=True)
    assert generate_knee_volume(2, 2, SMALL, RECON, num_coils=4).sensitivities is None
    assert vol.image.shape == (2, 4, *SMALL) and vol.image.dtype == torch.complex64
    assert vol.sensitivities is not None and vol.sensitivities.shape == (2, 4, *SMALL)
    assert vol.challenge == "multicoil" and vol.num_coils == 4
    # Coil images are the same object seen through different smooth sensitivities: they differ but correlate.
    mags = vol.image[1].abs()
    assert not torch.allclose(mags[0], mags[1])
    assert _corr(mags[0], mags[1]) > 0.3


def test_full_size_matches_fastmri_geometry():
    """640×368 k-space with a 320×320 crop; the knee fills the crop; rows outside it are oversampling."""
    vol = generate_knee_volume(0, 1, (640, 368), (320, 320), num_coils=None)
    assert vol.image.shape == (1, 640, 368)
    rec = reconstruction_from_kspace(vol.kspace(), vol.recon_size)[0]
    assert rec.shape == (320, 320)
    assert vol.pixel_spacing_mm == pytest.approx((0.4375, 0.4375))
    noise = vol.noise_std
    inside = (rec > 6 * noise).float().mean()
    assert inside > 0.6  # anatomy covers most of the crop
    full = vol.image[0].abs()
    edge_columns = torch.cat([full[:, :8], full[:, -8:]], dim=1)
    assert (edge_columns > 6 * noise).float().mean() < 0.05  # air beside the leg, in the phase-encode padding


def test_anatomy_is_centred_and_structured():
    """The middle slice holds bright tissue around the centre and air at the sides; slices vary smoothly."""
    vol = generate_knee_volume(7, 9, (96, 96), (96, 96))
    rec = reconstruction_from_kspace(vol.kspace(), vol.recon_size)
    mid = rec[4]
    centre = mid[32:64, 32:64]
    assert centre.mean() > 4 * mid[:, :4].mean()  # knee in the centre, air at the far sides
    # Structure, not a blob: strong edges (cortex, cartilage, menisci) inside the knee.
    grad = (centre[1:, :] - centre[:-1, :]).abs().mean()
    assert grad > 0.05 * centre.mean()
    # Sections of one knee: neighbours are more alike than the same section of another knee.
    other = reconstruction_from_kspace(generate_knee_volume(8, 9, (96, 96), (96, 96)).kspace(), (96, 96))
    assert _corr(rec[4], rec[5]) > _corr(rec[4], other[4]) + 0.1


def test_contrast_pd_and_fat_suppressed():
    """Fat suppression darkens fat and marrow; the anatomy (geometry) of a seed does not depend on the contrast."""
    pd = generate_knee_volume(9, 3, SMALL, RECON, acquisition="CORPD_FBK")
    fs = generate_knee_volume(9, 3, SMALL, RECON, acquisition="CORPDFS_FBK")
    assert pd.acquisition == "CORPD_FBK" and fs.acquisition == "CORPDFS_FBK"
    p_pd, p_fs = draw_knee_params(9, "CORPD_FBK"), draw_knee_params(9, "CORPDFS_FBK")
    assert dataclasses.replace(p_pd, contrast=None) == dataclasses.replace(p_fs, contrast=None)
    assert p_pd.contrast.fat > 3 * p_fs.contrast.fat and p_fs.contrast.fluid > p_pd.contrast.fluid
    rec_pd = reconstruction_from_kspace(pd.kspace(), pd.recon_size)
    rec_fs = reconstruction_from_kspace(fs.kspace(), fs.recon_size)
    # Relative to each image's brightest tissue, the fat-suppressed image is darker on average.
    assert (rec_fs.mean() / rec_fs.quantile(0.99)) < 0.8 * (rec_pd.mean() / rec_pd.quantile(0.99))
    with pytest.raises(BlindspotError, match="unknown acquisition"):
        draw_knee_params(1, "T1")


def test_variety_across_seeds():
    params = [draw_knee_params(s) for s in range(24)]
    assert {p.contrast.acquisition for p in params} == set(ACQUISITIONS)
    # Each pose / size parameter spreads over most of the interval it is drawn from.
    drawn_from = {"scale": (0.86, 1.08), "x0": (-7.0, 7.0), "y0": (-10.0, 12.0), "theta": (-0.1047, 0.1047),
                  "leg_rx": (54.0, 66.0), "fat_t": (4.0, 14.0)}
    for field, (lo, hi) in drawn_from.items():
        values = [getattr(p, field) for p in params]
        assert lo <= min(values) and max(values) <= hi, field
        assert max(values) - min(values) > 0.6 * (hi - lo), field
    assert {p.side for p in params} == {-1.0, 1.0}


def test_kspace_round_trip_and_parseval():
    vol = generate_knee_volume(4, 2, SMALL, RECON)
    k = vol.kspace()
    assert k.dtype == torch.complex64
    torch.testing.assert_close(ifft2c(k), vol.image, rtol=0, atol=1e-5)
    torch.testing.assert_close(k.abs().pow(2).sum(), vol.image.abs().pow(2).sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(k, fft2c(vol.image))


def test_header_xml_is_fastmri_shaped():
    xml = fastmri_header_xml((640, 368), (320, 320), 35, num_coils=8, acquisition="CORPDFS_FBK")
    info = parse_ismrmrd_header(xml, "header")
    assert info.encoding_size == (640, 368, 1) and info.recon_size == (320, 320, 1)
    assert info.kspace_center == 184 and info.kspace_maximum == 367
    assert info.padding(368) == (0, 368)  # every column is data
    text = xml.decode()
    assert "<fieldOfView_mm><x>280</x><y>161</y><z>3</z></fieldOfView_mm>" in text
    assert "<fieldOfView_mm><x>140</x><y>140</y><z>3</z></fieldOfView_mm>" in text
    assert "<receiverChannels>8</receiverChannels>" in text


def test_written_singlecoil_file_has_fastmri_layout(tmp_path):
    paths = write_phantom_volumes(tmp_path, 2, 3, seed=7, shape=SMALL, recon_size=RECON, progress=False)
    assert [p.name for p in paths] == ["file_phantom_000007.h5", "file_phantom_000008.h5"]
    assert phantom_fname(7) == paths[0].name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    with h5py.File(paths[0], "r") as hf:
        assert set(hf.keys()) == {"kspace", "reconstruction_esc", "ismrmrd_header"}
        k, rec = hf["kspace"][()], hf["reconstruction_esc"][()]
        assert k.shape == (3, *SMALL) and k.dtype == np.complex64
        assert rec.shape == (3, *RECON) and rec.dtype == np.float32
        attrs = dict(hf.attrs)
        info = parse_ismrmrd_header(hf["ismrmrd_header"][()], paths[0])
    assert attrs["acquisition"] in ACQUISITIONS
    assert re.fullmatch(r"[0-9a-f]{64}", attrs["patient_id"])
    assert attrs["max"] == pytest.approx(float(rec.max()), rel=1e-6)
    assert attrs["norm"] == pytest.approx(float(np.linalg.norm(rec.astype(np.float64))), rel=1e-6)
    assert info.encoding_size == (*SMALL, 1) and info.recon_size == (*RECON, 1) and info.padding(SMALL[1]) == (0, 48)
    expected = center_crop(ifft2c(torch.from_numpy(k)), RECON).abs()
    torch.testing.assert_close(torch.from_numpy(rec), expected, rtol=0, atol=1e-6)
    # The file holds exactly the generated volume.
    vol = generate_knee_volume(7, 3, SMALL, RECON)
    torch.testing.assert_close(torch.from_numpy(k), vol.kspace(), rtol=0, atol=0)


def test_written_multicoil_file(tmp_path):
    (path,) = write_phantom_volumes(tmp_path, 1, 2, seed=3, shape=SMALL, recon_size=RECON, challenge="multicoil",
                                    num_coils=3, progress=False)
    with h5py.File(path, "r") as hf:
        assert set(hf.keys()) == {"kspace", "reconstruction_rss", "ismrmrd_header"}
        k, rec = hf["kspace"][()], hf["reconstruction_rss"][()]
        assert "<receiverChannels>3</receiverChannels>" in hf["ismrmrd_header"][()].decode()
    assert k.shape == (2, 3, *SMALL) and k.dtype == np.complex64 and rec.dtype == np.float32
    coil_images = center_crop(ifft2c(torch.from_numpy(k)), RECON)
    torch.testing.assert_close(torch.from_numpy(rec), coil_images.abs().pow(2).sum(1).sqrt(), rtol=1e-5, atol=1e-6)


def test_write_resumes_and_overwrites(tmp_path):
    first = write_phantom_volumes(tmp_path, 2, 2, seed=0, shape=SMALL, recon_size=RECON, progress=False)
    stamps = [os.stat(p).st_mtime_ns for p in first]
    inodes = [os.stat(p).st_ino for p in first]
    again = write_phantom_volumes(tmp_path, 3, 2, seed=0, shape=SMALL, recon_size=RECON, progress=False)
    assert again[:2] == first and len(again) == 3
    assert [os.stat(p).st_mtime_ns for p in first] == stamps  # kept, not rewritten
    # A different size is a different phantom: refused without overwrite (nothing touched), rewritten with it.
    with pytest.raises(BlindspotError, match="pass --overwrite"):
        write_phantom_volumes(tmp_path, 1, 2, seed=0, shape=(48, 48), recon_size=RECON, progress=False)
    assert [os.stat(p).st_mtime_ns for p in first] == stamps
    write_phantom_volumes(tmp_path, 1, 2, seed=0, shape=(48, 48), recon_size=RECON, overwrite=True, progress=False)
    with h5py.File(first[0], "r") as hf:
        assert hf["kspace"].shape == (2, 48, 48)
    write_phantom_volumes(tmp_path, 2, 2, seed=0, shape=SMALL, recon_size=RECON, overwrite=True, progress=False)
    assert os.stat(first[1]).st_ino != inodes[1]  # replaced by rename
    # A corrupt file is neither trusted nor silently replaced: an error naming it; --overwrite regenerates it.
    first[1].write_bytes(b"not hdf5")
    with pytest.raises(BlindspotError) as info:
        write_phantom_volumes(tmp_path, 2, 2, seed=0, shape=SMALL, recon_size=RECON, progress=False)
    assert info.value.source == str(first[1]) and first[1].read_bytes() == b"not hdf5"
    write_phantom_volumes(tmp_path, 2, 2, seed=0, shape=SMALL, recon_size=RECON, overwrite=True, progress=False)
    with h5py.File(first[1], "r") as hf:
        assert hf["kspace"].shape == (2, *SMALL)


def test_write_fastmri_volume_checks_shapes(tmp_path):
    k = np.zeros((2, 16, 16), np.complex64)
    with pytest.raises(BlindspotError, match="k-space must be"):
        write_fastmri_volume(tmp_path / "a.h5", k[0], np.zeros((2, 8, 8), np.float32), {}, b"<x/>")
    with pytest.raises(BlindspotError, match="reconstruction must be"):
        write_fastmri_volume(tmp_path / "a.h5", k, np.zeros((3, 8, 8), np.float32), {}, b"<x/>")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("challenge", ["singlecoil", "multicoil"])
def test_phantom_dataset_equals_reading_the_written_files(tmp_path, challenge):
    mask_func = create_mask_func("random", [4, 8])
    write_phantom_volumes(tmp_path, 2, 2, seed=21, shape=SMALL, recon_size=RECON, challenge=challenge, num_coils=3,
                          progress=False)
    ds = PhantomDataset(2, 2, seed=21, shape=SMALL, recon_size=RECON, mask_func=mask_func, challenge=challenge,
                        num_coils=3, crop=(32, 32))
    reader = FastMRISliceDataset(tmp_path, mask_func=mask_func, crop=(32, 32))
    transform = KspaceTransform(mask_func, crop=(32, 32))
    assert len(ds) == len(reader) == 4 and ds.fnames == [phantom_fname(21), phantom_fname(22)]
    for i in range(len(ds)):
        mine = ds[i]
        v, s = divmod(i, 2)
        with h5py.File(tmp_path / ds.fnames[v], "r") as hf:
            key = "reconstruction_esc" if challenge == "singlecoil" else "reconstruction_rss"
            k, target, file_max = torch.from_numpy(hf["kspace"][s]), torch.from_numpy(hf[key][s]), hf.attrs["max"]
        direct = transform(k, target, ds.fnames[v], s, float(file_max))
        theirs = reader[i]
        assert mine.input.shape == (1, 32, 32) and mine.fname == ds.fnames[v] and mine.slice_num == s
        for other in (direct, theirs):
            for name in ("input", "target", "mask", "mean", "std"):
                assert torch.equal(getattr(mine, name), getattr(other, name)), name
            assert (mine.fname, mine.slice_num, mine.max_value) == (other.fname, other.slice_num, other.max_value)
            assert mine.acceleration == other.acceleration
        assert mine.attrs == {k: v for k, v in theirs.attrs.items() if k != "path"}


def test_phantom_dataset_without_mask_and_bad_options():
    ds = PhantomDataset(1, 2, seed=1, shape=(48, 48))
    sample = ds[1]
    assert sample.input.shape == (1, 48, 48) and torch.equal(sample.input, sample.target)
    assert sample.acceleration == 1.0 and sample.slice_num == 1 and ds[-1].slice_num == 1
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(BlindspotError, match="challenge"):
        PhantomDataset(1, 1, shape=(48, 48), challenge="tri-coil")
    with pytest.raises(BlindspotError, match="at least one volume"):
        PhantomDataset(0, 1, shape=(48, 48))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=-1), "non-negative"),
        (dict(shape=(8, 64)), "at least 16x16"),
        (dict(shape=(64,)), r"must be \(H, W\)"),
        (dict(num_coils=0), "at least 1"),
        (dict(num_slices=0), "at least one slice"),
    ],
)
def test_bad_generator_arguments(kwargs, message):
    args = dict(seed=0, num_slices=2, shape=(32, 32))
    args.update(kwargs)
    with pytest.raises(BlindspotError, match=message):
        generate_knee_volume(**args)


def test_cli_writes_files_and_panel(tmp_path, capsys):
    out, panel = tmp_path / "phantoms", tmp_path / "panel.png"
    rc = main(["data", "phantoms", "--out", str(out), "--volumes", "2", "--slices", "3", "--seed", "4",
               "--shape", "64", "48", "--recon-size", "40", "40", "--panel", str(panel)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["file_phantom_000004.h5", "file_phantom_000005.h5"]
    printed = capsys.readouterr().out
    assert "wrote 2 single-coil" in printed and "file_phantom_000005.h5" in printed
    assert panel.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = main(["data", "phantoms", "--out", str(tmp_path / "mc"), "--volumes", "1", "--slices", "1",
               "--shape", "48", "48", "--challenge", "multicoil", "--coils", "2"])
    assert rc == 0
    with h5py.File(tmp_path / "mc" / "file_phantom_000000.h5", "r") as hf:
        assert hf["kspace"].shape == (1, 2, 48, 48)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["data", "phantoms", "--out", str(tmp_path), "--volumes", "1", "--slices", "1",
                 "--shape", "4", "4"]) == 2
    assert "argument --shape: must be an integer in [8, 4096] pixels" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["data", "phantoms", "--out", str(blocker), "--volumes", "1", "--slices", "1",
                 "--shape", "32", "32"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["data", "phantoms", "--out", str(tmp_path), "--volumes", "0"]) == 2  # argparse: one line, exit 2
    assert "argument --volumes: must be an integer >= 1" in capsys.readouterr().err
