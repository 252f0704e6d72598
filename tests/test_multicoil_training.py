"""``train mri --model varnet`` on multi-coil phantoms: checkpoints, validation, exact resume, the loaded network."""

import torch

from blindspot.cli import main
from blindspot.data.phantom_dataset import PhantomDataset
from blindspot.models.checkpoint import load_checkpoint, read_checkpoint_dict
from blindspot.models.loading import load_model
from blindspot.physics.mri import create_mask_func
from blindspot.training.distributed import DistContext
from blindspot.training.mri import MRIValidator

VARNET = ["--hparam", "num_cascades=1", "--hparam", "sens_chans=2", "--hparam", "sens_pools=1", "--hparam", "chans=2",
          "--hparam", "pools=1"]
TINY = ["--phantom-shape", "32", "32", "--phantom-recon-size", "24", "24", "--phantom-volumes", "2",
        "--phantom-val-volumes", "1", "--phantom-slices", "2", "--phantom-coils", "3", "--accelerations", "4",
        "--center-fractions", "0.16", "--batch-size", "2", "--lr", "3e-3", "--no-progress"]


def train(out, epochs, *extra):
    return main(["train", "mri", "--model", "varnet", *VARNET, *TINY, "--epochs", str(epochs), "--out", str(out),
                 *extra])


def test_varnet_trains_on_multicoil_phantoms_with_checkpoints_validation_and_exact_resume(tmp_path, capsys):
    assert train(tmp_path / "full", 2) == 0
    assert "validation SSIM" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "full" / "best.pt")
    assert ckpt.architecture == "varnet"
    assert ckpt.hparams == {"num_cascades": 1, "sens_chans": 2, "sens_pools": 1, "chans": 2, "pools": 1}
    assert ckpt.physics["phantom"] == {"shape": [32, 32], "recon_size": [24, 24], "challenge": "multicoil",
                                       "num_coils": 3}
    assert ckpt.physics["crop"] == [24, 24] and "3 coils" in ckpt.data
    assert 0 < ckpt.metrics["ssim"] <= 1 and ckpt.metrics["volumes"] == 1
    # interrupted after one epoch and resumed: the same weights as the uninterrupted run
    assert train(tmp_path / "part", 1) == 0
    assert train(tmp_path / "part", 2, "--resume") == 0
    assert read_checkpoint_dict(tmp_path / "part" / "last.pt")["training"]["epoch"] == 1
    full = read_checkpoint_dict(tmp_path / "full" / "last.pt")["state_dict"]
    part = read_checkpoint_dict(tmp_path / "part" / "last.pt")["state_dict"]
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)
    # the checkpoint loads as a k-space network and validates on multi-coil phantoms as the trainer did
    loaded = load_model(tmp_path / "full" / "best.pt")
    assert loaded.network.convention == "kspace" and loaded.modality == "mri"
    val = PhantomDataset(volumes=1, slices=2, seed=0, shape=(32, 32), recon_size=(24, 24), challenge="multicoil",
                         num_coils=3, mask_func=create_mask_func("random", [4], [0.16]), kspace=True)
    metrics = MRIValidator(val, batch_size=2)(loaded.model, DistContext.from_env("cpu"))
    assert abs(metrics["ssim"] - ckpt.metrics["ssim"]) < 1e-5 and metrics["slices"] == 2


def test_a_bare_varnet_state_dict_loads_with_inferred_hyper_parameters(tmp_path):
    assert train(tmp_path / "run", 1) == 0
    sd = read_checkpoint_dict(tmp_path / "run" / "best.pt")["state_dict"]
    torch.save(sd, tmp_path / "varnet_weights.pt")
    loaded = load_model(tmp_path / "varnet_weights.pt", architecture="varnet")
    assert loaded.hparams == {"num_cascades": 1, "sens_chans": 2, "sens_pools": 1, "chans": 2, "pools": 1}
    assert all(torch.equal(v, sd[k]) for k, v in loaded.model.state_dict().items())


def test_a_single_coil_file_for_varnet_is_a_one_line_error(tmp_path, capsys):
    from blindspot.data.knee_files import write_phantom_volumes

    paths = write_phantom_volumes(tmp_path / "sc", 2, 1, seed=4, shape=(32, 32), recon_size=(24, 24))
    capsys.readouterr()
    code = main(["train", "mri", "--model", "varnet", *VARNET, "--data", str(tmp_path / "sc"), "--val-fraction", "0.5",
                 "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("blindspot: error: ")
    assert "single-coil data; varnet takes multi-coil k-space" in err and str(paths[0].parent) in err
    assert not (tmp_path / "run").exists()
