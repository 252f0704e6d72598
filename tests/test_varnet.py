"""E2E-VarNet: fastMRI's parameter layout and output, soft data consistency, the sensitivity network, FNAF on it."""

import math

import pytest
import torch
from torch import nn

from blindspot.attacks.features import FeatureSampler
from blindspot.attacks.fnaf import FnafObjective, Truths
from blindspot.attacks.search import RandomSearch
from blindspot.data.knee_phantom import generate_knee_volume
from blindspot.errors import BlindspotError
from blindspot.models.adapters import Network, network_convention
from blindspot.models.registry import build_model, model_modality
from blindspot.models.loading import load_model
from blindspot.models.varnet import NormUnet, VarNet, VarNetBlock, varnet_hparams
from blindspot.physics.acquisition import CartesianMRI
from blindspot.physics.coils import maps_from_coil_images
from blindspot.physics.mri import create_mask_func, fft2c, ifft2c, rss

TINY = dict(num_cascades=2, sens_chans=4, sens_pools=2, chans=4, pools=2)


def deterministic_(model: nn.Module) -> None:
    """Weights from a formula (no RNG): the ``i``-th state-dict entry in sorted key order is
    ``sin(0.731·j + 1.3·i) / √fan_in`` over its flattened elements ``j``."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.state_dict().items())):
            j = torch.arange(p.numel(), dtype=torch.float64)
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_((torch.sin(0.731 * j + 1.3 * i) / math.sqrt(fan_in)).reshape(p.shape).to(p.dtype))


def kspace_input(B: int = 2, C: int = 3, H: int = 24, W: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """A formula-made multi-coil k-space (two Gaussian blobs × smooth complex coils) in fastMRI's convention:
    real views ``(B, C, H, W, 2)`` masked by ``(B, 1, 1, W, 1)`` (4 central columns plus 3 others per item; W ≥ 19)."""
    r = torch.arange(H, dtype=torch.float64).reshape(1, 1, H, 1) - H // 2
    c = torch.arange(W, dtype=torch.float64).reshape(1, 1, 1, W) - W // 2
    b = torch.arange(B, dtype=torch.float64).reshape(B, 1, 1, 1)
    coil = torch.arange(C, dtype=torch.float64).reshape(1, C, 1, 1)
    obj = torch.exp(-((r / (6 + b)) ** 2 + (c / 5) ** 2)) + 0.3 * torch.exp(-(((r - 4) / 2) ** 2 + ((c + 3) / 2) ** 2))
    sens = torch.polar(torch.exp(-((r - 8 * torch.cos(coil)) ** 2 + (c - 8 * torch.sin(coil)) ** 2) / 300),
                       0.1 * r + 0.05 * coil * c)
    k = fft2c((obj * sens).to(torch.complex64))
    cols = torch.zeros(B, W, dtype=torch.bool)
    cols[:, W // 2 - 2: W // 2 + 2] = True
    cols[0, [1, 5, 15]] = True
    cols[1, [3, 17, 18]] = True
    mask = cols.reshape(B, 1, 1, W, 1)
    return torch.view_as_real(k) * mask, mask


def unet_keys(prefix: str, pools: int) -> set[str]:
    """fastMRI ``Unet``'s parameter names (its instance norms have no parameters)."""
    keys = set()
    for i in range(pools):
        keys |= {f"{prefix}down_sample_layers.{i}.layers.0.weight", f"{prefix}down_sample_layers.{i}.layers.4.weight"}
        keys.add(f"{prefix}up_transpose_conv.{i}.layers.0.weight")
        last = "0." if i == pools - 1 else ""
        keys |= {f"{prefix}up_conv.{i}.{last}layers.0.weight", f"{prefix}up_conv.{i}.{last}layers.4.weight"}
    keys |= {f"{prefix}conv.layers.0.weight", f"{prefix}conv.layers.4.weight",
             f"{prefix}up_conv.{pools - 1}.1.weight", f"{prefix}up_conv.{pools - 1}.1.bias"}
    return keys


