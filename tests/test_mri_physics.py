"""MRI physics against known answers: Parseval, inverse, mask statistics and seeding, under-sampling, normalisation."""

import numpy as np
import pytest
import torch

from blindspot.errors import BlindspotError
from blindspot.physics.mri import (
    CartesianUndersampling,
    EquispacedMaskFunc,
    RandomMaskFunc,
    center_crop,
    create_mask_func,
    fft2c,
    ifft2c,
    normalize,
    resample_mask,
)


def _complex(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))


@pytest.mark.parametrize("shape", [(2, 3, 32, 48), (5, 17, 9), (64, 64)])
def test_parseval_and_inverse(shape):
    x = _complex(shape).to(torch.complex128)
    k = fft2c(x)
    assert abs(float((k.abs() ** 2).sum() / (x.abs() ** 2).sum()) - 1) < 1e-5
    assert torch.allclose(ifft2c(k), x, atol=1e-10)


def test_fft2c_is_centred():
    x = torch.ones(1, 1, 16, 10)
    k = fft2c(x)
    peak = int(k.abs().flatten().argmax())
    assert divmod(peak, 10) == (8, 5)  # DC at (H // 2, W // 2)
    assert abs(float(k[0, 0, 8, 5].real) - (16 * 10) ** 0.5) < 1e-4  # orthonormal: sum / sqrt(N)


@pytest.mark.parametrize("cls", [RandomMaskFunc, EquispacedMaskFunc])
@pytest.mark.parametrize("accel, cf", [(4, 0.08), (8, 0.04), (6, 0.06)])
def test_mask_statistics(cls, accel, cf):
    width = 368
    fractions = []
    mf = cls([cf], [accel])
    num_low = round(width * cf)
    pad = (width - num_low + 1) // 2
    for seed in range(200):
        m = mf(width, seed=seed)
        assert m.mask.shape == (1, width) and m.mask.dtype == torch.float32
        assert bool((m.mask[0, pad : pad + num_low] == 1).all())  # centre always sampled
        assert m.num_low_frequencies == num_low
        fractions.append(m.sampled_fraction)
    # "within ±2% of 1/R" read as 2 percentage points: the mean over 200 seeds of a random mask still has a
    # standard error of ~0.1 points at 8x, so a 2%-relative bound would fail by chance on unlucky seed ranges.
    mean = float(np.mean(fractions))
    assert abs(mean - 1 / accel) <= 0.02
    # and the mean is unbiased: within 4 standard errors of 1/R (equispaced masks vary only by rounding)
    stderr = float(np.std(fractions)) / np.sqrt(len(fractions))
    assert abs(mean - 1 / accel) <= 4 * stderr + 1.5 / width


def test_mask_seeding():
    mf = create_mask_func("random", [4, 8])
    a = mf(368, seed="file1000001.h5")
    b = create_mask_func("random", [4, 8])(368, seed="file1000001.h5")
    c = mf(368, seed="file1000002.h5")
    assert torch.equal(a.mask, b.mask) and a.acceleration == b.acceleration
    assert not torch.equal(a.mask, c.mask)
    # a seeded call leaves the function's own generator untouched
    f1, f2 = RandomMaskFunc([0.08], [4], seed=3), RandomMaskFunc([0.08], [4], seed=3)
    f1(100, seed=7)
    assert torch.equal(f1(100).mask, f2(100).mask)


def test_several_settings_are_all_drawn():
    mf = create_mask_func("equispaced", [4, 8], [0.08, 0.04])
    drawn = {mf(320, seed=s).acceleration for s in range(40)}
    assert drawn == {4.0, 8.0}


def test_bad_mask_settings_are_user_errors():
    with pytest.raises(BlindspotError):
        RandomMaskFunc([0.08], [4, 8])
    with pytest.raises(BlindspotError):
        RandomMaskFunc([0.5], [4])
    with pytest.raises(BlindspotError):
        create_mask_func("spiral", [4])


