"""Natural invariances: generator and critic shapes, WGAN-GP, patches, training on CPU, resume, sampling."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blindspot.attacks.natural import (
    ConditionalGenerator,
    NaturalConfig,
    NaturalInvarianceTrainer,
    PatchCritic,
    PatchSampler,
    evaluate_samples,
    load_generator,
    read_generator_checkpoint,
    sample_invariances,
    tiles,
    train_generator,
)
from blindspot.errors import BlindspotError
from blindspot.losses import gradient_penalty


def _smoother() -> nn.Module:
    """A fixed 5×5 Gaussian (σ = 1 px) blur: a stand-in denoiser blind to fine, high-frequency patterns."""
    t = torch.arange(-2.0, 3.0)
    k = torch.exp(-0.5 * t**2)
    k = (k[:, None] * k[None, :]) / k.sum() ** 2
    conv = nn.Conv2d(1, 1, 5, padding=2, padding_mode="replicate", bias=False)
    with torch.no_grad():
        conv.weight.copy_(k.reshape(1, 1, 5, 5))
    return conv.eval()


def _images(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = F.avg_pool2d(torch.randn(n, 1, size, size, generator=g), 5, 1, 2) * 3
    return smooth + 0.2 * torch.randn(n, 1, size, size, generator=g)  # "anatomy" + "low-dose noise"


SMALL = dict(patch=16, batch_size=8, n_critic=2, scales=2, channels=8, z_channels=2, critic_channels=8,
             critic_depth=2, lr=2e-3)


def test_generator_starts_at_identity_for_any_size():
    gen = ConditionalGenerator(scales=3, channels=8, z_channels=2)
    x = torch.randn(2, 1, 37, 45)
    z = gen.sample_z(2, 37, 45, torch.Generator().manual_seed(0))
    assert torch.equal(gen(x, z), x)  # last layer starts at zero: g = x before training
    with pytest.raises(ValueError):
        gen(x, z[:, :1])


def test_critic_scores_and_gradient_penalty_known_answer():
    critic = PatchCritic(channels=4, depth=2)
    assert critic(torch.randn(3, 1, 16, 16)).shape == (3,)
    # a linear critic C(x) = <w, x>: its gradient is w everywhere, so the penalty is (‖w‖ − 1)²

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.full((1, 1, 4, 4), 0.5))

        def forward(self, x):
            return (x * self.w).sum(dim=(1, 2, 3))

    lin = Linear()
    real, fake = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    gp = gradient_penalty(lin, real, fake, torch.rand(5, 1, 1, 1))
    assert float(gp.detach()) == pytest.approx((2.0 - 1.0) ** 2)  # ‖w‖ = 0.5·4 = 2


def test_patch_sampler_returns_true_crops():
    N, H, W = 3, 20, 24
    rows = torch.arange(H).reshape(1, 1, H, 1).float()
    cols = torch.arange(W).reshape(1, 1, 1, W).float()
    imgs = torch.arange(N).reshape(N, 1, 1, 1).float() * 10000 + rows * 100 + cols
    sampler = PatchSampler(imgs, 8)
    p = sampler(16, torch.Generator().manual_seed(0))
    assert p.shape == (16, 1, 8, 8)
    n, top, left = (p[:, 0, 0, 0] // 10000).long(), ((p[:, 0, 0, 0] % 10000) // 100).long(), (p[:, 0, 0, 0] % 100).long()
    for i in range(16):
        assert torch.equal(p[i, 0], imgs[n[i], 0, top[i] : top[i] + 8, left[i] : left[i] + 8])
    weighted = PatchSampler(imgs, 8, weights=torch.tensor([0.0, 1.0, 0.0]))(32, torch.Generator().manual_seed(1))
    assert ((weighted[:, 0, 0, 0] // 10000) == 1).all()
    with pytest.raises(BlindspotError):
        PatchSampler(imgs, 40)


def test_generator_learns_invariances_of_a_smoother(tmp_path):
    """Trained for 120 steps on CPU, samples move x by ≥ 0.25 (mean |g − x|, normalised units; x has std ≈ 0.6)
    while the smoother's output moves by at most 15% of that (RMS output change / RMS input change ≤ 0.15)."""
    model = _smoother()
    x = _images()
    cfg = NaturalConfig(alpha=0.1, beta=1e-3, distance="mse", **SMALL)
    trainer = train_generator(model, x, tmp_path, steps=120, config=cfg, progress=False, log_every=20,
                              checkpoint_every=60)
    assert (tmp_path / "generator.pt").is_file() and (tmp_path / "train_log.jsonl").is_file()
    gen, critic, meta = load_generator(tmp_path / "generator.pt")
    assert meta["step"] == 120
    samples = sample_invariances(gen, x[:3], 4, seed=[0, 1, 2])
    assert samples.shape == (3, 4, 1, 32, 32)
    m = evaluate_samples(model, x[:3], samples, critic, patch=16)
    assert (m["mean_abs_change"] >= 0.25).all(), m
    assert (m["change_ratio"] <= 0.15).all(), m
    assert (m["sample_std"] > 0.05).all()  # different z, different invariances
    for k in ("critic_real", "critic_samples", "critic_noise"):
        assert torch.isfinite(m[k]).all()
    # per-image seeds: an image's samples do not depend on the batch it is drawn in
    alone = sample_invariances(gen, x[1:2], 4, seed=[1])
    assert torch.allclose(alone[0], samples[1], atol=1e-6)
    assert trainer.step == 120


