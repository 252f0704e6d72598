"""CT physics: HU ↔ attenuation, windows, the parallel-beam projector against scikit-image, and the low-dose noise law."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from blindspot.errors import BlindspotError
from blindspot.physics.ct import (
    MU_WATER_PER_MM,
    WINDOWS,
    HUNormalization,
    LowDoseCT,
    ParallelBeamProjector,
    apply_window,
    hu_to_mu,
    mu_to_hu,
    noise_std,
    parse_window,
)


def _disk_phantom(n: int) -> torch.Tensor:
    """Water disk (0 HU) with a bone insert (300 HU) in air, ``(1, 1, n, n)``."""
    y, x = torch.meshgrid(torch.arange(n) - n // 2, torch.arange(n) - n // 2, indexing="ij")
    r = (x**2 + y**2).float().sqrt() * 64.0 / n
    hu = torch.where(r < 24, torch.tensor(0.0), torch.tensor(-1000.0))
    return torch.where(r < 8, torch.tensor(300.0), hu)[None, None], r


# ----------------------------------------------------------------------------------------------------------------
def test_hu_round_trip_and_known_values():
    hu = torch.linspace(-1000, 3000, 101, dtype=torch.float64)
    assert torch.allclose(mu_to_hu(hu_to_mu(hu)), hu, atol=1e-9)
    assert float(hu_to_mu(torch.tensor(0.0))) == pytest.approx(MU_WATER_PER_MM)
    assert float(hu_to_mu(torch.tensor(-1000.0))) == pytest.approx(0.0, abs=1e-12)
    assert float(mu_to_hu(torch.tensor(2 * MU_WATER_PER_MM))) == pytest.approx(1000.0)


def test_windows():
    lung, abdomen, diff = WINDOWS["lung"], WINDOWS["abdomen"], WINDOWS["difference"]
    assert (lung.lower, lung.upper) == (-1350.0, 150.0)
    assert (abdomen.lower, abdomen.upper) == (-150.0, 250.0)
    assert (diff.lower, diff.upper) == (-50.0, 50.0)
    hu = torch.tensor([-2000.0, -150.0, 50.0, 250.0, 900.0])
    assert torch.allclose(apply_window(hu, "abdomen"), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert parse_window("-600,1500") == parse_window((-600, 1500))
    assert parse_window("-600,1500").center == lung.center and parse_window("-600,1500").width == lung.width
    with pytest.raises(BlindspotError):
        parse_window("brain-ish")
    with pytest.raises(BlindspotError):
        parse_window("0,-10")


def test_normalization_round_trip_and_record():
    norm = HUNormalization(-500.0, 400.0)
    hu = torch.randn(2, 1, 8, 8) * 300
    assert torch.allclose(norm.to_hu(norm.to_network(hu)), hu, atol=1e-3)
    assert torch.allclose(norm.scale(torch.tensor(400.0)), torch.tensor(1.0))
    assert HUNormalization.from_dict(norm.as_dict()) == norm
    with pytest.raises(BlindspotError, match="ckpt.pt"):
        HUNormalization.from_dict({"kind": "instance", "clamp": 6.0}, "ckpt.pt")
    fitted = HUNormalization.fit(torch.tensor([0.0, 2.0, 4.0]))
    assert fitted.mean == pytest.approx(2.0) and fitted.std == pytest.approx(2.0)


# ----------------------------------------------------------------------------------------------------------------
def test_ray_projector_matches_skimage_radon_and_fbp_matches_iradon():
    from skimage.transform import iradon, radon

    rng = np.random.default_rng(0)
    n, a = 32, 24
    yy, xx = np.mgrid[:n, :n]
    img = ((xx - 14) ** 2 / 80 + (yy - 17) ** 2 / 50 < 1) * 1.0 + rng.random((n, n)) * 0.1
    theta = np.arange(a) * 180.0 / a
    ref = radon(img, theta, circle=False, preserve_range=True)  # (n_det, angles)
    proj = ParallelBeamProjector((n, n), n_angles=a, method="ray")
    sino = proj.project(torch.tensor(img)[None, None])[0, 0].numpy().T
    assert sino.shape == ref.shape
    assert np.abs(sino - ref).max() < 1e-4 * np.abs(ref).max()
    for name in ("ramp", "shepp-logan", "hann"):
        p = ParallelBeamProjector((n, n), n_angles=a, filter_name=name)
        rec = p.fbp(torch.tensor(ref.T)[None, None])[0, 0].numpy()
        rk = iradon(ref, theta, circle=False, preserve_range=True, output_size=n, filter_name=name)
        assert np.abs(rec - rk)[4:-4, 4:-4].max() < 1e-5, name


def test_pixel_projector_conserves_mass_and_agrees_with_ray():
    n = 40
    img = torch.rand(2, 1, n, n, dtype=torch.float64)
    pix = ParallelBeamProjector((n, n), n_angles=30).project(img)
    ray = ParallelBeamProjector((n, n), n_angles=30, method="ray").project(img)
    # every view of the pixel-driven projector carries the image's total (the extreme corners' shadows may fall
    # just off the detector at 45°: a loss below 0.1 %); exactly so for an image inside the inscribed circle
    total = img.sum(dim=(-2, -1)).unsqueeze(-1).expand(2, 1, 30)
    assert torch.allclose(pix.sum(-1), total, rtol=1e-3)
    y, x = torch.meshgrid(torch.arange(n) - n // 2, torch.arange(n) - n // 2, indexing="ij")
    disk = img * ((x**2 + y**2) < (n // 2 - 1) ** 2)
    pix_disk = ParallelBeamProjector((n, n), n_angles=30).project(disk)
    assert torch.allclose(pix_disk.sum(-1), disk.sum(dim=(-2, -1)).unsqueeze(-1).expand(2, 1, 30), rtol=1e-10)
    assert (pix - ray).abs().mean() < 0.03 * ray.abs().mean()


def test_noise_free_reconstruction_recovers_hu():
    hu, r = _disk_phantom(64)
    ct = LowDoseCT((64, 64), pixel_size_mm=5.0)
    rec = ct.noise_free(hu)[0, 0]
    assert float(rec[r < 5].mean()) == pytest.approx(300.0, abs=3.0)
    ring = (r > 11) & (r < 20)
    assert abs(float(rec[ring].mean())) < 2.0
    assert float(rec[r > 28].mean()) == pytest.approx(-1000.0, abs=2.0)


def test_projector_is_differentiable():
    ct = LowDoseCT((24, 24), pixel_size_mm=10.0, n_angles=16)
    hu = torch.zeros(1, 1, 24, 24, requires_grad=True)
    ct.noise_free(hu).sum().backward()
    assert hu.grad is not None and torch.isfinite(hu.grad).all() and hu.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
def test_noise_std_scales_as_one_over_sqrt_dose():
    """The physics law: image noise std ∝ 1/√dose. 25 % vs 100 % dose → 2 ± 10 %; 10 % → √10 ± 10 %."""
    from blindspot.data.ct_phantom import FOV_MM, PhantomPatient

    hu = torch.stack([PhantomPatient(k, s).render(0.5, size=64) for k in ("chest", "abdomen") for s in (0, 1)])
    hu = hu.unsqueeze(1)
    ct = LowDoseCT((64, 64), pixel_size_mm=FOV_MM / 64)
    ref = ct.noise_free(hu)
    body = (hu > -900) & (ref > -900)
    out = ct.simulate(hu, (1.0, 0.25, 0.10), generator=torch.Generator().manual_seed(0))
    s100 = float((out[1.0] - ref)[body].std())
    s25 = float((out[0.25] - ref)[body].std())
    s10 = float((out[0.10] - ref)[body].std())
    assert s25 / s100 == pytest.approx(2.0, rel=0.10)
    assert s10 / s100 == pytest.approx(math.sqrt(10.0), rel=0.10)
    # per image too, with the helper
    ratio = noise_std(out[0.25], ref, body) / noise_std(out[1.0], ref, body)
    assert ((ratio > 1.8) & (ratio < 2.2)).all(), ratio
    # the noise is centred: no bias beyond a few HU in the body
    assert abs(float((out[0.25] - ref)[body].mean())) < 3.0


def test_simulation_is_seeded_and_nested():
    hu, _ = _disk_phantom(32)
    ct = LowDoseCT((32, 32), pixel_size_mm=10.0, n_angles=40)
    a = ct.simulate(hu, (1.0, 0.25), generator=torch.Generator().manual_seed(3))
    b = ct.simulate(hu, (0.25, 1.0), generator=torch.Generator().manual_seed(3))
    c = ct.simulate(hu, (1.0, 0.25), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0.25], b[0.25]) and torch.equal(a[1.0], b[1.0])
    assert not torch.equal(a[0.25], c[0.25])
    # nested doses share noise: the full-dose image is closer to the 25 % image than an independent one is
    d_nested = (a[0.25] - a[1.0]).pow(2).mean()
    d_indep = (a[0.25] - c[1.0]).pow(2).mean()
    assert d_nested < d_indep
    assert ct(hu, 0.25, torch.Generator().manual_seed(3)).shape == hu.shape


def test_bad_physics_settings():
    with pytest.raises(BlindspotError):
        LowDoseCT((32, 32), pixel_size_mm=-1.0)
    with pytest.raises(BlindspotError):
        ParallelBeamProjector((32, 32), filter_name="butterworth")
    ct = LowDoseCT((16, 16), pixel_size_mm=10.0, n_angles=8)
    with pytest.raises(BlindspotError, match="dose"):
        ct.simulate(torch.zeros(1, 1, 16, 16), (0.0,))
    rebuilt = LowDoseCT.from_physics_dict(ct.physics_dict(dose=0.25))
    assert rebuilt.projector.n_angles == 8 and rebuilt.i0 == ct.i0 and rebuilt.image_shape == (16, 16)
