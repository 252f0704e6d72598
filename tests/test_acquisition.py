"""The acquisition interface: known answers for MRI (single- and multi-coil) and low-dose CT, and the network adapters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from blindspot.errors import BlindspotError
from blindspot.models.adapters import Network, as_network
from blindspot.physics.acquisition import CartesianMRI, LowDoseCTScan, Measurement
from blindspot.physics.ct import HUNormalization, LowDoseCT
from blindspot.physics.mri import (CartesianUndersampling, create_mask_func, fft2c, ifft2c, normalize, rss)

S = 32


def _truth(n: int = 2, size: int = S) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    r = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    disc = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.35 * size) ** 2).float()
    return (disc + 0.1 * torch.rand(n, 1, size, size, generator=g)).float()


def _mri(n: int = 2, acc: int = 4) -> CartesianMRI:
    return CartesianMRI.from_mask_func(create_mask_func("random", [acc]), S, [f"v{i}.h5" for i in range(n)])


def test_single_coil_matches_the_undersampling_operator_and_normalisation():
    y = _truth()
    acq = _mri()
    meas = acq.measure(y)
    assert torch.allclose(meas.image, CartesianUndersampling(acq.mask)(y), atol=1e-6)
    x, stats = acq.network_input(meas)
    ref, ref_stats = normalize(meas.image)
    assert torch.allclose(x, ref) and torch.allclose(stats.std, ref_stats.std)
    # the masked k-space is M ⊙ F(y)
    assert torch.allclose(meas.kspace, fft2c(y) * acq.mask, atol=1e-5)
    assert torch.equal(acq.accelerations, torch.full((2,), 4.0))


def test_perturb_is_exact_and_the_null_space_is_invisible():
    y = _truth()
    acq = _mri(acc=8)
    meas = acq.measure(y)
    delta = torch.zeros_like(y)
    delta[:, :, 10:13, 14:16] = 0.7
    assert torch.allclose(acq.perturb(meas, delta).image, acq.measure(y + delta).image, atol=1e-6)
    # Parseval: the null-space and range parts are orthogonal and add up to the image
    null = acq.null_space(delta.to(torch.complex64))
    rng = delta - null
    assert math.isclose(float(null.abs().square().sum() + rng.abs().square().sum()),
                        float(delta.square().sum()), rel_tol=1e-5)
    # a change wholly in the unsampled columns leaves the measurements unchanged (to float precision); a real image
    # has conjugate-symmetric k-space, so the (complex) null-space part itself is the invisible change
    invisible = null
    assert torch.allclose(acq.perturb(meas, invisible).image, meas.image, atol=1e-5)
    stats = acq.normalization(meas)
    assert float(acq.information(meas, acq.perturb(meas, invisible), stats).max()) < 1e-9
    assert bool((acq.information(meas, acq.perturb(meas, delta), stats) > acq.ip_threshold).all())


def test_select_follows_the_items():
    acq = _mri(3)
    sub = acq.select(torch.tensor([2, 0, 2]))
    assert torch.equal(sub.mask[0], acq.mask[2]) and torch.equal(sub.mask[1], acq.mask[0])
    assert torch.equal(sub.accelerations, acq.accelerations[[2, 0, 2]])


def _coil_maps(coils: int, size: int = S) -> torch.Tensor:
    """Smooth complex maps normalised so that Σ_c |S_c|² = 1 everywhere."""
    r = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    maps = []
    for c in range(coils):
        a = 2 * math.pi * c / coils
        mag = torch.exp(-((yy - 0.8 * math.sin(a)) ** 2 + (xx - 0.8 * math.cos(a)) ** 2))
        maps.append(mag * torch.exp(1j * (a + 0.5 * xx)))
    s = torch.stack(maps).to(torch.complex64)
    return (s / rss(s, dim=0)).unsqueeze(0)


def test_multi_coil_rss_of_fully_sampled_coil_images_is_the_truth():
    y = _truth(1)
    acq = CartesianMRI(torch.ones(S), sens_maps=_coil_maps(4))
    meas = acq.measure(y)
    assert meas.coil_images.shape == (1, 4, S, S)
    assert torch.allclose(meas.image, y, atol=1e-5)
    # Parseval per coil, and the adjoint combines the coils back into the (complex) truth
    assert torch.allclose(meas.kspace.abs().square().sum((-2, -1)), meas.coil_images.abs().square().sum((-2, -1)),
                          rtol=1e-4)
    assert torch.allclose(acq.adjoint(meas).real, y, atol=1e-5)


def _ct(size: int = S, dose: float = 0.25, i0: float = 1e5, response: str = "psf") -> LowDoseCTScan:
    return LowDoseCTScan(LowDoseCT((size, size), pixel_size_mm=2.0, i0=i0), dose, HUNormalization(-500.0, 500.0),
                         feature_response=response)


def _ct_truth(size: int = S) -> torch.Tensor:
    hu = _truth(1, size) * 1000.0 - 1000.0  # a water disc in air
    return hu


def test_ct_perturb_is_the_linear_response_with_the_noise_kept():
    acq = _ct(response="exact")
    y = _ct_truth()
    meas = acq.measure(y, torch.Generator().manual_seed(3))
    again = acq.measure(y, torch.Generator().manual_seed(3))
    assert torch.equal(meas.image, again.image)  # same seed, same noise
    delta = torch.zeros_like(y)
    delta[..., 14:18, 14:18] = 100.0
    pert = acq.perturb(meas, delta)
    assert torch.equal(pert.noise, meas.noise)
    # the deterministic part is exact: FBP(P(y + δ)) = FBP(P(y)) + FBP(P(δ)) inside the body (μ ≥ 0 there)
    lhs = acq.ct.noise_free(y + delta) - acq.ct.noise_free(y)
    assert torch.allclose(pert.image - meas.image, lhs, atol=0.5)
    # the normalisation is the network's fixed HU map, without clamp
    x, stats = acq.network_input(meas)
    assert torch.allclose(x, (meas.image + 500.0) / 500.0)


def test_the_measured_psf_reproduces_the_exact_feature_response():
    size = 96
    exact, fast = _ct(size, response="exact"), _ct(size)
    r = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    for radius, (r0, c0) in ((1.5, (40, 51)), (3.0, (57, 44)), (5.0, (48, 48))):
        disc = ((((yy - r0) ** 2 + (xx - c0) ** 2) <= radius**2).float() * 50.0).reshape(1, 1, size, size)
        a, b = exact.response(disc), fast.response(disc)
        assert abs(float(b.norm() / a.norm()) - 1.0) < 0.05  # the same energy: the IP statistic d' agrees
        assert float((a - b).norm() / a.norm()) < 0.15  # the simulator's own position-to-position spread
    assert fast.psf().shape == (21, 21) and math.isclose(float(fast.psf().sum()), 1.0, rel_tol=1e-5)


def test_ct_noise_scales_with_one_over_root_dose():
    y = _ct_truth(48)
    sig = {}
    for dose in (1.0, 0.25):
        acq = LowDoseCTScan(LowDoseCT((48, 48), pixel_size_mm=2.0, i0=1e5), dose, HUNormalization(0.0, 1.0))
        sig[dose] = float(acq.noise_sigma(acq.measure(y, torch.Generator().manual_seed(1))))
    assert 1.6 < sig[0.25] / sig[1.0] < 2.4  # √4 = 2


def test_ct_information_is_the_detectability_above_the_noise():
    acq = _ct()
    y = _ct_truth()
    meas = acq.measure(y, torch.Generator().manual_seed(0))
    stats = acq.normalization(meas)
    sigma = float(acq.noise_sigma(meas))
    faint, strong = torch.zeros_like(y), torch.zeros_like(y)
    faint[..., 15:17, 15:17] = 0.02 * sigma
    strong[..., 13:19, 13:19] = 3 * sigma
    d_faint = float(acq.information(meas, acq.perturb(meas, faint), stats))
    d_strong = float(acq.information(meas, acq.perturb(meas, strong), stats))
    assert d_faint < acq.ip_threshold < d_strong
    expected = float(acq.response(strong).norm()) / sigma
    assert math.isclose(d_strong, expected, rel_tol=1e-4)


class ZeroFilledKspace(nn.Module):
    """A k-space network in fastMRI VarNet's convention: the RSS of the inverse FFT of the masked k-space."""

    network_input = "kspace"

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert masked_kspace.shape[-1] == 2 and mask.dtype == torch.bool and mask.shape[-1] == 1
        return rss(ifft2c(torch.view_as_complex(masked_kspace.contiguous())), dim=1)[:, 0]