def test_resume_continues_bit_for_bit(tmp_path):
    model, x = _smoother(), _images(n=4)
    cfg = NaturalConfig(**SMALL)
    straight = NaturalInvarianceTrainer(model, x, cfg, checkpoint=tmp_path / "a" / "generator.pt")
    straight.train(6, checkpoint_every=100, progress=False)
    first = NaturalInvarianceTrainer(model, x, cfg, checkpoint=tmp_path / "b" / "generator.pt")
    first.train(3, checkpoint_every=3, progress=False)
    resumed = NaturalInvarianceTrainer(model, x, cfg, checkpoint=tmp_path / "b" / "generator.pt")
    assert resumed.step == 3
    resumed.train(6, checkpoint_every=3, progress=False)
    for k, v in straight.generator.state_dict().items():
        assert torch.equal(v, resumed.generator.state_dict()[k]), k
    for k, v in straight.critic.state_dict().items():
        assert torch.equal(v, resumed.critic.state_dict()[k]), k
    # a resume with other settings is refused
    with pytest.raises(BlindspotError):
        NaturalInvarianceTrainer(model, x, NaturalConfig(**{**SMALL, "channels": 4}), checkpoint=tmp_path / "b" / "generator.pt")


def test_rms_reward_moves_a_generator_that_starts_at_identity():
    """At g = x a squared distance has no gradient; the bounded RMS (the default D) has one of unit size."""
    from blindspot.attacks.distances import BoundedMSE, BoundedRMS

    x = torch.randn(2, 1, 8, 8)
    g = x.clone().requires_grad_(True)
    BoundedMSE()(g, x).sum().backward()
    assert g.grad.abs().max() == 0
    d = 1e-4 * torch.randn_like(x)
    g2 = (x + d).requires_grad_(True)
    BoundedRMS()(g2, x).sum().backward()
    per_image = g2.grad.flatten(1).norm(dim=1)
    assert torch.allclose(per_image, torch.full((2,), 1 / 8.0), rtol=1e-3)  # ‖∇ RMS‖ = 1/√N, N = 64


def test_checkpoint_is_weights_only_and_bad_files_are_clean_errors(tmp_path):
    model, x = _smoother(), _images(n=2)
    tr = NaturalInvarianceTrainer(model, x, NaturalConfig(**SMALL))
    path = tr.save(tmp_path / "g.pt")
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "blindspot-invariance-generator" and obj["step"] == 0
    assert read_generator_checkpoint(path)["generator"]["hparams"]["channels"] == 8
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BlindspotError):
        load_generator(bad)
    other = tmp_path / "other.pt"
    torch.save({"format": "blindspot-checkpoint"}, other)
    with pytest.raises(BlindspotError):
        load_generator(other)
    with pytest.raises(BlindspotError):
        load_generator(tmp_path / "missing.pt")


def test_tiles_cover_the_image():
    x = torch.arange(2 * 32 * 48).reshape(2, 1, 32, 48).float()
    t = tiles(x, 16)
    assert t.shape == (2 * 2 * 3, 1, 16, 16)
    assert torch.equal(t[1, 0], x[0, 0, :16, 16:32])
