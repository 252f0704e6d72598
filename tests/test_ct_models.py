"""CT denoisers: output shapes, the Gaussian + RI known answer, checkpoint round trips."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from blindspot.models.checkpoint import load_checkpoint, save_checkpoint
from blindspot.models.gaussian_ri import GaussianRI
from blindspot.models.registry import build_model, model_names
from blindspot.models.wganvgg import WGANCritic
from blindspot.physics.ct import HUNormalization

CT_MODELS = ("cnn10", "redcnn", "wganvgg", "gaussian-ri")


@pytest.mark.parametrize("name", CT_MODELS)
@pytest.mark.parametrize("shape", [(32, 32), (33, 47)])
def test_output_shape(name, shape):
    assert name in model_names()
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_architectures_follow_the_papers():
    cnn = build_model("cnn10")
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.out_channels) for c in convs] == [((9, 9), 64), ((3, 3), 32), ((5, 5), 1)]
    red = build_model("redcnn")
    assert len(red.encoder) == 5 and len(red.decoder) == 5
    assert all(m.out_channels == 96 and m.kernel_size == (5, 5) for m in red.encoder)
    gen = build_model("wganvgg")
    convs = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and [c.out_channels for c in convs] == [32] * 7 + [1]
    critic = WGANCritic(input_size=32)
    assert critic(torch.randn(3, 1, 32, 32)).shape == (3, 1)
    with pytest.raises(ValueError):
        critic(torch.randn(1, 1, 40, 40))
    with pytest.raises(ValueError):
        red(torch.randn(1, 1, 16, 16))  # smaller than RED-CNN's 21×21 receptive field


def test_redcnn_is_identity_plus_residual():
    """With the decoder's last layer zeroed, RED-CNN returns its input exactly (the input shortcut)."""
    red = build_model("redcnn", chans=8)
    with torch.no_grad():
        red.decoder[4].weight.zero_()
        red.decoder[4].bias.zero_()
    x = torch.randn(1, 1, 30, 30)
    assert torch.equal(red(x), x)


@pytest.mark.parametrize("shape", [(64, 64), (45, 50), (100, 37)])
def test_gaussian_ri_is_exactly_zero_in_its_square_and_a_gaussian_elsewhere(shape):
    from scipy.ndimage import gaussian_filter

    model = GaussianRI(sigma=1.0, square=30)
    H, W = shape
    x = torch.randn(2, 1, H, W, dtype=torch.float64)
    y = model(x)
    inside = model.invariant_mask(H, W)
    assert int(inside.sum()) == min(30, H) * min(30, W)
    rows, cols = torch.nonzero(inside, as_tuple=True)
    assert int(rows.min()) == (H - 30) // 2 and int(cols.min()) == (W - 30) // 2
    assert torch.all(y[..., inside] == 0.0)
    ref = gaussian_filter(x[1, 0].numpy(), sigma=1.0, mode="reflect")
    assert np.abs(y[1, 0].numpy() - ref)[~inside.numpy()].max() < 1e-10
    # the invariance: anything inside the square leaves the output unchanged
    x2 = x.clone()
    x2[..., inside] += 100.0 * torch.randn_like(x2[..., inside])
    margin = torch.zeros(H, W, dtype=torch.bool)
    r0, c0 = (H - 30) // 2, (W - 30) // 2
    margin[max(0, r0 - 4) : r0 + 34, max(0, c0 - 4) : c0 + 34] = True
    assert torch.equal(model(x2)[..., ~margin], y[..., ~margin])
    assert torch.equal(model(x2)[..., inside], y[..., inside])
    assert GaussianRI(square=12).invariant_mask(64, 64).sum() == 144
    assert len(model.state_dict()) == 0


@pytest.mark.parametrize("name", ["cnn10", "redcnn", "wganvgg"])
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(1)
    hparams = {"chans": 8} if name != "cnn10" else {"chans1": 8, "chans2": 4}
    model = build_model(name, **hparams)
    norm = HUNormalization(-600.0, 450.0)
    path = save_checkpoint(tmp_path / "m.pt", model, name, hparams, physics={"modality": "ct", "dose": 0.25},
                           normalization=norm.as_dict())
    ck = load_checkpoint(path)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(ck.model(x), model(x))
    assert HUNormalization.from_dict(ck.normalization) == norm and ck.physics["dose"] == 0.25


def test_loaded_ct_denoisers_have_channels_last_weights_on_the_cpu():
    """``load_model`` gives the CT denoisers channels-last weights on the CPU (faster there) with the contiguous
    network's outputs to float rounding; the MRI U-Net, which the layout slows down, stays contiguous."""
    from blindspot.models.loading import load_model

    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    for name in ("cnn10", "redcnn", "wganvgg"):
        loaded = load_model(name).model
        conv = next(m for m in loaded.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        plain = copy.deepcopy(loaded).to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            assert torch.allclose(loaded(x), plain(x), rtol=0, atol=1e-5)
    unet = load_model("mri_unet").model
    assert all(p.is_contiguous() for p in unet.parameters())
