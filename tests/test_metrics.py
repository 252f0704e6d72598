"""Metrics against known answers: scikit-image's SSIM and PSNR, NMSE by hand, Wilson intervals."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from blindspot.metrics import VolumeMetrics, mean_std, nmse, psnr, ssim, wilson_interval


def _pair(seed, shape=(3, 1, 40, 52)):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g, dtype=torch.float64)
    target = torch.nn.functional.avg_pool2d(target, 3, 1, 1) * 5.0  # smooth, range ≈ 0..5
    pred = target + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    return pred, target


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssim_matches_scikit_image(dtype):
    pred, target = _pair(0)
    data_range = target.amax(dim=(1, 2, 3))
    ours = ssim(pred.to(dtype), target.to(dtype), data_range.to(dtype))
    for i in range(pred.shape[0]):
        ref = structural_similarity(target[i, 0].numpy(), pred[i, 0].numpy(), data_range=float(data_range[i]))
        assert abs(float(ours[i]) - ref) < 1e-4


def test_ssim_identity_and_gradient():
    _, target = _pair(1)
    assert torch.allclose(ssim(target, target, 5.0), torch.ones(3, dtype=torch.float64))
    pred = (target + 0.1).requires_grad_(True)
    (1 - ssim(pred, target, 5.0)).sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_psnr_and_nmse():
    pred, target = _pair(2)
    p = psnr(pred, target, 5.0)
    for i in range(3):
        ref = peak_signal_noise_ratio(target[i].numpy(), pred[i].numpy(), data_range=5.0)
        assert abs(float(p[i]) - ref) < 1e-8
        expected = float(((target[i] - pred[i]) ** 2).sum() / (target[i] ** 2).sum())
        assert abs(float(nmse(pred, target)[i]) - expected) < 1e-12


def test_volume_metrics_follow_fastmri():
    pred, target = _pair(3, (4, 1, 32, 32))
    m = VolumeMetrics()
    vmax = float(target[:2].max())
    m.update(pred[:2], target[:2], ["a", "a"], [0, 1], torch.tensor([vmax, vmax]))
    m.update(pred[2:], target[2:], ["b", "b"], [0, 1], torch.full((2,), float(target[2:].max())))
    vols = {v["fname"]: v for v in m.volumes()}
    gt, pr = target[:2, 0].numpy(), pred[:2, 0].numpy()
    assert abs(vols["a"]["nmse"] - np.linalg.norm(gt - pr) ** 2 / np.linalg.norm(gt) ** 2) < 1e-6
    assert abs(vols["a"]["psnr"] - peak_signal_noise_ratio(gt, pr, data_range=gt.max())) < 1e-4
    ref_ssim = np.mean([structural_similarity(gt[i], pr[i], data_range=gt.max()) for i in range(2)])
    assert abs(vols["a"]["ssim"] - ref_ssim) < 1e-4
    s = m.summary()
    assert s["ssim"]["n"] == 2 and s["ssim_slice"]["n"] == 4
    assert VolumeMetrics.from_rows(m.slice_rows + m.slice_rows[:1]).volumes() == m.volumes()


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)  # textbook: 0.490 .. 0.943
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)
