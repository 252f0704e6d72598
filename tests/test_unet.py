"""The U-Net against fastMRI's parameter layout and an independent functional computation of fastMRI's forward pass."""

import pytest
import torch
import torch.nn.functional as F

from blindspot.errors import BlindspotError
from blindspot.models.checkpoint import load_checkpoint
from blindspot.models.registry import build_model, model_names
from blindspot.models.unet import InstanceNorm2d, Unet


def fastmri_state_dict(in_chans, out_chans, chans, pools, seed=0):
    """A state dict with fastMRI ``Unet``'s keys and shapes, written out from its documented layout."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {}
    ch_in, ch = in_chans, chans
    for i in range(pools):
        sd[f"down_sample_layers.{i}.layers.0.weight"] = w(ch, ch_in, 3, 3)
        sd[f"down_sample_layers.{i}.layers.4.weight"] = w(ch, ch, 3, 3)
        ch_in, ch = ch, ch * 2
    ch = ch_in  # deepest encoder width
    sd["conv.layers.0.weight"] = w(2 * ch, ch, 3, 3)
    sd["conv.layers.4.weight"] = w(2 * ch, 2 * ch, 3, 3)
    for i in range(pools):
        sd[f"up_transpose_conv.{i}.layers.0.weight"] = w(2 * ch, ch, 2, 2)  # ConvTranspose2d: (in, out, k, k)
        prefix = f"up_conv.{i}." + ("0." if i == pools - 1 else "")
        sd[prefix + "layers.0.weight"] = w(ch, 2 * ch, 3, 3)
        sd[prefix + "layers.4.weight"] = w(ch, ch, 3, 3)
        if i == pools - 1:
            sd[f"up_conv.{i}.1.weight"] = w(out_chans, ch, 1, 1)
            sd[f"up_conv.{i}.1.bias"] = w(out_chans)
        ch //= 2
    return sd


def functional_fastmri_unet(sd, x, pools):
    """fastMRI's forward pass written with torch.nn.functional only (instance norm without affine, eps 1e-5)."""

    def block(t, prefix):
        for k in (0, 4):
            t = F.conv2d(t, sd[f"{prefix}layers.{k}.weight"], padding=1)
            t = F.leaky_relu(F.instance_norm(t, eps=1e-5), 0.2)
        return t

    skips = []
    t = x
    for i in range(pools):
        t = block(t, f"down_sample_layers.{i}.")
        skips.append(t)
        t = F.avg_pool2d(t, 2)
    t = block(t, "conv.")
    for i in range(pools):
        t = F.conv_transpose2d(t, sd[f"up_transpose_conv.{i}.layers.0.weight"], stride=2)
        t = F.leaky_relu(F.instance_norm(t, eps=1e-5), 0.2)
        t = torch.cat([t, skips.pop()], dim=1)
        if i == pools - 1:
            t = block(t, f"up_conv.{i}.0.")
            t = F.conv2d(t, sd[f"up_conv.{i}.1.weight"], sd[f"up_conv.{i}.1.bias"])
        else:
            t = block(t, f"up_conv.{i}.")
    return t


@pytest.mark.parametrize("pools,chans", [(2, 4), (3, 4)])
def test_fastmri_state_dict_loads_strictly_and_reproduces_output(pools, chans):
    sd = fastmri_state_dict(1, 1, chans, pools)
    model = Unet(in_chans=1, out_chans=1, chans=chans, num_pool_layers=pools)
    assert set(model.state_dict()) == set(sd)
    assert all(model.state_dict()[k].shape == v.shape for k, v in sd.items())
    model.load_state_dict(sd, strict=True)
    model.eval()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
    ref = functional_fastmri_unet(sd, x, pools)
    assert ours.shape == (2, 1, 32, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_bare_fastmri_state_dict_file_loads_through_checkpoint(tmp_path):
    sd = fastmri_state_dict(1, 1, 4, 2, seed=3)
    path = tmp_path / "fastmri_unet.pt"
    torch.save(sd, path)
    ckpt = load_checkpoint(path, architecture="unet", hparams={"chans": 4, "num_pool_layers": 2})
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model.eval()(x), functional_fastmri_unet(sd, x, 2), rtol=1e-5, atol=1e-5)
    # fastMRI Lightning checkpoints nest the weights under "state_dict" with a "unet." prefix: not ours, clean error
    with pytest.raises(BlindspotError, match="unexpected keys"):
        torch.save({"state_dict": {"unet." + k: v for k, v in sd.items()}}, path)
        load_checkpoint(path, architecture="unet", hparams={"chans": 4, "num_pool_layers": 2})


def test_wrong_architecture_is_one_line_error_listing_keys(tmp_path):
    sd = fastmri_state_dict(1, 1, 4, 2)
    path = tmp_path / "weights.pt"
    torch.save(sd, path)
    with pytest.raises(BlindspotError) as info:
        load_checkpoint(path, architecture="unet", hparams={"chans": 4, "num_pool_layers": 3})
    msg = info.value.message
    assert "\n" not in msg and str(path) in msg
    assert "missing keys" in msg and "down_sample_layers.2.layers.0.weight" in msg
    assert "wrong shapes" in msg


@pytest.mark.parametrize("shape", [(32, 32), (30, 27), (17, 40)])
def test_any_size_and_multiple_of_size_is_untouched(shape):
    torch.manual_seed(0)
    model = Unet(chans=4, num_pool_layers=3).eval()
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_odd_size_equals_explicit_reflect_pad_then_crop():
    """With 2 pools (multiple 4) a 30×27 input is reflect-padded to 32×28 (rows 1+1, columns 0+1) and cropped back."""
    torch.manual_seed(0)
    model = Unet(chans=4, num_pool_layers=2).eval()
    x = torch.randn(1, 1, 30, 27)
    with torch.no_grad():
        y = model(x)
        padded = model(F.pad(x, (0, 1, 1, 1), mode="reflect"))
    torch.testing.assert_close(y, padded[..., 1:31, 0:27])


def test_registered_names_and_gradients():
    assert {"unet", "irim", "zero-filled"} <= set(model_names())
    model = build_model("unet", chans=4, num_pool_layers=2, drop_prob=0.1)
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(BlindspotError, match="bad hyper-parameters"):
        build_model("unet", chans=0)
    zf = build_model("zero-filled")
    assert torch.equal(zf(x), x) and len(zf.state_dict()) == 0


def test_instance_norm_is_torchs_instance_norm_forward_and_backward():
    """The U-Net's instance norm (a group norm with one group per channel) against ``F.instance_norm``: values and
    input gradients, a constant channel (variance 0: ``eps`` alone) and a channels-last input included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, 9, generator=g, dtype=torch.float64) * 4 + 2
    x[1, 2] = 7.0
    for t in (x, x.to(memory_format=torch.channels_last)):
        ours_in, ref_in = t.clone().requires_grad_(), t.clone().requires_grad_()
        ours, ref = InstanceNorm2d(5)(ours_in), F.instance_norm(ref_in, eps=1e-5)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
        w = torch.randn(ours.shape, generator=g, dtype=torch.float64)
        (ours * w).sum().backward()
        (ref * w).sum().backward()
        torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-9, atol=1e-9)
    assert not list(InstanceNorm2d(5).state_dict())
