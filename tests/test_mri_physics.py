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
    mf = cls([accel], [cf])
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
    f1, f2 = RandomMaskFunc([4], [0.08], seed=3), RandomMaskFunc([4], [0.08], seed=3)
    f1(100, seed=7)
    assert torch.equal(f1(100).mask, f2(100).mask)


def test_several_settings_are_all_drawn():
    mf = create_mask_func("equispaced", [4, 8], [0.08, 0.04])
    drawn = {mf(320, seed=s).acceleration for s in range(40)}
    assert drawn == {4.0, 8.0}


def test_bad_mask_settings_are_user_errors():
    with pytest.raises(BlindspotError):
        RandomMaskFunc([4, 8], [0.08])
    with pytest.raises(BlindspotError):
        RandomMaskFunc([4], [0.5])
    with pytest.raises(BlindspotError):
        create_mask_func("spiral", [4])


def test_undersampling_single_and_multicoil():
    g = torch.Generator().manual_seed(0)
    mask = RandomMaskFunc([4], [0.08])(48, seed=1).mask
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
    masks = [RandomMaskFunc([4], [0.08])(32, seed=s).mask for s in range(3)]
    op = CartesianUndersampling.from_masks(masks)
    img = torch.rand(3, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    out = op(img)
    for i in range(3):
        single = CartesianUndersampling(masks[i])(img[i : i + 1].detach())
        assert torch.allclose(out[i : i + 1].detach(), single.double(), atol=1e-5)
    assert torch.autograd.gradcheck(lambda y: CartesianUndersampling(masks[0])(y), (img[:1].detach().clone().requires_grad_(True) + 0.5,))


def test_null_space_part_is_invisible():
    mask = EquispacedMaskFunc([4], [0.08])(32, seed=0).mask
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
