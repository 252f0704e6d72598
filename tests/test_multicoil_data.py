"""Multi-coil samples and batches: coil maps and masked k-space on request, the multi-coil attack acquisition built
from a batch, and one-line errors for data that cannot serve (too few calibration columns, single-coil k-space)."""

import pytest
import torch
from torch import nn

from blindspot.attacks.features import FeatureSampler
from blindspot.attacks.fnaf import FnafObjective, as_truths, attack_acquisition
from blindspot.attacks.search import RandomSearch
from blindspot.data.fastmri import FastMRISliceDataset
from blindspot.data.knee_files import write_phantom_volumes
from blindspot.data.mri import open_mri_dataset
from blindspot.data.phantom_dataset import PhantomDataset
from blindspot.data.sample import collate_mri
from blindspot.errors import BlindspotError
from blindspot.models.varnet import VarNet
from blindspot.physics.acquisition import CartesianMRI
from blindspot.physics.mri import center_crop, create_mask_func, fft2c, ifft2c, rss
from blindspot.training.mri import reconstruct_batch

GEOMETRY = dict(shape=(32, 32), recon_size=(24, 24), slices=2)
MASKS = create_mask_func("random", [4], [0.16])  # 5 calibration columns of 32


def phantoms(**options):
    return PhantomDataset(volumes=2, seed=3, mask_func=MASKS, challenge="multicoil", num_coils=4,
                          **GEOMETRY, **options)


def test_maps_and_kspace_only_when_asked_for():
    plain = phantoms()[0]
    assert plain.kspace is None and plain.sens_maps is None
    sample = phantoms(coil_maps="full", kspace=True)[0]
    assert torch.equal(sample.input, plain.input) and torch.equal(sample.target, plain.target)
    assert sample.kspace.shape == (4, 32, 32) and sample.kspace.dtype == torch.complex64
    assert sample.sens_maps.shape == (4, 24, 24) and sample.sens_maps.dtype == torch.complex64
    assert sample.attrs["coil_maps"] == "full"
    # the masked k-space is the input's: RSS of its cropped coil images is the zero-filled input
    assert torch.allclose(rss(center_crop(ifft2c(sample.kspace), (24, 24)), dim=0), sample.input, atol=1e-6)
    assert bool((sample.kspace[..., sample.mask[0] == 0] == 0).all())
    # "full" maps: unit RSS on the object, and S_c · target is the cropped coil image c
    vol = phantoms().volume(0)
    coil_images = center_crop(ifft2c(vol.kspace[0]), (24, 24))
    obj = sample.target[0] > 1e-3 * sample.target.max()
    assert torch.allclose(rss(sample.sens_maps, dim=0)[0][obj], torch.ones(int(obj.sum())), atol=1e-5)
    assert torch.allclose(sample.sens_maps * sample.target, coil_images, atol=1e-5 * float(coil_images.abs().max()))


def test_single_coil_data_are_unchanged_and_get_no_maps():
    single = PhantomDataset(volumes=1, seed=3, mask_func=MASKS, **GEOMETRY)
    with_maps = PhantomDataset(volumes=1, seed=3, mask_func=MASKS, coil_maps="full", kspace=True, **GEOMETRY)
    a, b = single[1], with_maps[1]
    assert torch.equal(a.input, b.input) and torch.equal(a.target, b.target) and torch.equal(a.mask, b.mask)
    assert b.sens_maps is None and b.kspace.shape == (1, 32, 32)
    truths = as_truths(collate_mri([b]))
    assert truths.sens_maps is None and attack_acquisition(truths, None).coils == 1


def test_batches_stack_maps_and_kspace_and_refuse_mixtures():
    ds = phantoms(coil_maps="full", kspace=True)
    batch = collate_mri([ds[0], ds[3]])
    assert batch.kspace.shape == (2, 4, 32, 32) and batch.sens_maps.shape == (2, 4, 24, 24)
    moved = batch.to("cpu")
    assert torch.equal(moved.kspace, batch.kspace) and torch.equal(moved.sens_maps, batch.sens_maps)
    other = PhantomDataset(volumes=1, seed=9, mask_func=MASKS, challenge="multicoil", num_coils=3,
                           coil_maps="full", kspace=True, **GEOMETRY)[0]
    with pytest.raises(BlindspotError, match="cannot batch k-space of different shapes"):
        collate_mri([ds[0], other])
    with pytest.raises(BlindspotError, match="has no k-space while others"):
        collate_mri([ds[0], phantoms()[0]])