def test_state_dict_has_fastmris_varnet_layout():
    model = VarNet(num_cascades=3, sens_chans=4, sens_pools=2, chans=5, pools=3)
    expected = unet_keys("sens_net.norm_unet.unet.", 2)
    for i in range(3):
        expected |= {f"cascades.{i}.dc_weight"} | unet_keys(f"cascades.{i}.model.unet.", 3)
    sd = model.state_dict()
    assert set(sd) == expected
    assert "sens_net.norm_unet.unet.down_sample_layers.0.layers.0.weight" in sd
    # two real channels (one complex image) in and out of every U-Net
    assert sd["sens_net.norm_unet.unet.down_sample_layers.0.layers.0.weight"].shape == (4, 2, 3, 3)
    assert sd["sens_net.norm_unet.unet.up_conv.1.1.weight"].shape == (2, 4, 1, 1)
    assert sd["cascades.2.model.unet.down_sample_layers.2.layers.4.weight"].shape == (20, 20, 3, 3)
    assert sd["cascades.0.model.unet.conv.layers.0.weight"].shape == (40, 20, 3, 3)
    assert sd["cascades.1.model.unet.up_conv.2.1.bias"].shape == (2,)
    assert sd["cascades.0.dc_weight"].shape == (1,) and float(sd["cascades.0.dc_weight"]) == 1.0
    assert not list(model.buffers())


def test_output_matches_values_computed_with_fastmris_varnet():
    """Known answer: fastMRI's own ``VarNet`` (commit 91f2df4 of facebookresearch/fastMRI), given these
    formula-made weights and k-space, returned these values (captured once; the weights are RNG-free so they do not
    depend on the torch version)."""
    model = VarNet(**TINY)
    deterministic_(model)
    k, mask = kspace_input()
    with torch.no_grad():
        out = model(k, mask)
    assert out.shape == (2, 24, 20) and out.dtype == torch.float32
    assert float(out.mean()) == pytest.approx(0.458700567483902, rel=1e-4)
    assert float(out.std()) == pytest.approx(0.4555889964103699, rel=1e-4)
    expected = {(0, 12, 10): 1.423906683921814, (0, 3, 4): 0.10810903459787369, (1, 12, 10): 1.5126394033432007,
                (1, 20, 15): 0.15920886397361755, (1, 8, 2): 0.0894351601600647}
    for idx, value in expected.items():
        assert float(out[idx]) == pytest.approx(value, abs=1e-4)


def test_a_fastmri_varnet_state_dict_loads_strictly_and_gives_the_same_output():
    fastmri_varnet = pytest.importorskip("fastmri.models.varnet")
    theirs = fastmri_varnet.VarNet(num_cascades=2, sens_chans=3, sens_pools=3, chans=5, pools=2)
    with torch.no_grad():
        for i, p in enumerate(theirs.parameters()):
            p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=torch.float32) + i).reshape(p.shape))
    ours = VarNet(num_cascades=2, sens_chans=3, sens_pools=3, chans=5, pools=2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    k, mask = kspace_input(2, 4, 40, 37)  # odd width: NormUnet pads to 48×48
    for nlf in (None, 4):
        with torch.no_grad():
            assert torch.allclose(ours(k, mask, nlf), theirs(k, mask, nlf), atol=1e-4)


def test_forward_backward_tiny_and_deterministic():
    torch.manual_seed(0)
    model = VarNet(**TINY)
    k, mask = kspace_input(2, 4, 32, 32)
    out = model(k, mask)
    assert out.shape == (2, 32, 32) and torch.isfinite(out).all() and bool((out >= 0).all())
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert float(grads["cascades.1.dc_weight"].abs()) > 0
    assert float(grads["sens_net.norm_unet.unet.down_sample_layers.0.layers.0.weight"].abs().sum()) > 0
    with torch.no_grad():
        assert torch.equal(model(k, mask), model(k, mask))
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(VarNet(**TINY).state_dict().values(), model.state_dict().values()))


