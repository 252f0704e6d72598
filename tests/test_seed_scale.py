"""The seed's experiment at its own scale (issue 14 item 1): the default walk is the seed's evaluation walk, the
threshold is the seed's at 320×320, and at other sizes the feature keeps its pixels while the threshold scales with
the image area — so the same feature with the same local error is lost at every size exactly when it is at 320×320."""

from __future__ import annotations

import math

import torch
from torch import nn

from blindspot.attacks.features import (
    DEFAULT_SIZES, SEED_TRAINING_WALK_STEPS, SEED_WALK_STEPS, FeatureSampler, Features, Region, candidate_keys,
)
from blindspot.attacks.fnaf import FnafObjective
from blindspot.training.robust import RobustConfig


def _walks(size: int, n: int = 64) -> tuple[Features, torch.Tensor]:
    region = Region().masks(torch.zeros(1, 1, size, size))
    keys = candidate_keys(torch.tensor([12345], dtype=torch.int64), range(n))
    feats = FeatureSampler("walk").sample(keys, region, torch.ones(1))
    return feats, region


def test_the_default_walk_at_320_is_the_seeds_ten_steps_in_the_central_120():
    feats, _ = _walks(320)
    assert SEED_WALK_STEPS == 10 and DEFAULT_SIZES["walk"][0] == (10.0, 10.0)
    assert torch.equal(feats.size[:, 0], torch.full((64,), 10.0)) and feats.max_steps == 10
    values, support = feats.render((320, 320))
    pixels = support.flatten(1).sum(1)
    assert int(pixels.max()) <= 10 and int(pixels.min()) >= 1  # 10 steps; a walk may revisit a pixel
    assert bool((pixels < 10).any())  # ... and some do
    # started in the central 120×120 (rows and columns 100..219)
    assert bool(((feats.center >= 100) & (feats.center <= 219)).all())
    # intensities uniform in [0, range): the seed's [min, max] for an image whose minimum is 0
    v = values[support]
    assert float(v.min()) >= 0.0 and float(v.max()) < 1.0 and 0.3 < float(v.mean()) < 0.7
    assert FnafObjective().effective_loss_threshold((320, 320)) == 1e-3


def test_at_64_the_walk_keeps_its_pixels_and_the_threshold_scales_with_the_area():
    feats, region = _walks(64)
    assert torch.equal(feats.size[:, 0], torch.full((64,), 10.0))
    _, support = feats.render((64, 64))
    assert int(support.flatten(1).sum(1).max()) <= 10
    rows = region[0].any(1).nonzero().flatten()
    assert (int(rows.min()), int(rows.max())) == (20, 43)  # round(64 · 120/320) = 24 central rows
    thr = FnafObjective().effective_loss_threshold((64, 64))
    assert math.isclose(thr * 64 * 64, 1e-3 * 320 * 320)


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_the_same_feature_and_error_give_the_same_decision_at_64_and_320():
    """A 64×64 image tiled 5×5 into 320×320 has the same statistics; a Zero network, the same feature on one tile:
    the summed squared error in ``T`` is the same, so ``L_atk`` relative to each size's threshold is the same."""
    torch.manual_seed(0)
    small = torch.rand(1, 1, 64, 64) + 0.5
    large = small.repeat(1, 1, 5, 5)
    obj = FnafObjective(reference=False, normalization="clean")
    ratios = []
    for img in (small, large):
        size = img.shape[-1]
        ctx = obj.prepare(Zero(), img, torch.ones(size))  # fully sampled: the input is the truth
        walk = Features("walk", center=torch.tensor([[30.0, 33.0]]), size=torch.tensor([[10.0, 0.0]]),
                        angle=torch.zeros(1), intensity=torch.ones(1), seed=torch.tensor([77]), max_steps=10)
        values, support = walk.render((size, size))
        ev = obj.evaluate(Zero(), ctx, torch.zeros(1, dtype=torch.long), values, support)
        ratios.append(float(ev.attack_loss) / obj.effective_loss_threshold((size, size)))
    assert math.isclose(ratios[0], ratios[1], rel_tol=1e-3)  # (only the std's n − 1 differs)


def test_robust_training_draws_the_seeds_training_walks():
    assert SEED_TRAINING_WALK_STEPS == (10, 99)
    cfg = RobustConfig()
    sampler = cfg.sampler("walk")
    assert sampler.sizes[0] == (10.0, 99.0) and sampler.max_steps == 99
    region = Region().masks(torch.zeros(1, 1, 128, 128))
    feats = sampler.sample(candidate_keys(torch.tensor([5], dtype=torch.int64), range(400)), region, torch.ones(1))
    steps = feats.size[:, 0]
    assert float(steps.min()) >= 10 and float(steps.max()) <= 99 and float(steps.max()) > 90
    assert float(steps.min()) < 20