def test_a_multicoil_batch_gives_the_attack_a_multicoil_acquisition():
    """With "full" maps the acquisition of the target reproduces the data's coil images: fully sampled, its RSS is the
    target; under-sampled, each coil is the cropped coil image with the (resampled) mask applied; a feature enters
    every coil as S_c · δ'."""
    batch = collate_mri([phantoms(coil_maps="full")[i] for i in (0, 2)])
    truths = as_truths(batch)
    assert truths.sens_maps.shape == (2, 4, 24, 24) and truths.subset([1]).sens_maps.shape == (1, 4, 24, 24)
    acq = attack_acquisition(truths, None)
    assert isinstance(acq, CartesianMRI) and acq.coils == 4 and len(acq) == 2
    assert acq.describe()["coils"] == "multi"
    full = CartesianMRI(torch.ones(24), sens_maps=truths.sens_maps).measure(truths.image)
    assert torch.allclose(full.image, truths.image, atol=1e-5 * float(truths.image.max()))
    meas = acq.measure(truths.image)
    vol = phantoms().volume(0)
    coils0 = center_crop(ifft2c(vol.kspace[0]), (24, 24)).unsqueeze(0)  # (1, 4, 24, 24)
    expected = ifft2c(acq.mask[:1] * fft2c(coils0))
    assert torch.allclose(meas.coil_images[:1], expected, atol=1e-5 * float(coils0.abs().max()))
    delta = torch.zeros_like(truths.image)
    delta[:, :, 12, 12] = 1.0
    moved = acq.perturb(meas, delta).coil_images - meas.coil_images
    assert torch.allclose(moved, ifft2c(acq.mask * fft2c(truths.sens_maps * delta)), atol=1e-6)
    assert bool((moved.abs().flatten(2).amax(2) > 0).all())  # every coil sees the feature
    # a mask function as the physics: the same multi-coil acquisition, masks seeded by file name
    drawn = attack_acquisition(truths, MASKS)
    assert drawn.coils == 4


def test_too_few_calibration_columns_is_a_one_line_error_naming_the_file(tmp_path):
    paths = write_phantom_volumes(tmp_path / "mc", 1, 2, seed=4, shape=(32, 32), challenge="multicoil", num_coils=4,
                                  recon_size=(24, 24))
    ds = open_mri_dataset(tmp_path / "mc", create_mask_func("random", [4], [0.08]), coil_maps="espirit")
    with pytest.raises(BlindspotError) as info:
        ds[0]
    msg = info.value.message
    assert "\n" not in msg and str(paths[0]) in msg and "slice 0" in msg
    assert "only 2 auto-calibration columns; the ESPIRiT coil-map estimator needs at least 7" in msg
    lowres = FastMRISliceDataset(tmp_path / "mc", create_mask_func("random", [4], [0.16]), coil_maps="lowres")[1]
    assert lowres.sens_maps.shape == (4, 24, 24) and lowres.attrs["coil_maps"] == "lowres"
    with pytest.raises(BlindspotError, match="unknown coil-map estimator 'sense'"):
        open_mri_dataset(tmp_path / "mc", None, coil_maps="sense")


def test_a_kspace_network_refuses_single_coil_batches():
    single = PhantomDataset(volumes=1, seed=3, mask_func=MASKS, kspace=True, **GEOMETRY)
    model = VarNet(num_cascades=1, sens_chans=2, sens_pools=1, chans=2, pools=1)
    with pytest.raises(BlindspotError, match="is single-coil k-space; VarNet takes multi-coil k-space"):
        reconstruct_batch(model, collate_mri([single[0]]))
    with pytest.raises(BlindspotError, match="opened without it"):
        reconstruct_batch(model, collate_mri([phantoms()[0]]))


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_reconstruct_batch_calls_varnet_on_the_masked_kspace_and_crops_its_output():
    """A VarNet whose regularisers output zero returns the zero-filled RSS: cropped and normalised with the input's
    statistics it is exactly the normalised input."""
    batch = collate_mri([phantoms(kspace=True)[i] for i in (0, 1)])
    model = VarNet(num_cascades=2, sens_chans=2, sens_pools=1, chans=2, pools=1)
    for cascade in model.cascades:
        cascade.model = Zero()
    with torch.no_grad():
        out = reconstruct_batch(model, batch)
    assert out.shape == (2, 1, 24, 24)
    assert torch.allclose(out, batch.stats.apply(batch.input, clamp=False), atol=1e-4)


def test_fnaf_on_varnet_through_the_multicoil_acquisition_of_a_batch():
    batch = collate_mri([phantoms(coil_maps="full")[i] for i in (0, 1)])
    torch.manual_seed(0)
    model = VarNet(num_cascades=1, sens_chans=2, sens_pools=1, chans=2, pools=1)
    search = RandomSearch(sampler=FeatureSampler("disc", intensity_range=(0.5, 1.0)),
                          objective=FnafObjective(criterion="recovery"), n_candidates=2)
    result = search(model, batch, MASKS)
    ev = result.evaluation
    assert len(result) == 2 and torch.isfinite(ev.attack_loss).all() and bool(ev.accepted.all())
