"""The FNAF objective: known answers for identity, blur, zero and null-space cases; formulas checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blindspot.attacks.features import FeatureSampler
from blindspot.attacks.fnaf import FnafObjective, as_truths, attack_acquisition
from blindspot.attacks.search import RandomSearch
from blindspot.data.sample import KspaceTransform, collate_mri
from blindspot.errors import BlindspotError
from blindspot.physics.mri import CartesianUndersampling, create_mask_func, fft2c, normalize

S = 48


def phantoms(n: int, size: int = S) -> list[torch.Tensor]:
    """Smooth-edged ellipses with an inner disc, slightly different per image (values in [0, 1.5])."""
    r = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    out = []
    for i in range(n):
        c = size / 2 + (i % 5) - 2
        outer = torch.sigmoid(4 * (1 - ((yy - c) / (0.36 * size)) ** 2 - ((xx - size / 2) / (0.3 * size)) ** 2))
        inner = torch.sigmoid(3 * (1 - ((yy - c + 4) ** 2 + (xx - size / 2 - i % 3) ** 2) / (0.1 * size) ** 2))
        out.append(outer + 0.5 * inner)
    return out


def make_batch(images, mask_func=None, prefix="vol"):
    tf = KspaceTransform(mask_func)
    samples = [tf(fft2c(im.to(torch.complex64)), None, f"{prefix}{i}.h5", i) for i, im in enumerate(images)]
    return collate_mri(samples)


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class Blur(nn.Module):
    """A heavy Gaussian blur (σ in pixels): it keeps smooth anatomy and wipes out small features."""

    def __init__(self, sigma: float = 4.0):
        super().__init__()
        k = int(3 * sigma)
        t = torch.arange(-k, k + 1, dtype=torch.float32)
        g = torch.exp(-0.5 * (t / sigma) ** 2)
        self.register_buffer("kernel", (g / g.sum()).reshape(1, 1, 1, -1))
        self.pad = k

    def forward(self, x):
        x = F.conv2d(F.pad(x, (self.pad, self.pad, 0, 0), mode="replicate"), self.kernel)
        return F.conv2d(F.pad(x, (0, 0, self.pad, self.pad), mode="replicate"), self.kernel.transpose(-1, -2))


FULL = torch.ones(S)  # fully sampled: A(y) = y for a non-negative truth


def test_identity_with_full_sampling_keeps_every_feature():
    batch = make_batch(phantoms(8))
    search = RandomSearch(objective=FnafObjective(criterion="recovery"), n_candidates=6)
    res = search(Identity(), batch, FULL)
    ev = res.evaluation
    assert torch.allclose(ev.attack_loss, torch.zeros(8), atol=1e-9)
    assert torch.allclose(ev.baseline_loss, torch.zeros(8), atol=1e-9)  # no error of its own either
    assert torch.allclose(ev.recovery, torch.ones(8), atol=2e-3)  # float32 round-off of the FFTs
    assert bool(ev.accepted.all())  # the feature is in the (complete) measurements
    assert int(res.success.sum()) == 0  # attack rate 0


def test_heavy_blur_loses_the_features():
    batch = make_batch(phantoms(8))
    res = RandomSearch(objective=FnafObjective(criterion="recovery"), n_candidates=3)(Blur(4.0), batch, FULL)
    assert bool(res.evaluation.accepted.all())
    assert float(res.evaluation.recovery.max()) < 0.5
    assert float(res.success.float().mean()) == 1.0
    # also under the seed's criterion (whole-image MSE on T), for walks large enough that their erased energy reaches
    # the seed's threshold at this size (a seed-sized 10-pixel walk on these smooth phantoms does not: see
    # test_seed_scale.py)
    res = RandomSearch(FeatureSampler("walk", ((60, 100), (0, 0))), n_candidates=3)(Blur(4.0), batch, FULL)
    assert float(res.success.float().mean()) == 1.0


@pytest.mark.parametrize("normalization", ["clean", "perturbed"])
def test_zero_model_has_zero_recovery_and_the_loss_is_the_truth_energy_on_T(normalization):
    batch = make_batch(phantoms(3), create_mask_func("random", [4]))
    obj = FnafObjective(dilation=2, normalization=normalization)
    ctx = obj.prepare(Zero(), batch, create_mask_func("random", [4]))
    f = FeatureSampler("disc").sample(
        torch.tensor([[1], [2], [3]], dtype=torch.int64), ctx.region, ctx.dynamic_range
    )
    values, support = f.render(ctx.shape)
    ev = obj.evaluate(Zero(), ctx, torch.arange(3), values, support)
    # by hand: N(y') with the clean input's statistics, or with the perturbed input's own (the seed's)
    y_pert = ctx.target + values
    x_pert = CartesianUndersampling(ctx.acquisition.mask)(y_pert)
    x0 = CartesianUndersampling(ctx.acquisition.mask)(ctx.target)
    _, stats0 = normalize(x0)
    _, stats_p = normalize(x_pert)
    assert not torch.allclose(stats_p.mean, stats0.mean, rtol=1e-3)  # the discs do move the statistics
    ny = (stats0 if normalization == "clean" else stats_p).apply(y_pert)
    T = F.max_pool2d(support.float(), 5, 1, 2)
    assert torch.allclose(ev.attack_loss, (T * ny).square().mean((1, 2, 3)), rtol=1e-5)
    # a zero output is zero in the perturbed statistics' units; in the clean units it is (μ' − μ)/σ, whose kept
    # share of the feature is tiny but not exactly zero
    assert torch.allclose(ev.recovery, torch.zeros(3), atol=1e-6 if normalization == "clean" else 0.05)
    # without any feature the zero model's error on T is the clean truth's energy there
    assert torch.allclose(ev.baseline_loss, (T * ctx.stats.apply(ctx.target)).square().mean((1, 2, 3)), rtol=1e-5)
    ip = (stats0.apply(x_pert) - stats0.apply(x0)).square().mean((1, 2, 3))
    assert torch.allclose(ev.ip_loss, ip, rtol=1e-5)
    assert torch.equal(ev.accepted, ip > 1e-4)
    assert torch.equal(ev.lost_seed, ev.attack_loss >= 1e-3 * (320 * 320) / (S * S))


def test_the_seed_threshold_is_the_seeds_at_320_and_scales_with_the_image():
    obj = FnafObjective()
    assert obj.effective_loss_threshold((320, 320)) == 1e-3
    assert math.isclose(obj.effective_loss_threshold((160, 160)), 4e-3)
    assert FnafObjective(threshold_pixels=None).effective_loss_threshold((48, 48)) == 1e-3


def test_a_feature_in_the_masks_null_space_fails_ip():
    mask_func = create_mask_func("equispaced", [4])
    batch = make_batch(phantoms(2), mask_func)
    obj = FnafObjective()
    ctx = obj.prepare(Identity(), batch, mask_func)
    m = ctx.acquisition.mask[0, 0, 0]
    c = S // 2
    k = next(k for k in range(3, c) if m[c + k] == 0 and m[c - k] == 0)  # an unsampled ±k column pair
    rows = torch.arange(S, dtype=torch.float32).reshape(S, 1)
    cols = torch.arange(S, dtype=torch.float32).reshape(1, S)
    band = torch.exp(-0.5 * ((rows - 20) / 2.0) ** 2)  # localised in rows, any row profile is allowed
    invisible = 0.8 * band * torch.cos(2 * math.pi * k * cols / S)  # k-space only in columns c ± k
    assert float(CartesianUndersampling(m)(invisible.reshape(1, 1, S, S)).abs().max()) < 1e-5
    visible = torch.zeros(S, S)
    visible[18:23, 20:25] = 0.8
    feats = torch.stack([invisible, visible]).reshape(2, 1, S, S)
    support = feats.abs() > 1e-3
    idx = torch.tensor([0, 0])
    ev = obj.evaluate(Identity(), ctx, idx, feats, support)
    assert float(ev.ip_loss[0]) < 1e-10 and not bool(ev.accepted[0])
    assert float(ev.ip_loss[1]) > 1e-4 and bool(ev.accepted[1])
    # an attack needs IP: the invisible feature is never a success, however large its loss
    assert bool(ev.lost_seed[0]) and not bool(ev.success_seed[0])


def test_masks_are_drawn_for_the_truths_width_and_seeded_by_file_name():
    mf = create_mask_func("random", [8])
    batch = make_batch(phantoms(3), mf)
    truths = as_truths(batch)
    acq = attack_acquisition(truths, mf)
    masks, acc = acq.mask, acq.accelerations
    assert masks.shape == (3, 1, 1, S)
    for i, f in enumerate(batch.fname):
        assert torch.equal(masks[i].reshape(-1), mf(S, seed=f).mask.reshape(-1))
    assert torch.equal(acc, torch.full((3,), 8.0))
    # None → the batch's own masks; an explicit mask broadcasts over the batch
    own = attack_acquisition(truths, None).mask
    assert torch.equal(own.reshape(3, S), batch.mask.reshape(3, S))
    one = attack_acquisition(truths, torch.ones(S))
    assert one.mask.shape == (3, 1, 1, S) and torch.allclose(one.accelerations, torch.ones(3))
    with pytest.raises(BlindspotError):
        attack_acquisition(truths, torch.ones(S + 2))


def test_models_that_need_the_mask_receive_it():
    seen = {}

    class MaskUser(nn.Module):
        uses_mask = True

        def forward(self, x, mask):
            seen["mask"] = mask.shape
            return x

    batch = make_batch(phantoms(2))
    RandomSearch(n_candidates=3, chunk_size=4)(MaskUser(), batch, create_mask_func("random", [4]))
    assert seen["mask"][1:] == (1, 1, S) and seen["mask"][0] in (2, 4)


def test_the_model_mode_is_restored_and_bad_truths_are_user_errors():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Dropout(0.5))
    model.train()
    batch = make_batch(phantoms(2))
    a = RandomSearch(n_candidates=2)(model, batch, FULL)
    b = RandomSearch(n_candidates=2)(model, batch, FULL)
    assert model.training
    assert torch.equal(a.evaluation.attack_loss, b.evaluation.attack_loss)  # dropout was off during the attack
    bad = make_batch(phantoms(2))
    bad.target[1, 0, 3, 3] = float("nan")
    with pytest.raises(BlindspotError, match="vol1.h5:1"):
        RandomSearch(n_candidates=2)(model, bad, FULL)
    with pytest.raises(BlindspotError):
        FnafObjective(criterion="worst")


def test_recovery_criterion_ranks_by_lost_energy():
    batch = make_batch(phantoms(4), create_mask_func("random", [4]))
    mf = create_mask_func("random", [4])
    res = RandomSearch(objective=FnafObjective(criterion="recovery"), n_candidates=5)(Blur(2.0), batch, mf)
    assert torch.allclose(res.evaluation.score, 1 - res.evaluation.recovery)
    assert torch.equal(res.success, res.evaluation.accepted & (res.evaluation.recovery < 0.5))
    # without the reference pass, recovery is not computed and costs no query
    obj = FnafObjective(reference=False)
    res2 = RandomSearch(objective=obj, n_candidates=5)(Blur(2.0), batch, mf)
    assert bool(torch.isnan(res2.evaluation.recovery).all())
    assert int(res2.queries[0]) == 5 and int(res.queries[0]) == 6


@pytest.mark.parametrize("shape", [(48, 48), (37, 50), (33, 31)])
def test_the_fast_acquisition_equals_the_physics_operator(shape):
    from blindspot.physics.mri import fft2c, ifft2c, zero_filled

    def two_d(img, m):  # the definition: centred 2-D transforms
        return ifft2c(fft2c(img) * m).abs()

    h, w = shape
    torch.manual_seed(0)
    y = torch.rand(3, 1, h, w)
    masks = torch.stack([create_mask_func("random", [4]).__call__(w, seed=i).mask.reshape(1, 1, w) for i in range(3)])
    ref = two_d(y, masks)
    assert torch.allclose(CartesianUndersampling(masks)(y), ref, atol=1e-6 * float(ref.abs().max()))
    assert torch.allclose(zero_filled(y, masks), ref, atol=1e-6 * float(ref.abs().max()))
    # and its gradient
    a = y.clone().requires_grad_(True)
    b = y.clone().requires_grad_(True)
    (zero_filled(a, masks) * ref).sum().backward()
    (two_d(b, masks) * ref).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)