def test_kspace_adapter_gives_the_image_networks_answer_for_a_zero_filled_network():
    y = _truth()
    acq = _mri()
    meas = acq.measure(y)
    x, stats = acq.network_input(meas)
    kspace_net = as_network(ZeroFilledKspace())
    assert kspace_net.convention == "kspace" and kspace_net.needs_measurements
    out = kspace_net(acq, meas, x, stats)
    assert torch.allclose(out, stats.apply(meas.image, clamp=False), atol=1e-5)
    identity = as_network(nn.Identity())
    assert torch.allclose(identity(acq, meas, x, stats), x)


def test_wrong_modality_or_convention_is_a_one_line_error():
    with pytest.raises(BlindspotError, match="CT network"):
        Network(nn.Identity(), name="cnn10", modality="ct").check(_mri())
    with pytest.raises(BlindspotError, match="needs an MRI acquisition"):
        as_network(ZeroFilledKspace(), name="my-varnet").check(_ct())
    with pytest.raises(BlindspotError, match="convention"):
        Network(nn.Identity(), convention="sinogram")


def test_measurement_cat_and_select_round_trip():
    meas = _mri(3).measure(_truth(3))
    parts = [meas.select(torch.tensor([i])) for i in range(3)]
    back = Measurement.cat(parts)
    assert torch.equal(back.image, meas.image) and torch.equal(back.coil_images, meas.coil_images)


