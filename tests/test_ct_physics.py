"""CT physics: HU ↔ attenuation, windows, the parallel-beam projector against scikit-image, and the low-dose noise law."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from blindspot.errors import BlindspotError
from blindspot.physics import ct_cpu
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


@pytest.fixture(params=["compiled", "grid_sample"])
def kernel(request, monkeypatch):
    """Each back-projection kernel in turn: the CPU's compiled one, and the ``grid_sample`` tiles other devices use
    (forced here on the CPU)."""
    if request.param == "grid_sample":
        monkeypatch.setattr(ct_cpu, "available", lambda: False)
    elif not ct_cpu.available():
        pytest.skip("numba is not installed: the CPU uses the grid_sample kernel")
    return request.param


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


def _box_projection(img: np.ndarray, angles: np.ndarray, n_det: int) -> np.ndarray:
    """The box-footprint rule written out: pixel (y, x) at bin coordinate ``n_det//2 + x cos θ − y sin θ`` spread
    uniformly over a box of width ``max(|cos θ|, |sin θ|)`` bins; bin k covers ``[k − ½, k + ½]``. ``(A, n_det)``."""
    H, W = img.shape
    y, x = np.meshgrid(np.arange(H) - H // 2, np.arange(W) - W // 2, indexing="ij")
    k = np.arange(n_det)
    out = np.zeros((len(angles), n_det))
    for a, th in enumerate(angles):
        c, s = math.cos(th), math.sin(th)
        t = (n_det // 2 + x * c - y * s).reshape(-1, 1)
        w = max(abs(c), abs(s))
        overlap = np.clip(np.minimum(t + w / 2, k + 0.5) - np.maximum(t - w / 2, k - 0.5), 0.0, None) / w
        out[a] = img.reshape(1, -1) @ overlap
    return out


def _linear_backprojection(sino: np.ndarray, angles: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Back-projection written out: each view linearly interpolated (zero outside the detector) at every pixel
    centre's bin coordinate, scaled by π / (2 · n_angles). ``sino`` ``(A, n_det)`` → ``(H, W)``."""
    H, W = shape
    y, x = np.meshgrid(np.arange(H) - H // 2, np.arange(W) - W // 2, indexing="ij")
    bins = np.arange(-1, sino.shape[1] + 1)
    out = np.zeros(shape)
    for a, th in enumerate(angles):
        t = sino.shape[1] // 2 + x * math.cos(th) - y * math.sin(th)
        out += np.interp(t, bins, np.pad(sino[a], 1))
    return out * math.pi / (2 * len(angles))


@pytest.mark.parametrize(
    "shape,n_angles", [((12, 12), 13), ((11, 14), 13), ((16, 9), 13), ((12, 12), 12), ((9, 11), 12)]
)
def test_projector_and_backprojector_are_their_rules_to_float_precision(shape, n_angles, kernel):
    """Both rules written out view by view; odd and even sides and view counts (for small batches the back-projector
    pairs views θ and π − θ on a column range symmetric about the centre; with an even count, view 90° has no
    partner)."""
    rng = np.random.default_rng(1)
    img = rng.random(shape)
    p = ParallelBeamProjector(shape, n_angles=n_angles)
    angles = p.angles.numpy()
    ref = _box_projection(img, angles, p.n_det)
    sino = p.project(torch.tensor(img)[None, None])[0, 0].numpy()
    assert np.abs(sino - ref).max() < 1e-12 * np.abs(ref).max()
    sino32 = p.project(torch.tensor(img, dtype=torch.float32)[None, None])[0, 0].numpy()
    assert np.abs(sino32 - ref).max() < 1e-5 * np.abs(ref).max()
    q = rng.standard_normal(ref.shape)
    back = p.backproject(torch.tensor(q)[None, None])[0, 0].numpy()
    ref_back = _linear_backprojection(q, angles, shape)
    assert np.abs(back - ref_back).max() < 1e-12 * np.abs(ref_back).max()
    back32 = p.backproject(torch.tensor(q, dtype=torch.float32)[None, None])[0, 0].numpy()
    assert np.abs(back32 - ref_back).max() < 1e-5 * np.abs(ref_back).max()
    # a batch large enough that views are not paired goes the other way, to the same numbers
    qs = np.stack([q * k for k in range(1, 6)])
    backs = p.backproject(torch.tensor(qs)[:, None])[:, 0].numpy()
    assert np.abs(backs - np.stack([ref_back * k for k in range(1, 6)])).max() < 1e-12 * 5 * np.abs(ref_back).max()


def test_tiles_batches_and_devices_give_the_same_numbers(kernel):
    """Tiling (down to one line or row per tile) and batching change nothing (five images back-project view by view,
    three or fewer with mirror views paired); nor does a second call (caches)."""
    img = torch.rand(5, 1, 20, 17, dtype=torch.float64)
    whole = ParallelBeamProjector((20, 17), n_angles=19)
    tiny = ParallelBeamProjector((20, 17), n_angles=19, tile_values=1)
    sino = whole.project(img)
    assert torch.allclose(tiny.project(img), sino, rtol=0, atol=1e-13)
    assert torch.allclose(whole.project(img[1:2]), sino[1:2], rtol=0, atol=1e-13)
    assert torch.equal(whole.project(img), sino)
    rec = whole.fbp(sino)
    assert torch.allclose(tiny.fbp(sino), rec, rtol=0, atol=1e-13)
    assert torch.allclose(whole.fbp(sino[2:]), rec[2:], rtol=0, atol=1e-13)
    if torch.cuda.is_available():
        assert torch.allclose(whole.project(img.cuda()).cpu(), sino, atol=1e-10)
        assert torch.allclose(whole.fbp(sino.cuda()).cpu(), rec, atol=1e-10)


@pytest.mark.skipif(not ct_cpu.available(), reason="numba is not installed")
def test_compiled_kernels_are_the_grid_sample_ones_and_ignore_the_thread_count(monkeypatch):
    """The CPU kernels give the ``grid_sample`` kernels' numbers (float32, one image and a batch; odd sizes), and the
    same bits with one thread or three and for an image alone or in a batch (each output value has one writer and
    sums in a fixed order)."""
    torch.manual_seed(0)
    for shape, n_images in (((40, 40), 1), ((37, 30), 6)):
        p = ParallelBeamProjector(shape)
        img = torch.rand(n_images, 1, *shape)
        q = torch.randn(n_images, 1, p.n_angles, p.n_det)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = p.project(img), p.backproject(q)
            torch.set_num_threads(3)
            three = p.project(img), p.backproject(q)
        finally:
            torch.set_num_threads(threads)
        with monkeypatch.context() as m:
            m.setattr(ct_cpu, "available", lambda: False)
            reference = p.project(img), p.backproject(q)
        for a, b, ref in zip(one, three, reference):
            assert torch.equal(a, b)
            assert (a - ref).abs().max() < 1e-5 * ref.abs().max()
        alone = p.project(img[-1:]), p.backproject(q[-1:])
        assert torch.equal(alone[0], one[0][-1:]) and torch.equal(alone[1], one[1][-1:])


def test_projector_gradients_are_exact(kernel):
    """Both operators are linear, so gradcheck compares the backward pass with the operator's own columns."""
    p = ParallelBeamProjector((7, 6), n_angles=9, tile_values=64)
    img = torch.rand(2, 1, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(p.project, (img,))
    sino = torch.rand(2, 1, 9, p.n_det, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(p.fbp, (sino,))


def test_projector_memory_is_bounded():
    """What the projector keeps between calls is a grid workspace of about ``tile_values`` values at most plus
    per-view terms (a few values per view and image side), not one value per view and pixel as a cached system
    matrix would be; 22 MiB at 512×512 in float32."""
    for n, tile in ((64, 2**12), (96, 2**14)):
        p = ParallelBeamProjector((n, n), tile_values=tile)
        p.fbp(p.project(torch.rand(2, 1, n, n)))
        assert p.cache_nbytes < 0.25 * p.n_angles * n * n * 4


def test_bad_projector_input():
    p = ParallelBeamProjector((16, 16), n_angles=8)
    for bad in (torch.zeros(1, 16, 16), torch.zeros(1, 2, 16, 16), torch.zeros(1, 1, 16, 15)):
        with pytest.raises(BlindspotError, match="image"):
            p.project(bad)
    with pytest.raises(BlindspotError, match="floating"):
        p.project(torch.zeros(1, 1, 16, 16, dtype=torch.int64))
    with pytest.raises(BlindspotError, match="sinogram"):
        p.fbp(torch.zeros(1, 1, 8, p.n_det + 1))
    with pytest.raises(BlindspotError):
        ParallelBeamProjector((16, 16), tile_values=0)


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


def test_one_generator_per_image_gives_each_image_its_own_simulation():
    hu, _ = _disk_phantom(24)
    hu = torch.cat([hu, hu.flip(-1) * 0.5, hu.transpose(-2, -1)])
    ct = LowDoseCT((24, 24), pixel_size_mm=10.0, n_angles=30)
    seeds = (5, 6, 7)
    p = ct.line_integrals(hu)
    batched = ct.simulate(hu, (0.25, 1.0), [torch.Generator().manual_seed(s) for s in seeds], line_integrals=p)
    for i, s in enumerate(seeds):
        alone = ct.simulate(hu[i : i + 1], (0.25, 1.0), torch.Generator().manual_seed(s), line_integrals=p[i : i + 1])
        for d in (0.25, 1.0):
            assert torch.allclose(batched[d][i : i + 1], alone[d], rtol=0, atol=1e-3)  # HU; float32 FBP
    with pytest.raises(BlindspotError, match="generators"):
        ct.simulate(hu, (0.25,), generator=[torch.Generator()])


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


def test_seeded_ct_measurements_do_not_depend_on_the_batch():
    """``LowDoseCTScan.measure_seeded`` gives each image the measurement its own seed gives it alone (bit for bit),
    and a second call returns the cached one; ``measure`` with one generator per image agrees to float rounding."""
    from blindspot.physics.acquisition import LowDoseCTScan

    hu, _ = _disk_phantom(24)
    hu = torch.cat([hu, hu.flip(-1) * 0.5, hu.transpose(-2, -1)])
    ct = LowDoseCT((24, 24), pixel_size_mm=10.0, n_angles=30)
    scan = LowDoseCTScan(ct, 0.25, HUNormalization(0.0, 500.0))
    seeds = [11, 12, 13]
    first = scan.measure_seeded(hu[:2], seeds[:2])  # images 0, 1 now cached; 2 is simulated with them below
    both = scan.measure_seeded(hu, seeds)
    for i, seed in enumerate(seeds):
        alone = LowDoseCTScan(ct, 0.25, HUNormalization(0.0, 500.0)).measure(hu[i : i + 1],
                                                                           torch.Generator().manual_seed(seed))
        assert torch.equal(both.image[i : i + 1], alone.image) and torch.equal(both.noise[i : i + 1], alone.noise)
    assert torch.equal(both.image[:2], first.image) and torch.equal(both.noise[:2], first.noise)
    batched = scan.measure(hu, [torch.Generator().manual_seed(s) for s in seeds])
    if ct.projector.computes_images_alone(hu):  # the CPU kernels: the same bits in any batch
        assert torch.equal(batched.image, both.image) and torch.equal(batched.noise, both.noise)
    assert torch.allclose(batched.image, both.image, rtol=0, atol=1e-3)  # HU; float32 FBP
    assert torch.allclose(batched.noise, both.noise, rtol=0, atol=1e-3)
    assert both.noise.abs().mean() > 1.0  # there is noise to compare
    # an image given twice in one call (same seed) is simulated once and measured the same in both rows
    fresh = LowDoseCTScan(ct, 0.25, HUNormalization(0.0, 500.0))
    simulated = []
    measure = fresh.measure
    fresh.measure = lambda truth, gens: simulated.append(len(truth)) or measure(truth, gens)
    twice = fresh.measure_seeded(hu[[2, 2]], [13, 13])
    assert sum(simulated) == 1
    assert torch.equal(twice.image, both.image[[2, 2]]) and torch.equal(twice.noise, both.noise[[2, 2]])
