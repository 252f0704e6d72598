"""Measurement attacks (blindspot.attacks.measurement): ℓ2 worst case against random noise, false positives.

Known answers: on a linear pipeline the worst-case gain is the operator norm and random noise gets its average; on a
fully sampled identity pipeline the false-positive appearance within a budget has a closed form; on a trained U-Net
the PGD worst case beats random noise of the same norm by a clear margin.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from blindspot.attacks.features import FeatureSampler, Region
from blindspot.attacks.fnaf import Truths
from blindspot.attacks.measurement import FalsePositiveAttack, WorstCasePGD
from blindspot.cli import main
from blindspot.errors import BlindspotError
from blindspot.models.loading import load_model
from blindspot.physics.acquisition import CartesianMRI, LowDoseCTScan
from blindspot.physics.ct import HUNormalization, LowDoseCT
from blindspot.physics.mri import ifft2c
from blindspot.runs.audit import bundled_models
from blindspot.runs.fnaf import mri_settings, phantom_geometry_of

H = W = 32


class ScaledZeroFilled(nn.Module):
    """Linear k-space network ``gain · Re(F⁻¹ k)``: its worst-case gain is ``gain`` (perturbations whose zero-filled
    image is real), a random complex perturbation's is ``gain / √2`` on average (half its energy is imaginary)."""

    network_input = "kspace"

    def __init__(self, gain: float = 3.0) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.gain * ifft2c(torch.view_as_complex(kspace.contiguous())[:, 0]).real


def truths(n: int = 2, seed: int = 0) -> torch.Tensor:
    return 1.0 + torch.rand(n, 1, H, W, generator=torch.Generator().manual_seed(seed))


def test_linear_pipeline_worst_case_gain_is_the_operator_norm():
    mask = torch.zeros(W)
    mask[::2] = 1.0
    mask[W // 2 - 2 : W // 2 + 2] = 1.0
    attack = WorstCasePGD(budgets=(0.01, 0.05), steps=20, random_draws=16, keep_perturbations=True)
    res = attack(ScaledZeroFilled(3.0), truths(), CartesianMRI(mask))
    for r in res.rows:
        assert r["norm"] <= r["budget"] * (1 + 1e-5)  # inside the ball
        assert 2.9 < r["gain_pgd"] <= 3.0 + 1e-4
        assert abs(r["gain_random"] - 3.0 / math.sqrt(2)) < 0.15
        assert r["error_pgd"] > r["error_random_max"]
    # the perturbation lives on the sampled k-space entries only
    unsampled = res.perturbations * (1 - mask)
    assert float(unsampled.abs().max()) == 0.0


def test_results_do_not_depend_on_the_batch():
    # every random draw is keyed by (seed, image, acceleration): an image gets the same records alone or in a batch
    mask = torch.zeros(W)
    mask[::3] = 1.0
    mask[W // 2 - 2 : W // 2 + 2] = 1.0
    net, acq = ScaledZeroFilled(2.0), CartesianMRI(mask)
    batch = Truths(truths(3, seed=4), ["a.h5", "b.h5", "c.h5"], [0, 1, 2])
    attack = WorstCasePGD(budgets=(0.01, 0.02), steps=3, random_draws=2, chunk_size=4)
    every = attack(net, batch, acq).rows
    alone = attack(net, batch.subset([2]), acq).rows
    assert [r["key"] for r in alone] == ["c.h5:2"] * 2
    for a, b in zip(alone, every[4:]):  # the same draws; floats equal up to batched-arithmetic rounding
        for k, v in a.items():
            assert v == (pytest.approx(b[k], rel=1e-4, abs=1e-7) if isinstance(v, float) else b[k])
    fp = FalsePositiveAttack(budgets=(0.01, 0.05), steps=2)
    assert fp(net, batch, acq).rows[4:] == fp(net, batch.subset([2]), acq).rows


def test_false_positive_budget_has_the_closed_form_answer():
    # fully sampled identity pipeline: the best change of norm r towards a feature φ (support inside T) is r·φ/‖φ‖,
    # whose appearance is 1 − (1 − r/‖φ‖)²; the honest budget is ‖φ‖ / ‖y‖ and the honest appearance 1
    net, acq, y = ScaledZeroFilled(1.0), CartesianMRI(torch.ones(W)), truths(1, seed=2)
    sampler = FeatureSampler("disc", size_range=((3.0, 3.0), (3.0, 3.0)), intensity_range=(0.5, 0.5))
    probe = FalsePositiveAttack(sampler=sampler, region=Region(), budgets=(1.0,), steps=1)(net, y, acq)
    honest = probe.rows[0]["honest_budget"]
    assert probe.rows[0]["honest_appearance"] == pytest.approx(1.0, abs=1e-5)
    fractions = (0.25, 0.5)
    attack = FalsePositiveAttack(sampler=sampler, budgets=tuple(f * honest for f in fractions), steps=15)
    rows = attack(net, y, acq).rows
    for f, r in zip(fractions, rows):
        assert r["appearance"] == pytest.approx(1 - (1 - f) ** 2, abs=0.02)
    assert [r["success"] for r in rows] == [False, True]


def test_pgd_worst_case_beats_random_noise_on_a_trained_unet():
    torch.manual_seed(0)
    name, path = bundled_models("mri")[0]
    model = load_model(path, "cpu", name=name, warn=False)
    (setting,) = mri_settings(None, [4.0], crop=(64, 64), volumes=1, slices=2, seed=100,
                              **phantom_geometry_of(model))
    batch = setting.materialised(2).batch_list[0]
    res = WorstCasePGD(budgets=(0.02,), steps=5, random_draws=3)(model.network, batch, setting.physics)
    for r in res.rows:
        assert r["error_pgd"] > r["error_random_max"]
        assert r["change_pgd"] > 2.0 * r["change_random"]  # a clear margin (measured: about 4x)
        assert r["gain_pgd"] > 1.5  # the trained network amplifies its worst measurement change


def test_ct_perturbation_is_in_the_low_dose_input_within_its_noise_level():
    # an identity "denoiser" passes an input change through unchanged: gain 1 for PGD and random alike, and the
    # error grows with the budget; budgets are relative to the input noise's norm
    acq = LowDoseCTScan(LowDoseCT((32, 32), pixel_size_mm=4.0, i0=1e5), 0.25, HUNormalization(-500.0, 500.0))
    r = torch.arange(32.0)
    disc = ((r[:, None] - 15.5) ** 2 + (r[None, :] - 15.5) ** 2 < 12.0**2).float()
    y = (disc * 1000.0 - 1000.0).reshape(1, 1, 32, 32)
    res = WorstCasePGD(budgets=(0.5, 1.0), steps=3, random_draws=2)(nn.Identity(), y, acq)
    for row in res.rows:
        assert row["error_unit"].startswith("HU")
        assert row["gain_pgd"] == pytest.approx(1.0, abs=1e-3) and row["gain_random"] == pytest.approx(1.0, abs=1e-3)
        assert row["norm"] <= row["budget"] * (1 + 1e-5)
    assert res.rows[1]["error_pgd"] > res.rows[0]["error_pgd"] > res.rows[0]["error_clean"]


def test_bad_budgets_are_one_line_errors(capsys):
    with pytest.raises(BlindspotError, match="budgets"):
        WorstCasePGD(budgets=(-0.1,))
    with pytest.raises(BlindspotError, match="normalisation"):
        FalsePositiveAttack(normalization="other")
    assert main(["false-positive", "--model", "unet", "--names", "a", "b", "--out", "/tmp/never-written"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blindspot: error:") and "--names" in err
    assert len(err.strip().splitlines()) == 1
