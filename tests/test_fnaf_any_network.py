"""FNAF written once against (acquisition, network): on CT denoisers, and on a user's own k-space network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_fnaf import Blur

from blindspot.attacks.features import FeatureSampler
from blindspot.attacks.fnaf import FnafObjective, Truths
from blindspot.attacks.search import GradientSearch, RandomSearch
from blindspot.data.ct_phantom import FOV_MM, ct_phantom
from blindspot.data.ldct import CTBatch
from blindspot.errors import BlindspotError
from blindspot.models.adapters import Network
from blindspot.physics.acquisition import CartesianMRI, LowDoseCTScan
from blindspot.physics.ct import HUNormalization, LowDoseCT
from blindspot.physics.mri import create_mask_func, ifft2c, rss

S = 64


def _ct_truths(n: int = 3) -> Truths:
    kinds = ("abdomen", "chest")
    hu = torch.stack([ct_phantom(kinds[i % 2], size=S, seed=i) for i in range(n)]).reshape(n, 1, S, S)
    return Truths(hu, [f"P{i}" for i in range(n)], list(range(n)))


def _ct_acq() -> LowDoseCTScan:
    return LowDoseCTScan(LowDoseCT((S, S), pixel_size_mm=FOV_MM / S, i0=1e5), 0.25, HUNormalization(-300.0, 500.0))


def _rs(intensity, criterion="recovery", n=8) -> RandomSearch:
    return RandomSearch(sampler=FeatureSampler("disc", intensity_range=intensity),
                        objective=FnafObjective(criterion=criterion), n_candidates=n)


LOW_CONTRAST = (0.03, 0.06)  # of the truth's dynamic range: ≈ 50–100 HU on these phantoms


def test_identity_denoiser_keeps_every_detectable_ct_feature():
    result = _rs(LOW_CONTRAST)(nn.Identity(), _ct_truths(), _ct_acq())
    ev = result.evaluation
    assert result.modality == "ct" and torch.allclose(result.acceleration, torch.full((3,), 4.0))
    assert bool(ev.accepted.all())  # the features are above the noise (d' ≥ 5) ...
    assert bool((ev.recovery > 0.8).all())  # ... and the identity passes them on (FBP's slight blur aside)
    assert not bool(result.success.any())


def test_heavy_blur_loses_small_ct_features():  # σ = 3 px
    result = _rs(LOW_CONTRAST)(Blur(3.0), _ct_truths(), _ct_acq())
    assert bool(result.evaluation.accepted.all())
    assert bool(result.success.all())
    assert bool((result.evaluation.recovery < 0.5).all())


def test_a_feature_far_below_the_ct_noise_fails_ip():
    result = _rs((0.001, 0.001))(Blur(3.0), _ct_truths(), _ct_acq())
    ev = result.evaluation
    assert bool((ev.ip_loss < 5.0).all()) and not bool(ev.accepted.any())
    assert not bool(result.success.any())  # lost, but not an attack: the noise, not the network, hides it
    assert result.ip_threshold == 5.0


def test_ct_noise_is_keyed_by_image_not_batch_and_real_pairs_are_used_as_observed():
    truths = _ct_truths(3)
    obj = FnafObjective()
    whole = obj.prepare(nn.Identity(), truths, _ct_acq(), seed=7)
    part = obj.prepare(nn.Identity(), truths.subset([2]), _ct_acq(), seed=7)
    assert torch.equal(whole.clean_input[2], part.clean_input[0])
    low = truths.image + 10.0
    batch = CTBatch(low, truths.image, truths.fname, truths.slice_num)
    ctx = obj.prepare(nn.Identity(), batch, _ct_acq())
    assert torch.allclose(ctx.measurement.image, low)


def test_gradient_search_runs_through_the_ct_physics():
    search = GradientSearch(sampler=FeatureSampler("disc", intensity_range=LOW_CONTRAST),
                            objective=FnafObjective(criterion="recovery"), steps=2, init_candidates=2)
    result = search(Blur(3.0), _ct_truths(2), _ct_acq())
    assert len(result) == 2 and int(result.gradients[0]) == 2 and torch.isfinite(result.evaluation.recovery).all()


class TinyKspaceNet(nn.Module):
    """A user's own k-space network (not registered), in fastMRI VarNet's calling convention: zero-filled coil images,
    RSS, then a small learned residual."""

    network_input = "kspace"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        image = rss(ifft2c(torch.view_as_complex(masked_kspace.contiguous())), dim=1)  # (B, 1, H, W)
        return (image + 0.01 * self.conv(image))[:, 0]


def _mri_truths(n: int = 2, size: int = 32) -> Truths:
    r = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    disc = torch.sigmoid(3 * (1 - ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (0.35 * size) ** 2))
    return Truths(disc.expand(n, 1, size, size).clone(), [f"vol{i}.h5" for i in range(n)], [0] * n)


@pytest.mark.parametrize("coils", [1, 4])
def test_a_users_kspace_network_is_attacked_through_the_python_api(coils):
    truths = _mri_truths()
    size = truths.image.shape[-1]
    sens = None
    if coils > 1:
        phase = torch.linspace(0, 3.0, coils).reshape(1, coils, 1, 1)
        sens = (torch.ones(1, coils, size, size) * torch.exp(1j * phase) / coils**0.5).to(torch.complex64)
    acq = CartesianMRI.from_mask_func(create_mask_func("random", [4]), size, truths.fname, sens_maps=sens)
    result = _rs((0.5, 1.0), criterion="seed", n=4)(TinyKspaceNet(), truths, acq)
    assert len(result) == 2 and result.modality == "mri"
    assert bool(result.evaluation.accepted.all()) and torch.isfinite(result.evaluation.attack_loss).all()
    # the same network and seed give the same records (determinism through the k-space path)
    again = _rs((0.5, 1.0), criterion="seed", n=4)(Network(TinyKspaceNet(), "kspace"), truths, acq)
    assert torch.equal(again.evaluation.attack_loss, result.evaluation.attack_loss)


def test_a_network_given_the_other_modality_is_a_one_line_error():
    with pytest.raises(BlindspotError, match="CT network"):
        _rs(LOW_CONTRAST)(Network(Blur(3.0), name="cnn10", modality="ct"), _mri_truths(), torch.ones(32))
    with pytest.raises(BlindspotError, match="needs an MRI acquisition"):
        _rs(LOW_CONTRAST)(TinyKspaceNet(), _ct_truths(1), _ct_acq())


class _NaNOut(nn.Module):
    """A damaged network: its output is NaN wherever the input is finite."""

    def forward(self, x):
        return x * float("nan")


@pytest.mark.parametrize("criterion", ["recovery", "seed"])
def test_a_network_with_non_finite_outputs_is_named_not_scored(criterion):
    with pytest.raises(BlindspotError, match="NaN or Inf"):
        _rs(LOW_CONTRAST, criterion=criterion, n=2)(Network(_NaNOut(), name="damaged", modality="ct"),
                                                    _ct_truths(2), _ct_acq())
