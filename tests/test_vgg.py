"""VGG16 features: torchvision's layer layout, loading torchvision-format state dicts offline, clear errors."""

from __future__ import annotations

import pytest
import torch

from blindspot.errors import BlindspotError
from blindspot.models.vgg import (
    LAYER_NAMES,
    TORCHVISION_VGG16_FILE,
    PerceptualLoss,
    VGG16Features,
    default_vgg16_path,
    imagenet_input,
    load_vgg16,
    load_vgg16_features,
    write_seeded_vgg16,
)

# torchvision.models.vgg16().features: convolution indices and (in, out) channels
TORCHVISION_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
                     14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
                     28: (512, 512)}
TORCHVISION_POOLS = (4, 9, 16, 23, 30)


def _torchvision_state_dict(seed: int = 0) -> dict:
    """What ``torchvision.models.vgg16().state_dict()`` holds: features.* plus the classifier (tiny here; ignored)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (cin, cout) in TORCHVISION_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.05
        sd[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    for i in (0, 3, 6):
        sd[f"classifier.{i}.weight"] = torch.zeros(2, 2)
        sd[f"classifier.{i}.bias"] = torch.zeros(2)
    return sd


def test_layer_layout_is_torchvision():
    m = VGG16Features()
    assert len(m.features) == 31 and len(LAYER_NAMES) == 31
    for i, layer in enumerate(m.features):
        if i in TORCHVISION_CONVS:
            assert isinstance(layer, torch.nn.Conv2d)
            assert (layer.in_channels, layer.out_channels) == TORCHVISION_CONVS[i]
        elif i in TORCHVISION_POOLS:
            assert isinstance(layer, torch.nn.MaxPool2d)
        else:
            assert isinstance(layer, torch.nn.ReLU)
    assert LAYER_NAMES[29] == "relu5_3" and LAYER_NAMES[15] == "relu3_3" and LAYER_NAMES[30] == "pool5"


def test_loads_a_torchvision_state_dict(tmp_path):
    sd = _torchvision_state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)
    model, info = load_vgg16(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    assert not info.imagenet and len(info.sha256) == 64
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    feats = load_vgg16_features(path)
    assert isinstance(feats, torch.nn.Sequential) and len(feats) == 31
    x = imagenet_input(torch.rand(2, 1, 32, 32))
    a, b = model(x, ("relu1_2", "relu3_3"))
    assert a.shape == (2, 64, 32, 32) and b.shape == (2, 256, 8, 8)
    # the same computation through the bare Sequential, layer by layer
    h = x
    for i in range(16):
        h = feats[i](h)
    assert torch.allclose(h, b)
    # a features-only dict with keys lacking the "features." prefix loads too
    torch.save({k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}, tmp_path / "bare.pth")
    assert torch.equal(load_vgg16(tmp_path / "bare.pth")[0].features[0].weight, sd["features.0.weight"])


def test_hub_cache_and_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert default_vgg16_path() == tmp_path / "torch" / "hub" / "checkpoints" / TORCHVISION_VGG16_FILE
    with pytest.raises(BlindspotError) as info:
        load_vgg16()
    assert "--vgg-weights" in info.value.problem and "nothing is downloaded" in info.value.problem
    write_seeded_vgg16(default_vgg16_path(), seed=0)
    model, info_ = load_vgg16()
    assert info_.path == str(default_vgg16_path()) and not info_.imagenet  # a seeded file is never "ImageNet"


def test_bad_weight_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BlindspotError) as info:
        load_vgg16(bad)
    assert info.value.source == str(bad)
    sd = _torchvision_state_dict()
    sd["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    torch.save(sd, tmp_path / "gray.pth")
    with pytest.raises(BlindspotError, match="wrong shapes features.0.weight"):
        load_vgg16(tmp_path / "gray.pth")
    del sd["features.28.bias"]
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(BlindspotError, match="missing features.28.bias"):
        load_vgg16(tmp_path / "short.pth")
    with pytest.raises(BlindspotError):
        load_vgg16(tmp_path / "nope.pth")


def test_seeded_weights_are_reproducible_and_perceptual_loss(tmp_path):
    a, b = write_seeded_vgg16(tmp_path / "a.pth", 7), write_seeded_vgg16(tmp_path / "b.pth", 7)
    assert a.read_bytes() == b.read_bytes()
    vgg, _ = load_vgg16(a)
    loss = PerceptualLoss(vgg, ("relu2_2",))
    x = torch.rand(2, 1, 24, 24)
    assert float(loss(x, x)) == 0.0
    y = x.clone().requires_grad_(True)
    value = loss(y, (x + 0.2 * torch.rand_like(x)).clamp(0, 1))
    value.backward()
    assert float(value.detach()) > 0 and y.grad.abs().sum() > 0