# ----------------------------------------------------------------------------------------------------------------
# 2-D masks through the same acquisition
# ----------------------------------------------------------------------------------------------------------------
def _mri2d(n: int = 2, kind: str = "gaussian2d", acc: int = 4, **kwargs) -> CartesianMRI:
    return CartesianMRI.from_mask_func(create_mask_func(kind, [acc]), S, [f"v{i}.h5" for i in range(n)], height=S,
                                       **kwargs)


@pytest.mark.parametrize("kind", ["gaussian2d", "poisson2d"])
def test_2d_mask_measure_perturb_and_an_exact_null_space(kind):
    y = _truth()
    acq = _mri2d(kind=kind)
    assert acq.mask.shape == (2, 1, S, S) and acq.two_dimensional and acq.describe()["mask"] == "2-D"
    assert torch.allclose(acq.accelerations, torch.full((2,), 4.0))
    meas = acq.measure(y)
    assert meas.mask.shape == (2, 1, S, S)
    # the masked k-space is M ⊙ F(y) over both axes, and the zero-filled image its inverse
    assert torch.allclose(meas.kspace, fft2c(y) * acq.mask, atol=1e-5)
    assert torch.allclose(meas.image, ifft2c(fft2c(y) * acq.mask).abs(), atol=1e-5)
    delta = torch.zeros_like(y)
    delta[:, :, 10:13, 14:16] = 0.7
    assert torch.allclose(acq.perturb(meas, delta).image, acq.measure(y + delta).image, atol=1e-6)
    # a feature wholly in unsampled k-space (random coefficients on the mask's zeros) changes no measurement and
    # fails IP; the null-space projector returns it unchanged and removes every sampled coefficient
    g = torch.Generator().manual_seed(1)
    k = torch.complex(torch.randn(2, 1, S, S, generator=g), torch.randn(2, 1, S, S, generator=g)) * (1 - acq.mask)
    invisible = ifft2c(k)
    perturbed = acq.perturb(meas, invisible)
    assert torch.allclose(perturbed.kspace, meas.kspace, atol=1e-5)
    assert torch.allclose(perturbed.image, meas.image, atol=1e-5)
    stats = acq.normalization(meas)
    assert float(acq.information(meas, perturbed, stats).max()) < 1e-9
    assert torch.allclose(acq.null_space(invisible), invisible, atol=1e-5)
    assert float((fft2c(acq.null_space(delta.to(torch.complex64))) * acq.mask).abs().max()) < 1e-5
    assert bool((acq.information(meas, acq.perturb(meas, delta), stats) > acq.ip_threshold).all())
    # Parseval: the null-space and range parts are orthogonal and add up to the image
    null = acq.null_space(delta.to(torch.complex64))
    assert math.isclose(float(null.abs().square().sum() + (delta - null).abs().square().sum()),
                        float(delta.square().sum()), rel_tol=1e-5)