def test_mask_functions_take_fastmris_argument_order():
    a = RandomMaskFunc([0.08], [4])  # as a fastMRI user writes it: centre fractions first
    b = RandomMaskFunc(accelerations=[4], center_fractions=[0.08])
    assert (a.center_fractions, a.accelerations) == (b.center_fractions, b.accelerations) == ([0.08], [4.0])
    assert torch.equal(a(64, seed="f.h5").mask, b(64, seed="f.h5").mask)
    assert torch.equal(a(64, seed="f.h5").mask, create_mask_func("random", [4], [0.08])(64, seed="f.h5").mask)
    with pytest.raises(BlindspotError) as info:  # blindspot's old order: a one-line error that says what to do
        EquispacedMaskFunc([4, 8], [0.08, 0.04])
    assert "fastMRI's order" in info.value.message and "\n" not in info.value.message


def fastmri_reference_mask(kind, center_fractions, accelerations, num_cols, fname):
    """fastMRI's ``RandomMaskFunc`` / ``EquispacedMaskFractionFunc`` as read from ``fastmri/data/subsample.py``:
    a RandomState seeded with the file name's character codes draws the setting index (``randint(n)``), then
    ``round(W·cf)`` central columns start at ``(W − n_low + 1) // 2``; random: ``uniform(size=W) < prob``;
    equispaced fraction: spacing ``R (n_low − W)/(n_low R − W)``, offset ``randint(0, round(spacing))``, columns
    ``around(arange(offset, W − 1, spacing))``."""
    rng = np.random.RandomState()
    rng.seed(tuple(map(ord, fname)))
    choice = rng.randint(len(center_fractions))
    cf, acc = center_fractions[choice], accelerations[choice]
    n_low = round(num_cols * cf)
    mask = np.zeros(num_cols, dtype=bool)
    pad = (num_cols - n_low + 1) // 2
    mask[pad : pad + n_low] = True
    if kind == "random":
        mask |= rng.uniform(size=num_cols) < (num_cols / acc - n_low) / (num_cols - n_low)
    else:
        spacing = acc * (n_low - num_cols) / (n_low * acc - num_cols)
        offset = rng.randint(0, high=round(spacing))
        mask[np.around(np.arange(offset, num_cols - 1, spacing)).astype(np.uint)] = True
    return np.flatnonzero(mask).tolist(), float(acc)


# (kind, width, centre fractions, accelerations, file name) → (sampled columns, drawn acceleration), worked out
# by hand from fastMRI's algorithm (fastmri_reference_mask) for small widths
FASTMRI_MASKS = [
    ("random", 32, [0.08, 0.04], [4, 8], "file1000001.h5", [2, 4, 9, 16, 19, 22, 24], 8.0),
    ("equispaced", 32, [0.08, 0.04], [4, 8], "file1000001.h5", [9, 16, 19, 30], 8.0),
    ("random", 32, [0.08, 0.04], [4, 8], "file1000002.h5", [3, 8, 13, 15, 16, 17, 20, 22], 4.0),
    ("equispaced", 32, [0.08, 0.04], [4, 8], "file1000002.h5", [4, 10, 15, 16, 17, 21, 27], 4.0),
]


@pytest.mark.parametrize("kind, width, cfs, accs, fname, columns, acc", FASTMRI_MASKS)
def test_masks_equal_fastmris_for_the_same_file_name(kind, width, cfs, accs, fname, columns, acc):
    cls = RandomMaskFunc if kind == "random" else EquispacedMaskFunc
    drawn = cls(cfs, accs)(width, seed=fname)
    assert np.flatnonzero(drawn.mask[0].numpy()).tolist() == columns and drawn.acceleration == acc
    assert fastmri_reference_mask(kind, cfs, accs, width, fname) == (columns, acc)
    for name in ("file_brain_AXT2_200_2000019.h5", "file1000031.h5", "x"):  # and at fastMRI's knee width
        for w in (40, 368):
            got = cls(cfs, accs)(w, seed=name)
            assert (np.flatnonzero(got.mask[0].numpy()).tolist(), got.acceleration) == \
                fastmri_reference_mask(kind, cfs, accs, w, name)