class Zero(nn.Module):
    """A regulariser that returns zero."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(image)


def _complex_case(B=2, C=4, H=32, W=32):
    k, mask = kspace_input(B, C, H, W)
    return torch.view_as_complex(k.contiguous()), mask[..., 0]


@pytest.mark.parametrize("weight", [1.0, 0.5, 0.0])
def test_a_cascade_with_a_zero_regulariser_is_soft_data_consistency(weight):
    """``k' = k − λ M ⊙ (k − k₀)``: with λ = 1 the measured columns become the measurements (hard data consistency),
    with λ = ½ they move halfway, and the unmeasured columns never change."""
    k0, mask = _complex_case()
    current = k0 + 0.3 * fft2c(torch.ones_like(k0)) + 0.1j  # a current estimate that disagrees everywhere
    block = VarNetBlock(Zero())
    with torch.no_grad():
        block.dc_weight.fill_(weight)
        sens = maps_from_coil_images(ifft2c(k0))
        out = block(current, k0, mask, sens)
    m = mask.expand_as(k0)
    assert torch.allclose(out[m], current[m] - weight * (current[m] - k0[m]), atol=1e-6)
    assert torch.equal(out[~m], current[~m])


def test_varnet_with_zero_regularisers_returns_the_zero_filled_rss():
    """Started at the measured k-space, every cascade's DC term is zero and the regulariser adds nothing, so the
    output is the RSS of the zero-filled coil images whatever the DC weights and the sensitivity network."""
    torch.manual_seed(0)
    model = VarNet(**TINY)
    for i, cascade in enumerate(model.cascades):
        cascade.model = Zero()
        with torch.no_grad():
            cascade.dc_weight.fill_(0.3 + i)
    k, mask = kspace_input(2, 4, 32, 32)
    with torch.no_grad():
        out = model(k, mask)
    zero_filled = rss(ifft2c(torch.view_as_complex(k.contiguous())), dim=1)[:, 0]
    assert torch.allclose(out, zero_filled, atol=1e-6)


def test_a_normunet_with_a_zero_output_layer_returns_its_inputs_mean():
    """NormUnet un-normalises the U-Net's output: a zero U-Net output becomes the input's mean (real and imaginary
    parts separately), a constant image, whatever the other weights."""
    torch.manual_seed(0)
    net = NormUnet(chans=4, num_pools=2)
    with torch.no_grad():
        net.unet.up_conv[-1][1].weight.zero_()
        net.unet.up_conv[-1][1].bias.zero_()
    x = torch.randn(3, 1, 20, 28, dtype=torch.complex64) + (2 - 1j)
    out = net(x)
    assert out.shape == x.shape
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out, mean.expand_as(out), atol=1e-6)


def test_the_sensitivity_network_gives_unit_rss_maps_and_uses_only_the_acs_columns():
    torch.manual_seed(0)
    k, mask = _complex_case()
    centred = VarNet(**TINY).sens_net
    with torch.no_grad():
        maps = centred(k, mask)
        assert torch.allclose(rss(maps, dim=1), torch.ones(2, 1, 32, 32), atol=1e-5)
        # change a sampled column outside the auto-calibration block (columns 14-17 of 32)
        outer = k.clone()
        outer[..., 5] *= 3.0
        assert torch.equal(centred(outer, mask), maps)
        # num_low_frequencies overrides the detected block: 2 columns instead of 4
        assert not torch.allclose(centred(k, mask, 2), maps)
        centred.mask_center = False  # the whole masked k-space now reaches the maps
        assert not torch.allclose(centred(outer, mask), centred(k, mask))


def test_registered_as_a_kspace_network():
    model = build_model("varnet", **TINY)
    assert isinstance(model, VarNet) and model_modality("varnet") == "mri"
    assert network_convention(model) == "kspace"
    with pytest.raises(BlindspotError, match="bad hyper-parameters"):
        build_model("varnet", cascades=2)


def test_a_bare_state_dict_loads_and_its_hyper_parameters_are_read_off_it(tmp_path):
    hparams = dict(num_cascades=3, sens_chans=3, sens_pools=2, chans=5, pools=3)
    model = VarNet(**hparams)
    assert varnet_hparams(model.state_dict()) == hparams
    path = tmp_path / "varnet_state_dict.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, architecture="varnet", hparams=varnet_hparams(torch.load(path, weights_only=True)))
    assert loaded.modality == "mri" and loaded.network.convention == "kspace"
    with pytest.raises(BlindspotError, match="wrong shapes"):
        load_model(path, architecture="varnet", hparams=dict(hparams, chans=4))
    with pytest.raises(BlindspotError, match="no cascades"):
        varnet_hparams(build_model("unet", chans=4, num_pool_layers=2).state_dict())
    with pytest.raises(BlindspotError, match="sens_net.norm_unet.unet.down_sample_layers.0"):
        varnet_hparams({k: v for k, v in model.state_dict().items() if not k.startswith("sens_net")})


def test_bad_input_is_a_one_line_error():
    model = VarNet(**TINY)
    k, mask = kspace_input(2, 2, 32, 32)
    with pytest.raises(BlindspotError, match="real views"):
        model(torch.view_as_complex(k.contiguous()), mask)
    with pytest.raises(BlindspotError, match="column mask"):
        model(k, mask[..., 0])
    with pytest.raises(BlindspotError, match="column mask"):
        model(k, mask[..., :16, :])


def _multicoil_phantoms(n_slices=2, size=32, coils=4):
    vol = generate_knee_volume(5, n_slices, shape=(size, size), recon_size=(size, size), num_coils=coils)
    maps = maps_from_coil_images(vol.image)
    truth = rss(vol.image, dim=1)  # (S, 1, H, W) magnitude
    return Truths(truth, [vol.fname] * n_slices, list(range(n_slices))), maps


def test_fnaf_random_search_attacks_varnet_through_a_multicoil_acquisition():
    truths, maps = _multicoil_phantoms()
    torch.manual_seed(0)
    model = VarNet(**TINY)
    acq = CartesianMRI.from_mask_func(create_mask_func("random", [4], [0.16]), 32, truths.fname, sens_maps=maps)
    assert acq.coils == 4

    def search():
        return RandomSearch(sampler=FeatureSampler("disc", intensity_range=(0.5, 1.0)),
                            objective=FnafObjective(criterion="recovery"), n_candidates=3)

    result = search()(model, truths, acq)
    ev = result.evaluation
    assert len(result) == 2 and result.modality == "mri"
    assert torch.isfinite(ev.attack_loss).all() and torch.isfinite(ev.recovery).all()
    assert bool(ev.accepted.all())  # bright discs are in the multi-coil measurements
    again = search()(Network(model, "kspace", name="varnet", modality="mri"), truths, acq)
    assert torch.equal(again.evaluation.attack_loss, ev.attack_loss)


def test_a_2d_mask_the_sensitivity_network_keeps_only_the_calibration_box():
    torch.manual_seed(0)
    k, _ = _complex_case()
    mask2d = create_mask_func("gaussian2d", [4])(32, seed="v.h5", height=32).mask.bool().reshape(1, 1, 32, 32)
    k = k * mask2d
    sens = VarNet(**TINY).sens_net
    with torch.no_grad():
        maps = sens(k, mask2d)
        assert torch.allclose(rss(maps, dim=1), torch.ones(2, 1, 32, 32), atol=1e-5)
        # a sampled position outside the central 3 × 3 box (4x: round(32 · 0.08)) does not reach the maps
        outer = k.clone()
        outer[..., 2, :] *= 3.0
        assert torch.equal(sens(outer, mask2d), maps)
        inner = k.clone()
        inner[..., 16, 16] *= 3.0
        assert not torch.allclose(sens(inner, mask2d), maps)
    # the whole network: zero regularisers give the zero-filled RSS, as with column masks
    net = VarNet(**TINY)
    for cascade in net.cascades:
        cascade.model = Zero()
    with torch.no_grad():
        out = net(torch.view_as_real(k), mask2d.unsqueeze(-1).expand(2, 1, 32, 32, 1))
    assert torch.allclose(out, rss(ifft2c(k), dim=1)[:, 0], atol=1e-4 * float(out.abs().max()))
    with pytest.raises(BlindspotError, match="2-D mask"):
        net(torch.view_as_real(k), torch.ones(2, 1, 5, 32, 1, dtype=torch.bool))


def test_audit_of_bare_state_dicts_on_multicoil_files(tmp_path, capsys):
    """``blindspot audit --model <state dict> --arch varnet --data <multi-coil phantoms>`` writes a full report (the
    VarNet's hyper-parameters read off its weights), and so does a bare U-Net state dict with inferred ``chans`` and
    ``num_pool_layers`` on the same files; a single-coil file given to VarNet is a one-line error."""
    import json

    from blindspot.cli import main

    data, single = tmp_path / "mc", tmp_path / "sc"
    geometry = ["--volumes", "1", "--slices", "2", "--shape", "32", "32", "--recon-size", "32", "32"]
    assert main(["data", "phantoms", "--out", str(data), "--coils", "3", *geometry]) == 0
    assert main(["data", "phantoms", "--out", str(single), *geometry]) == 0
    torch.manual_seed(0)
    torch.save(VarNet(**TINY).state_dict(), tmp_path / "varnet.pt")
    torch.save(build_model("unet", chans=4, num_pool_layers=2).state_dict(), tmp_path / "unet.pt")
    common = ["--accelerations", "4", "--search", "rs", "--candidates", "2", "--lesion-phantoms", "0", "--no-beyond"]
    for arch in ("varnet", "unet"):
        out = tmp_path / f"audit_{arch}"
        assert main(["audit", "--model", str(tmp_path / f"{arch}.pt"), "--arch", arch, "--data", str(data),
                     "--out", str(out), *common]) == 0
        html = (out / "report.html").read_text()
        assert "<img" in html and "Table 1" in html
        rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        assert len(rows) == 2 * 2 and {r["search"] for r in rows} == {"rs"}  # 2 slices × 2 criteria
        assert ("3-coil, maps full, " + ("k-space + mask" if arch == "varnet" else "RSS image")) in html
    capsys.readouterr()
    assert main(["audit", "--model", str(tmp_path / "varnet.pt"), "--arch", "varnet", "--data", str(single),
                 "--out", str(tmp_path / "bad"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err) and [e for e in err if "error" in e] == err[-1:]
    assert err[-1].startswith("blindspot: error: ") and "single-coil" in err[-1] and "file_phantom_000000.h5" in err[-1]