def test_2d_mask_select_crop_and_multi_coil():
    acq = _mri2d(3, crop=(24, 24), sens_maps=_coil_maps(4))
    sub = acq.select(torch.tensor([2, 0, 2]))
    assert sub.mask.shape == (3, 1, S, S) and torch.equal(sub.mask[1], acq.mask[0])
    assert torch.equal(sub.num_low_frequencies, acq.num_low_frequencies[[2, 0, 2]])
    one = CartesianMRI(acq.mask[0, 0])  # one 2-D mask for every item
    assert one.select(torch.tensor([0, 0])).mask.shape == (2, 1, S, S)
    y = _truth(3)
    meas = acq.measure(y)
    assert meas.image.shape == (3, 1, 24, 24) and meas.coil_images.shape == (3, 4, S, S)
    # every coil is masked by the item's own 2-D mask; Parseval per coil
    assert torch.allclose(meas.kspace, fft2c(_coil_maps(4) * y) * acq.mask, atol=1e-5)
    assert torch.allclose(meas.kspace.abs().square().sum((-2, -1)), meas.coil_images.abs().square().sum((-2, -1)),
                          rtol=1e-4)
    assert acq.network_mask(12, 12).shape == (3, 1, 12, 12)
    with pytest.raises(BlindspotError, match="mask is"):
        acq.measure(torch.rand(3, 1, S + 2, S))


def test_kspace_networks_get_the_mask_functions_centre_lines():
    seen = {}

    class Probe(nn.Module):
        network_input = "kspace"

        def forward(self, kspace, mask, num_low_frequencies=None):
            seen["low"], seen["mask"] = num_low_frequencies, mask.shape
            return torch.view_as_complex(kspace.contiguous()).abs().square().sum(1).sqrt()

    y = _truth(2)
    for acq, mask_shape in ((_mri(2), (2, 1, 1, S, 1)), (_mri2d(2), (2, 1, S, S, 1))):
        meas = acq.measure(y)
        x, stats = acq.network_input(meas)
        as_network(Probe())(acq, meas, x, stats)
        assert seen["mask"] == mask_shape
        # fastMRI's num_low_frequencies: round(W · centre fraction) per item (4x: 0.08 → 3 of 32 columns)
        assert torch.equal(seen["low"], torch.full((2,), round(S * 0.08)))
    # a module without the argument is called without it; an acquisition without masks' records passes none
    as_network(ZeroFilledKspace())(acq, meas, x, stats)
    bare = CartesianMRI(acq.mask)
    as_network(Probe())(bare, bare.measure(y), x, stats)
    assert seen["low"] is None