def test_undersampling_single_and_multicoil():
    g = torch.Generator().manual_seed(0)
    mask = RandomMaskFunc([0.08], [4])(48, seed=1).mask
    op = CartesianUndersampling(mask, crop=(24, 24))
    img = torch.rand(2, 1, 40, 48, generator=g)
    zf = op(img)
    assert zf.shape == (2, 1, 24, 24)
    expected = center_crop(ifft2c(fft2c(img) * mask), (24, 24)).abs()
    assert torch.allclose(zf, expected, atol=1e-6)
    coils = _complex((2, 4, 40, 48))
    masked, zf_mc = op.from_kspace(fft2c(coils))
    assert zf_mc.shape == (2, 1, 24, 24)
    rss = center_crop(ifft2c(masked), (24, 24)).abs().pow(2).sum(1, keepdim=True).sqrt()
    assert torch.allclose(zf_mc, rss, atol=1e-5)
    # a fully sampled mask is the identity on magnitude images
    assert torch.allclose(CartesianUndersampling(torch.ones(48))(img), img, atol=1e-5)


def test_undersampling_is_batched_per_item_and_differentiable():
    masks = [RandomMaskFunc([0.08], [4])(32, seed=s).mask for s in range(3)]
    op = CartesianUndersampling.from_masks(masks)
    img = torch.rand(3, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    out = op(img)
    for i in range(3):
        single = CartesianUndersampling(masks[i])(img[i : i + 1].detach())
        assert torch.allclose(out[i : i + 1].detach(), single.double(), atol=1e-5)
    assert torch.autograd.gradcheck(lambda y: CartesianUndersampling(masks[0])(y), (img[:1].detach().clone().requires_grad_(True) + 0.5,))


def test_null_space_part_is_invisible():
    mask = EquispacedMaskFunc([0.08], [4])(32, seed=0).mask
    op = CartesianUndersampling(mask)
    img = torch.rand(1, 1, 32, 32, dtype=torch.float64).to(torch.complex128)
    hidden = op.null_space_part(img)
    assert torch.allclose(op.apply_mask(fft2c(hidden)), torch.zeros_like(hidden), atol=1e-10)


def test_normalize_roundtrip_and_shared_stats():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=g) * 1e-4
    xn, stats = normalize(x)
    flat = xn.reshape(3, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(flat.std(1), torch.ones(3), atol=1e-4)
    assert torch.allclose(stats.invert(xn), x, atol=1e-9)
    target = x * 1.1
    assert torch.allclose(stats.apply(target), (target - stats.mean) / stats.std)
    assert float(stats.apply(x * 1e6).max()) == 6.0  # clamped
    assert torch.allclose(stats.repeat_interleave(2).mean[::2], stats.mean)


def test_resample_mask_nearest_frequency():
    mask = torch.zeros(1, 368)
    mask[0, 184] = 1  # DC only
    out = resample_mask(mask, 320)
    assert out.shape == (1, 320) and float(out.sum()) == 1 and float(out[0, 160]) == 1
    assert torch.equal(resample_mask(mask, 368), mask)


# ----------------------------------------------------------------------------------------------------------------
# 2-D (variable-density) masks
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian2d", "poisson2d"])
@pytest.mark.parametrize("accel,shape", [(4, (48, 40)), (8, (40, 56))])
def test_2d_masks_sample_one_over_r_with_a_full_centre(kind, accel, shape):
    H, W = shape
    fn = create_mask_func(kind, [accel])
    m = fn(W, seed="file1000.h5", height=H)
    assert m.mask.shape == (H, W) and m.two_dimensional and set(m.mask.unique().tolist()) <= {0.0, 1.0}
    # Gaussian: exactly round(HW/R) samples (weighted sampling without replacement); Poisson disc: within its 1 %
    # tolerance of the bisection on the disc radius (+ one sample)
    n, target = float(m.mask.sum()), round(H * W / accel)
    assert abs(n - target) <= (0 if kind == "gaussian2d" else 0.01 * target + 1)
    ch, cw = m.calibration
    assert (ch, cw) == (round(H * fn.center_fractions[0]), round(W * fn.center_fractions[0]))
    top, left = (H - ch + 1) // 2, (W - cw + 1) // 2
    assert bool((m.mask[top : top + ch, left : left + cw] == 1).all())  # calibration box fully sampled
    assert m.mask[H // 2, W // 2] == 1 and m.num_low_frequencies == cw
    # variable density: the inner quarter of k-space is sampled more densely than the rest
    inner = m.mask[H // 4 : 3 * H // 4, W // 4 : 3 * W // 4]
    outer_density = (m.mask.sum() - inner.sum()) / (H * W - inner.numel())
    assert float(inner.mean()) > 1.5 * float(outer_density)
    # seeding: same seed → same mask (also from a fresh function), another seed → another mask; fastMRI's string
    # seeding (the file name's character codes)
    again = create_mask_func(kind, [accel])(W, seed="file1000.h5", height=H)
    assert torch.equal(again.mask, m.mask)
    assert not torch.equal(fn(W, seed="file1001.h5", height=H).mask, m.mask)
    assert torch.equal(fn(W, seed=tuple(map(ord, "file1000.h5")), height=H).mask, m.mask)


def test_2d_masks_need_the_height_and_reject_bad_settings():
    with pytest.raises(BlindspotError, match="height"):
        create_mask_func("poisson2d", [4])(32, seed=0)
    with pytest.raises(BlindspotError, match="std"):
        from blindspot.physics.mri import Gaussian2DMaskFunc

        Gaussian2DMaskFunc([0.08], [4], std=0.0)
    with pytest.raises(BlindspotError, match="unknown mask type"):
        create_mask_func("poisson3d", [4])


def test_poisson_disc_is_the_sequential_greedy_selection():
    import math

    from blindspot.physics.mri import normalized_radius, poisson_disc

    H, W = 21, 17
    radius = 3.0 * normalized_radius(H, W)
    order = np.random.RandomState(3).permutation(H * W).reshape(H, W)
    kept, points = np.zeros((H, W), dtype=bool), []
    for idx in np.argsort(order.ravel()):  # the oracle: visit in order, keep unless a kept one is too close
        i, j = divmod(int(idx), W)
        if all(math.hypot(i - a, j - b) >= 0.5 * (radius[i, j] + radius[a, b]) for a, b in points):
            points.append((i, j))
            kept[i, j] = True
    assert np.array_equal(poisson_disc(radius, order), kept)
    # and the defining property: no two kept positions conflict
    pts = np.argwhere(kept)
    d = np.hypot(*(pts[:, None, :] - pts[None, :, :]).transpose(2, 0, 1))
    r = radius[kept]
    np.fill_diagonal(d, np.inf)
    assert bool((d >= 0.5 * (r[:, None] + r[None, :])).all())


def test_undersampling_with_a_2d_mask_is_the_2d_formula():
    from blindspot.physics.mri import masked_image, zero_filled

    H, W = 24, 20
    m = create_mask_func("gaussian2d", [4])(W, seed=5, height=H).mask
    x = _complex((2, 3, H, W), seed=1)
    expect = ifft2c(fft2c(x) * m)
    assert torch.allclose(masked_image(x, m), expect, atol=1e-5)
    assert torch.allclose(zero_filled(x, m), expect.abs(), atol=1e-5)
    op = CartesianUndersampling(m)
    assert torch.allclose(op(x[:, :1]), expect[:, :1].abs(), atol=1e-5)
    # resampling a 2-D mask onto another grid by nearest frequency keeps DC and the calibration box
    small = resample_mask(m, 10, 12)
    assert small.shape == (12, 10) and small[6, 5] == 1
