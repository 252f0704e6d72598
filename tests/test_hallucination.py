"""Null-space hallucination maps (blindspot.attacks.hallucination): known answers.

* a data-consistent network (identity on the measured part) has zero measured error;
* a network that adds a fixed pattern in unsampled columns shows it wholly — and exactly — in the null-space map;
* with coil maps (Σ|S|² = 1) the measured and unmeasured energies add up to the error's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blindspot.attacks.hallucination import hallucination_maps, split
from blindspot.errors import BlindspotError
from blindspot.physics.acquisition import Acquisition, CartesianMRI
from blindspot.physics.mri import fft2c, ifft2c

H = W = 32


def symmetric_mask(seed: int = 0, fraction: float = 0.35) -> torch.Tensor:
    """A column mask ``(W,)`` equal to its mirror (frequency f sampled iff −f is): a real image's measured and
    unmeasured parts are then real."""
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(W, generator=g) < fraction).float()
    mirror = torch.tensor([(W - j) % W for j in range(W)])
    m = torch.maximum(m, m[mirror])
    m[W // 2 - 2 : W // 2 + 3] = 1.0  # the centre
    return m


def unsampled_pattern(mask: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A real image ``(1, 1, H, W)`` whose k-space lies only on unsampled columns."""
    g = torch.Generator().manual_seed(seed)
    k = torch.complex(torch.randn(1, 1, H, W, generator=g), torch.randn(1, 1, H, W, generator=g))
    p = ifft2c(k * (1 - mask)).real  # real part: k-space on the columns and their mirrors, all unsampled
    assert (fft2c(p) * mask).abs().max() < 1e-5
    return p


class DataConsistent(nn.Module):
    """k-space network: ``F⁻¹(k + (1 − M) F(g))`` with ``g`` a blurred zero-filled image — identity on the range."""

    network_input = "kspace"

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        k = torch.view_as_complex(kspace.contiguous())[:, 0]  # (B, H, W), single coil
        m = mask[..., 0].float()[:, 0]  # (B, 1, W)
        guess = nn.functional.avg_pool2d(ifft2c(k).real[:, None], 3, 1, 1)[:, 0]
        return ifft2c(k + (1 - m) * fft2c(guess)).real


class AddsPattern(nn.Module):
    """Image network: its input plus a fixed pattern (normalised units)."""

    def __init__(self, pattern: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pattern", pattern)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pattern


def test_data_consistent_network_has_no_measured_error():
    mask = symmetric_mask()
    truth = 1.0 + torch.rand(3, 1, H, W, generator=torch.Generator().manual_seed(3))
    res = hallucination_maps(DataConsistent(), truth, CartesianMRI(mask))
    assert torch.all(res.measured_error < 1e-9)
    assert torch.all(res.null_error > 1e-4)  # the guess is not the truth: all of its error is unmeasured
    assert torch.allclose(res.measured_error + res.null_error, res.error, rtol=1e-4)
    assert torch.allclose(res.null_error_fraction, torch.ones(3, dtype=torch.float64), atol=1e-6)


def test_fixed_pattern_in_unsampled_columns_is_wholly_in_the_null_space_map():
    mask = symmetric_mask(seed=4)
    g = torch.Generator().manual_seed(5)
    # a positive truth inside the measured space: the zero-filled input is the truth itself, so the identity
    # network's error is the pattern alone
    k = torch.complex(torch.randn(2, 1, H, W, generator=g), torch.randn(2, 1, H, W, generator=g))
    truth = 10.0 + ifft2c(k * mask).real
    assert truth.min() > 0
    pattern = unsampled_pattern(mask)
    acq = CartesianMRI(mask, clamp=None)
    res = hallucination_maps(AddsPattern(pattern), truth, acq, return_maps=True)
    assert torch.all(res.measured_error < 1e-10)
    assert torch.allclose(res.null_error_fraction, torch.ones(2, dtype=torch.float64), atol=1e-6)
    # the map is |σ · pattern| (the network adds it in normalised units)
    _, stats = acq.network_input(acq.measure(truth))
    expected = (stats.std * pattern).abs()
    assert torch.allclose(res.maps["null_error"], expected, atol=1e-4 * float(expected.max()))
    assert float(res.maps["measured_error"].max()) < 1e-4 * float(expected.max())


def test_multicoil_energies_add_up_on_the_coil_grid():
    g = torch.Generator().manual_seed(7)
    maps = torch.complex(torch.rand(1, 4, H, W, generator=g) + 0.2, torch.randn(1, 4, H, W, generator=g))
    maps = maps / (maps.abs().square().sum(1, keepdim=True)).sqrt()  # Σ_c |S_c|² = 1
    acq = CartesianMRI(symmetric_mask(seed=8), sens_maps=maps.expand(2, -1, -1, -1))
    truth = torch.rand(2, 1, H, W, generator=g)
    res = hallucination_maps(nn.Identity(), truth, acq)
    assert torch.allclose(res.measured_error + res.null_error, res.error, rtol=1e-4)
    assert torch.all(res.output_null > 0) and torch.all(res.truth_null > 0)


def test_no_null_space_is_a_one_line_error():
    with pytest.raises(BlindspotError, match="no null space"):
        split(Acquisition(), torch.zeros(1, 1, 4, 4))
