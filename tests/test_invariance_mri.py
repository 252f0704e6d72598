"""Invariances of MRI networks through the acquisition, for every convention (image, image + mask, k-space):
image-domain invariances of a user's own k-space network, and natural invariances (generator training and sampling)
on tiny knee phantoms, through the Python API (blindspot.runs.invariances) and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from blindspot.attacks.distances import BoundedMSE
from blindspot.attacks.invariance import InvarianceAttack, InvarianceConfig, MRITarget, mri_decomposition
from blindspot.attacks.natural import AcquisitionTarget, NaturalConfig
from blindspot.cli import main
from blindspot.models.adapters import Network
from blindspot.models.zero_filled import ZeroFilled
from blindspot.physics.acquisition import CartesianMRI
from blindspot.physics.mri import create_mask_func, ifft2c, rss
from blindspot.runs.images import DataOptions, MRIImageSet
from blindspot.runs.invariances import run_invariances, run_sample, run_train_generator

S = 32
#: A generator small enough for a CPU test (patches of 16 px, two scales).
TINY = dict(patch=16, batch_size=8, n_critic=2, scales=2, channels=8, z_channels=2, critic_channels=8, critic_depth=2,
            lr=2e-3)
PHANTOMS = DataOptions(phantoms=1, size=S, limit=4)  # 4 slices of one 32×32 knee phantom volume, 4x random masks


class ZeroFilledKspace(nn.Module):
    """A user's own k-space network (not registered), in fastMRI VarNet's convention: the RSS of the zero-filled coil
    images, nothing learned — so it sees exactly what the acquisition keeps."""

    network_input = "kspace"

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return rss(ifft2c(torch.view_as_complex(masked_kspace.contiguous())), dim=1)[:, 0]


class MaskBlind(nn.Module):
    """An image + mask network that ignores the mask (the identity on its normalised input)."""

    uses_mask = True

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x


def _smoother() -> nn.Module:
    """A fixed 5×5 Gaussian (σ = 1 px) blur: an image-convention 'reconstruction' blind to fine patterns."""
    t = torch.arange(-2.0, 3.0)
    k = torch.exp(-0.5 * t**2)
    conv = nn.Conv2d(1, 1, 5, padding=2, padding_mode="replicate", bias=False)
    with torch.no_grad():
        conv.weight.copy_((k[:, None] * k[None, :] / k.sum() ** 2).reshape(1, 1, 5, 5))
    return conv.eval()


def _truths(n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    disc = (((yy - S / 2) / (S / 3)) ** 2 + ((xx - S / 2) / (S / 4)) ** 2 < 1).float()
    return (disc + 0.1 * torch.rand(n, 1, S, S, generator=g)).clamp_min(0)


def _coils(n: int) -> torch.Tensor | None:
    """Spatially constant coil phases with Σ|S_c|² = 1 (so the null space is the mask's, coil by coil)."""
    if n == 1:
        return None
    phase = torch.linspace(0, 3.0, n).reshape(1, n, 1, 1)
    return (torch.ones(1, n, S, S) * torch.exp(1j * phase) / n**0.5).to(torch.complex64)


def _rows(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Image-domain invariances through the acquisition
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("coils", [1, 4])
def test_image_domain_invariance_of_a_users_kspace_network_is_the_mask_null_space(tmp_path, coils):
    """The known answer: a network that passes on what the acquisition keeps ignores exactly what the mask hides,
    so ≥ 99% of the energy of every invariance lies in the acquisition's null space — single- and multi-coil."""
    y = _truths()
    acq = CartesianMRI.from_mask_func(create_mask_func("random", [4]), S, ["a.h5", "b.h5"], sens_maps=_coils(coils))
    net = Network(ZeroFilledKspace(), "kspace", name="my-kspace-net", modality="mri")
    cfg = InvarianceConfig(alpha=0.01, iterations=200, lr=0.02, restarts=1, progress=False)
    result = run_invariances(net, tmp_path / "run", MRIImageSet.from_tensor(y, acq, keys=["a", "b"]), cfg, "mse",
                             figures=0)
    assert [r["key"] for r in result.rows] == ["a", "b"]
    assert all(r["null_energy_fraction"] >= 0.99 and r["mean_abs_change"] > 0.3 for r in result.rows), result.rows
    assert result.summary["convention"] == "kspace" and result.summary["units"] == "normalised"
    # the same seed gives the same invariances; a resumed folder has nothing left to do
    again = run_invariances(net, tmp_path / "again", MRIImageSet.from_tensor(y, acq, keys=["a", "b"]), cfg, "mse",
                            figures=0)
    with np.load(tmp_path / "run" / "arrays" / "a.npz") as p, np.load(tmp_path / "again" / "arrays" / "a.npz") as q:
        assert np.array_equal(p["x_inv"], q["x_inv"]) and p["mask"].shape == (S,)
    assert [r["mean_abs_change"] for r in again.rows] == [r["mean_abs_change"] for r in result.rows]
    resumed = run_invariances(net, tmp_path / "run", MRIImageSet.from_tensor(y, acq, keys=["a", "b"]), cfg, "mse",
                              figures=0, resume=True)
    assert len(resumed.rows) == 2


def test_every_convention_sees_the_same_pipeline_through_mri_target():
    """At the clean truth, the image, image + mask and k-space versions of the zero-filled reconstruction give the
    same output f(N(A(y))) (the k-space one is unclamped, so compare where |x| < 6)."""
    y = _truths()
    mask = create_mask_func("equispaced", [4])(S, seed=0).mask
    outs = [MRITarget(m, y, mask)(MRITarget(m, y, mask).x, torch.arange(2))
            for m in (ZeroFilled(), MaskBlind(), ZeroFilledKspace())]
    inside = outs[0].abs() < 5.9
    assert torch.allclose(outs[0], outs[1]) and torch.allclose(outs[0][inside], outs[2][inside], atol=1e-4)
    # and the k-space network's invariance, found by the attack itself, is the mask's null space
    target = MRITarget(Network(ZeroFilledKspace(), "kspace"), y, mask)
    res = InvarianceAttack(BoundedMSE(), config=InvarianceConfig(alpha=0.01, iterations=150, lr=0.02,
                                                                 progress=False))(target, target.x)
    assert (mri_decomposition(target, res)["null_energy_fraction"] >= 0.99).all()


# ----------------------------------------------------------------------------------------------------------------
# Natural invariances of MRI networks
# ----------------------------------------------------------------------------------------------------------------
def test_acquisition_target_realises_only_what_the_acquisition_keeps():
    """Whole-image natural invariances go through the acquisition: a change the mask hides realises to the clean
    input exactly; with every column sampled, the realised input is the generator's output itself."""
    y = _truths(1)
    net = Network(ZeroFilledKspace(), "kspace")
    cols = torch.zeros(S)
    cols[[0, 16, 15, 17, 14, 18, 4, 28, 9, 23]] = 1  # symmetric about the centre: real images stay real
    target = AcquisitionTarget(net, CartesianMRI(cols), y)
    x, items = target.images, torch.zeros(1, dtype=torch.long)
    assert torch.equal(target.realise(x, items), x)
    hidden = target.acquisition.null_space(torch.randn(1, 1, S, S, generator=torch.Generator().manual_seed(1)))
    assert hidden.imag.abs().max() < 1e-5
    moved = x + hidden.real / target.stats.std
    assert (moved - x).abs().mean() > 0.1 and torch.allclose(target.realise(moved, items), x, atol=1e-5)
    full = AcquisitionTarget(net, CartesianMRI(torch.ones(S)), y + 1.0)  # positive: the magnitude is the image
    g = full.images + 0.05 * torch.randn(1, 1, S, S, generator=torch.Generator().manual_seed(2))
    x_in, out = full(g, items)
    assert torch.allclose(x_in, g, atol=1e-4) and torch.allclose(out, g, atol=1e-4)


def test_natural_invariances_of_an_image_mri_network_on_phantoms(tmp_path):
    """Trained 120 steps on patches of the normalised zero-filled input of 32×32 knee phantoms, samples move the
    input by ≥ 0.3 (mean |x̃ − x|, normalised units) while the smoother's output moves by ≤ 20% of that (RMS ratio);
    the same seed draws the same samples."""
    net = Network(_smoother(), name="smoother", modality="mri")
    cfg = NaturalConfig(alpha=0.1, beta=1e-3, distance="mse", **TINY)
    trained = run_train_generator(net, tmp_path / "gen", PHANTOMS, cfg, steps=120, log_every=40,
                                  checkpoint_every=120, progress=False)
    assert trained.step == 120 and trained.target["whole_images"] is False and trained.target["acceleration"] == 4.0
    result = run_sample(tmp_path / "gen", tmp_path / "samples", net, PHANTOMS, samples=3, figures=1)
    rows = result.rows
    assert len(rows) == 4 and all(r["units"] == "normalised" for r in rows)
    assert all(r["mean_abs_change"] >= 0.3 and r["change_ratio"] <= 0.2 and r["sample_std"] > 0.05 for r in rows), rows
    assert len(list((tmp_path / "samples" / "figures").glob("*.png"))) == 1
    again = run_sample(tmp_path / "gen", tmp_path / "again", net, PHANTOMS, samples=3, figures=0)
    assert [r["mean_abs_change"] for r in again.rows] == [r["mean_abs_change"] for r in rows]


def test_natural_invariances_of_a_kspace_network_use_whole_measured_images(tmp_path):
    """A k-space network trains on whole images through the acquisition. The zero-filled k-space network passes on
    every change it is given, so its realised samples move its output exactly as much as its input (ratio 1)."""
    y = _truths(3)
    acq = CartesianMRI.from_mask_func(create_mask_func("random", [4]), S, ["a", "b", "c"])
    images = MRIImageSet.from_tensor(y, acq)
    net = Network(ZeroFilledKspace(), "kspace", name="kspace-zf", modality="mri")
    trained = run_train_generator(net, tmp_path / "gen", images, NaturalConfig(**TINY), steps=3, progress=False)
    assert trained.target["whole_images"] is True and trained.target["convention"] == "kspace"
    result = run_sample(tmp_path / "gen", tmp_path / "samples", net, images, samples=2, figures=0)
    assert result.summary["whole_images"] is True and len(result.rows) == 3
    for r in result.rows:
        assert r["mean_abs_change"] > 0 and r["change_ratio"] == pytest.approx(1.0, abs=1e-3)
        assert np.isfinite(r["critic_samples"])


def test_mri_natural_invariances_through_the_cli(tmp_path, capsys):
    """train-generator and sample on MRI networks from the command line: the zero-filled identity (patches; no
    invariance: ratio 1) and a tiny I-RIM checkpoint (mask convention: whole images through the acquisition)."""
    from blindspot.models.checkpoint import save_checkpoint
    from blindspot.models.registry import build_model

    hp = dict(n_steps=1, n_latent=4, hidden_channels=[4], dilations=[1], n_householder=1, head_channels=4)
    torch.manual_seed(0)
    irim = save_checkpoint(tmp_path / "irim.pt", build_model("irim", **hp), "irim", hp, physics={"modality": "mri"})
    small = ["--phantoms", "1", "--size", str(S), "--device", "cpu"]
    train = [*small, "--limit", "3", "--patch", "16", "--train-batch", "4", "--n-critic", "1", "--scales", "2",
             "--channels", "4", "--critic-channels", "4", "--steps", "2"]
    for model, name in (("zero-filled", "zf"), (str(irim), "irim")):
        gen, out = tmp_path / f"gen-{name}", tmp_path / f"samples-{name}"
        assert main(["invariances", "train-generator", "--model", model, *train, "--out", str(gen)]) == 0
        assert main(["invariances", "sample", "--generator", str(gen), "--phantoms", "1", "--limit", "2",
                     "--samples", "2", "--figures", "0", "--device", "cpu", "--out", str(out)]) == 0
        rows = _rows(out)
        assert len(rows) == 2 and all(np.isfinite(r["critic_samples"]) for r in rows)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["modality"] == "mri" and summary["whole_images"] is (name == "irim")
        with np.load(sorted((out / "arrays").glob("*.npz"))[0]) as a:
            assert a["samples"].shape == (2, S, S) and str(a["units"]) == "normalised"
        if name == "zf":
            assert all(r["change_ratio"] == pytest.approx(1.0, abs=1e-4) for r in rows)
    capsys.readouterr()
    # a generator trained against an MRI network cannot be sampled against a CT one
    assert main(["invariances", "sample", "--generator", str(tmp_path / "gen-zf"), "--model", "gaussian-ri",
                 *small, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "MRI network" in err and err.count("\n") == 1
