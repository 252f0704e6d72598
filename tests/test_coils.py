"""Coil sensitivity maps and the multi-coil acquisition: known answers, and the ACS estimators' measured accuracy."""

import math

import pytest
import torch

from blindspot.data.knee_phantom import generate_knee_volume
from blindspot.errors import BlindspotError
from blindspot.physics.acquisition import CartesianMRI
from blindspot.physics.coils import (coil_kspace, espirit_maps, estimate_maps, keep_columns, low_frequency_columns,
                                     lowres_maps, maps_from_coil_images)
from blindspot.physics.mri import create_mask_func, fft2c, ifft2c, rss


def grid(H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column positions, fractions of the field of view, centred: ``(H, 1)`` and ``(1, W)``."""
    y = (torch.arange(H, dtype=torch.float32) - H // 2).reshape(H, 1) / H
    x = (torch.arange(W, dtype=torch.float32) - W // 2).reshape(1, W) / W
    return y, x


def textured_object(H: int, W: int) -> torch.Tensor:
    """A real, positive ellipse with soft edges and a texture: ``(1, 1, H, W)``."""
    y, x = grid(H, W)
    ellipse = torch.sigmoid(40 * (0.09 - (x**2 + y**2 / 1.4)))
    return (ellipse * (1 + 0.3 * torch.cos(12 * math.pi * x) * torch.sin(9 * math.pi * y))).reshape(1, 1, H, W)


def smooth_coils(H: int, W: int, C: int = 8) -> torch.Tensor:
    """``C`` smooth complex coils on a ring around the field of view (Lorentzian fall-off, linear phase), normalised
    to ``Σ_c |S_c|² = 1``: complex64 ``(1, C, H, W)``."""
    y, x = grid(H, W)
    ang = (torch.arange(C, dtype=torch.float32) * 2 * math.pi / C).reshape(C, 1, 1)
    mag = 1 / (1 + ((x - 0.6 * torch.cos(ang)) ** 2 + (y - 0.6 * torch.sin(ang)) ** 2) / 0.35)
    phase = 2.0 * (x * torch.cos(ang) + y * torch.sin(ang)) + ang
    s = torch.polar(mag, phase).unsqueeze(0)
    return (s / rss(s, dim=1)).to(torch.complex64)


def map_error(estimate: torch.Tensor, truth: torch.Tensor, where: torch.Tensor) -> tuple[float, float]:
    """Mean over ``where`` ``(B, H, W)`` of ``‖ŝ − s‖₂`` over coils, and the same with the per-pixel phase factored
    out, ``√(2 − 2|⟨ŝ, s⟩|)`` (maps are only defined up to one phase per pixel)."""
    err = (estimate - truth).abs().square().sum(1).sqrt()[where]
    inner = (estimate.conj() * truth).sum(1).abs()[where]
    return float(err.mean()), float((2 - 2 * inner).clamp_min(0).sqrt().mean())


# ---------------------------------------------------------------------------------------------------------------
# Maps from fully sampled coil images, and the multi-coil acquisition
# ---------------------------------------------------------------------------------------------------------------
def phantom_coils(size: int = 48, coils: int = 6, slices: int = 2) -> torch.Tensor:
    """Noisy knee-phantom coil images, complex ``(slices, coils, size, size)``."""
    vol = generate_knee_volume(2, slices, shape=(size, size), recon_size=(size, size), num_coils=coils)
    return vol.image


def test_maps_from_fully_sampled_coils_return_the_magnitude_truth():
    coil_images = phantom_coils()
    truth = rss(coil_images, dim=1)  # (S, 1, H, W): the magnitude truth
    maps = maps_from_coil_images(coil_images)
    assert maps.shape == coil_images.shape and maps.dtype == torch.complex64
    assert torch.allclose(rss(maps, dim=1), torch.ones_like(truth), atol=1e-5)  # the phantom has noise everywhere
    assert torch.allclose(rss(maps * truth, dim=1), truth, rtol=1e-5, atol=1e-7)
    assert torch.allclose(maps * truth, coil_images, atol=1e-6)  # and the coil images themselves, phase included
    # a fully sampled multi-coil acquisition of the magnitude truth reproduces the coil images' RSS
    acq = CartesianMRI(torch.ones(48), sens_maps=maps)
    meas = acq.measure(truth)
    assert torch.allclose(meas.image, truth, rtol=1e-5, atol=1e-6)
    assert torch.allclose(meas.coil_images, coil_images, atol=1e-5)
    assert torch.allclose(meas.kspace, fft2c(coil_images), atol=1e-4)


def test_the_rss_floor_keeps_zero_regions_finite():
    coil_images = torch.zeros(1, 3, 16, 16, dtype=torch.complex64)
    coil_images[..., 4:12, 4:12] = torch.tensor([1.0, 1j, -0.5], dtype=torch.complex64).reshape(1, 3, 1, 1)
    maps = maps_from_coil_images(coil_images)
    assert torch.isfinite(torch.view_as_real(maps)).all()
    norm = rss(maps, dim=1)[0, 0]
    assert torch.allclose(norm[4:12, 4:12], torch.ones(8, 8)) and not maps[..., 0, 0].abs().any()
    assert not maps_from_coil_images(torch.zeros_like(coil_images)).abs().any()


def test_parseval_holds_per_coil():
    coil_images = phantom_coils()
    truth = rss(coil_images, dim=1)
    maps = maps_from_coil_images(coil_images)
    k = coil_kspace(truth, maps)
    energy = lambda t: t.abs().square().sum((-2, -1))  # noqa: E731  (S, C)
    assert torch.allclose(energy(k), energy(maps * truth), rtol=1e-5)
    mask = create_mask_func("random", [4])(48, seed="file_phantom_000002.h5").mask
    meas = CartesianMRI(mask, sens_maps=maps).measure(truth)
    assert torch.allclose(energy(meas.kspace), energy(meas.coil_images), rtol=1e-5)
    assert torch.allclose(energy(meas.kspace), energy(k * mask), rtol=1e-5)  # the masked k-space, coil by coil


def test_a_feature_in_the_unsampled_columns_leaves_every_coil_unchanged_and_fails_ip():
    """Maps that vary along the read-out (rows) only keep a feature's k-space in its columns, so a feature whose
    k-space lies in columns the mask skips (and their mirror images, for a real feature) reaches no coil."""
    H = W = 32
    y, _ = grid(H, W)
    ang = torch.arange(4, dtype=torch.float32).reshape(1, 4, 1, 1)
    s = torch.polar(1 + 0.5 * torch.cos(2 * math.pi * y + ang), 3 * y + ang).expand(1, 4, H, W)
    maps = (s / rss(s, dim=1)).to(torch.complex64)
    mask = create_mask_func("random", [4])(W, seed="file_phantom_000007.h5").mask
    truth = textured_object(H, W)
    j = torch.arange(W)
    blind = (mask[0] == 0) & (mask[0][(W - j) % W] == 0)  # unsampled, and so is the mirror column
    assert int(blind.sum()) >= 8
    spectrum = torch.randn(1, 1, H, W, dtype=torch.complex64, generator=torch.Generator().manual_seed(3)) * blind
    feature = ifft2c(spectrum).real
    feature = 0.5 * feature / feature.abs().max()  # real, ±half the truth's range
    assert bool((fft2c(maps * feature).abs().amax((0, 1, 2)) > 1e-3).any())  # it is there in fully sampled k-space
    acq = CartesianMRI(mask, sens_maps=maps)
    clean = acq.measure(truth)
    perturbed = acq.perturb(clean, feature)
    assert (perturbed.coil_images - clean.coil_images).abs().max() < 1e-6
    assert (perturbed.kspace - clean.kspace).abs().max() < 1e-5
    stats = acq.normalization(clean)
    ip = acq.information(clean, perturbed, stats)
    assert float(ip.max()) < 1e-10 < acq.ip_threshold
    # the same feature with sampled columns in its spectrum is seen
    seen = acq.perturb(clean, feature + 0.5 * ifft2c(fft2c(truth) * mask).real)
    assert float(acq.information(clean, seen, stats).min()) > acq.ip_threshold


# ---------------------------------------------------------------------------------------------------------------
# The auto-calibration region
# ---------------------------------------------------------------------------------------------------------------
def test_low_frequency_columns_follow_fastmris_rule():
    def cols(*sampled, W=16):
        m = torch.zeros(W)
        m[list(sampled)] = 1
        return m

    # centre block 6..9 (W // 2 = 8): two columns either side of the centre
    start, n = low_frequency_columns(cols(6, 7, 8, 9, 1, 13))
    assert (int(start), int(n)) == (6, 4)
    # a random column next to the block on one side only does not count (fastMRI takes the symmetric part)
    assert int(low_frequency_columns(cols(6, 7, 8, 9, 10))[1]) == 4
    assert int(low_frequency_columns(cols(5, 6, 7, 8, 9, 10))[1]) == 6
    # batched (B, 1, 1, W) and fastMRI's (B, 1, 1, W, 1) boolean masks
    batch = torch.stack([cols(7, 8), cols(5, 6, 7, 8, 9, 10)]).reshape(2, 1, 1, 16)
    start, n = low_frequency_columns(batch)
    assert start.tolist() == [7, 5] and n.tolist() == [2, 6]
    assert low_frequency_columns(batch.bool().unsqueeze(-1))[1].tolist() == [2, 6]
    # a fully sampled mask: every column (fastMRI's argmin rule would say 1)
    assert low_frequency_columns(torch.ones(16))[1].tolist() == [16]
    assert low_frequency_columns(torch.ones(16), fastmri_argmin=True)[1].tolist() == [1]
    # the width when known
    assert [int(t) for t in low_frequency_columns(cols(8), num_low_frequencies=5)] == [6, 5]
    with pytest.raises(BlindspotError, match="column mask"):
        low_frequency_columns(torch.ones(2, 3, 16))


def test_keep_columns_zeroes_everything_outside_each_items_block():
    k = torch.ones(2, 3, 4, 10, dtype=torch.complex64)
    out = keep_columns(k, torch.tensor([2, 4]), torch.tensor([3, 1]))
    assert out[0, :, :, 2:5].eq(1).all() and out[0].abs().sum() == 3 * 4 * 3
    assert out[1, :, :, 4].eq(1).all() and out[1].abs().sum() == 3 * 4


# ---------------------------------------------------------------------------------------------------------------
# Estimators from the auto-calibration region
# ---------------------------------------------------------------------------------------------------------------
def _synthetic(H=128, center_fraction=0.16):
    truth, maps = textured_object(H, H), smooth_coils(H, H)
    mask = create_mask_func("random", [4], [center_fraction])(H, seed="synthetic").mask
    inside = (truth > 0.3 * truth.max())[:, 0]
    return coil_kspace(truth, maps) * mask, mask, maps, inside


def test_acs_estimators_recover_smooth_synthetic_coils():
    """Noise-free, 20 ACS columns of 128. Measured mean error over the object (unit-norm maps): unwindowed
    low-resolution 0.0011, windowed 0.021, ESPIRiT 0.017 (0.003 up to the per-pixel phase); limits ≈ 2× that."""
    k, mask, maps, inside = _synthetic()
    assert int(low_frequency_columns(mask)[1]) == 20
    err, _ = map_error(lowres_maps(k, mask, window=False), maps, inside)
    assert err < 0.003
    err, _ = map_error(lowres_maps(k, mask), maps, inside)
    assert err < 0.04
    est = espirit_maps(k, mask, kernel_size=5)
    err, phase_free = map_error(est, maps, inside)
    assert err < 0.035 and phase_free < 0.007
    norm = rss(est, dim=1)[:, 0]
    assert torch.allclose(norm[inside], torch.ones(()), atol=1e-5)  # unit norm where the object is


def test_espirit_zeroes_the_maps_outside_the_object():
    k, mask, maps, inside = _synthetic(64, 0.25)
    truth = textured_object(64, 64)[:, 0]
    est = espirit_maps(k, mask, kernel_size=5)
    norm = rss(est, dim=1)[:, 0]
    outside = truth < 1e-4 * truth.max()
    assert bool(outside.any()) and not est.abs().amax(1)[outside].any()
    assert float(norm[inside].min()) > 0.99
    kept = espirit_maps(k, mask, kernel_size=5, crop=0.0)
    assert torch.allclose(rss(kept, dim=1), torch.ones(1, 1, 64, 64), atol=1e-5)


def test_acs_estimators_on_the_noisy_knee_phantom():
    """Realistic coils and noise (8 coils, 14 ACS columns of 96). Measured mean error over the tissue: fully sampled
    maps 0.044 (their noise), windowed low-resolution 0.041 (unwindowed 0.057), ESPIRiT 0.025 (0.006 up to the
    per-pixel phase)."""
    vol = generate_knee_volume(3, 1, shape=(128, 96), recon_size=(128, 96), num_coils=8, return_sensitivities=True)
    true_maps = vol.sensitivities / rss(vol.sensitivities, dim=1)
    tissue = rss(vol.image, dim=1)
    tissue = (tissue > 0.15 * tissue.amax())[:, 0]
    mask = create_mask_func("random", [4], [0.16])(96, seed=vol.fname).mask
    k = vol.kspace() * mask
    assert map_error(maps_from_coil_images(vol.image), true_maps, tissue)[0] < 0.06
    assert map_error(lowres_maps(k, mask), true_maps, tissue)[0] < 0.06
    err, phase_free = map_error(espirit_maps(k, mask, crop=0.0), true_maps, tissue)
    assert err < 0.04 and phase_free < 0.015


def test_estimate_maps_by_name_and_determinism():
    k, mask, maps, inside = _synthetic(64, 0.25)
    full = estimate_maps(coil_kspace(textured_object(64, 64), maps), method="full")
    assert map_error(full, maps, inside)[0] < 1e-5
    assert torch.equal(estimate_maps(k, mask, "lowres"), lowres_maps(k, mask))
    assert torch.equal(estimate_maps(k, mask, "espirit", kernel_size=4), espirit_maps(k, mask, kernel_size=4))
    assert torch.equal(espirit_maps(k, mask, kernel_size=4), espirit_maps(k, mask, kernel_size=4))


def test_bad_input_is_a_one_line_error():
    k, mask, _, _ = _synthetic(64, 0.25)
    few = create_mask_func("random", [4], [0.04])(64, seed=1).mask  # 3 ACS columns (4 with a random neighbour)
    with pytest.raises(BlindspotError, match="only 4 auto-calibration columns; the ESPIRiT .* at least 7"):
        espirit_maps(k * few, few)
    with pytest.raises(BlindspotError, match="needs fully sampled"):
        estimate_maps(k, mask, method="full")
    with pytest.raises(BlindspotError, match="unknown coil-map estimator"):
        estimate_maps(k, mask, method="sense")
    with pytest.raises(BlindspotError, match="complex"):
        lowres_maps(k.real, mask)
    with pytest.raises(BlindspotError, match="columns but"):
        lowres_maps(k, mask[..., :32])
    bad = k.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(BlindspotError, match="NaN"):
        lowres_maps(bad, mask)
    with pytest.raises(BlindspotError, match="kernel size"):
        espirit_maps(k, mask, kernel_size=1)


def test_num_low_frequencies_per_item_and_the_2d_calibration_box():
    from blindspot.physics.coils import calibration_box

    m = torch.zeros(2, 1, 1, 16)
    m[..., 6:10] = 1
    # per-item widths (fastMRI's data transform gives one per slice); 0 means "detect it"
    start, n = low_frequency_columns(m, torch.tensor([2, 0]))
    assert start.tolist() == [7, 6] and n.tolist() == [2, 4]
    start, n = low_frequency_columns(m[:1], torch.tensor([2, 6, 4]))  # one mask for three items
    assert n.tolist() == [2, 6, 4] and start.tolist() == [7, 5, 6]
    with pytest.raises(BlindspotError, match="num_low_frequencies"):
        low_frequency_columns(m, torch.tensor([2, 2, 2]))
    # a 2-D mask: a 4 × 6 box around DC (rows 6..9, columns 5..10 of 16 × 16) plus scattered samples
    m2 = torch.zeros(1, 1, 16, 16)
    m2[..., 6:10, 5:11] = 1
    m2[..., 0, 3] = m2[..., 12, 14] = m2[..., 8, 1] = 1
    box = calibration_box(m2)
    expect = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    expect[..., 6:10, 5:11] = True
    assert torch.equal(box, expect)
    expect[..., 5:11] = False
    expect[..., 6:10, 6:10] = True  # the width when known: 4 columns
    assert torch.equal(calibration_box(m2, 4), expect)


def test_lowres_maps_from_the_calibration_box_of_a_2d_mask():
    """The synthetic case of ``test_acs_estimators_recover_smooth_synthetic_coils`` under a 2-D Gaussian mask with a
    20 × 20 calibration box (128 × 128, centre fraction 0.16): the box alone makes the maps, and they are about as
    good as those of 20 ACS columns (same limits)."""
    from blindspot.physics.coils import calibration_box

    H = 128
    truth, maps = textured_object(H, H), smooth_coils(H, H)
    mask = create_mask_func("gaussian2d", [4], [0.16])(H, seed="synthetic", height=H).mask.reshape(1, 1, H, H)
    inside = (truth > 0.3 * truth.max())[:, 0]
    k = coil_kspace(truth, maps) * mask
    # the detected box holds the drawn 20 × 20 box (rows and columns 54..73), plus any fully sampled run next to it
    assert bool(calibration_box(mask)[..., 54:74, 54:74].all())
    est = lowres_maps(k, mask)
    err, _ = map_error(est, maps, inside)
    assert err < 0.04
    err, _ = map_error(lowres_maps(k, mask, window=False), maps, inside)
    assert err < 0.04
    # only the box reaches the maps: a sampled position outside it changes nothing
    outside = (mask.bool() & ~calibration_box(mask)).nonzero()[0]
    k2 = k.clone()
    k2[:, :, outside[2], outside[3]] *= 5.0
    assert torch.equal(lowres_maps(k2, mask), est)
