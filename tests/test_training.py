"""The generic engine and MRI training: known-answer fit, determinism, exact resume, run-folder safety."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from blindspot.errors import BlindspotError
from blindspot.fileio import read_json, read_jsonl
from blindspot.models.checkpoint import load_checkpoint, read_checkpoint_dict
from blindspot.models.registry import build_model
from blindspot.physics.mri import create_mask_func
from blindspot.training.engine import CheckpointInfo, TrainConfig, Trainer, seed_everything
from blindspot.training.mri import EpochDataset, EpochMasks, MRIValidator, split_volumes, train_mri
from blindspot.training.distributed import DistContext
from helpers_mri import TinyMRIDataset

UNET = {"chans": 4, "num_pool_layers": 2}


def test_engine_fits_a_known_linear_map(tmp_path):
    """Generic use: tensors, a 1-parameter-pair model, MSE; recovers y = 2x − 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, generator=g)
    data = TensorDataset(x, 2 * x - 1)
    seed_everything(0)
    model = nn.Linear(1, 1)
    trainer = Trainer(
        model,
        loss_fn=lambda m, batch, ctx: ((m(batch[0]) - batch[1]) ** 2).mean(),
        train_set=data,
        config=TrainConfig(epochs=30, batch_size=16, lr=0.1, optimizer="adam", lr_step_size=10, lr_gamma=0.5,
                           grad_clip=10.0, log_every=1, progress=False),
        out_dir=tmp_path / "lin",
        info=CheckpointInfo("linear", {}),
    )
    result = trainer.fit()
    assert abs(model.weight.item() - 2) < 1e-2 and abs(model.bias.item() + 1) < 1e-2
    assert result.epochs_run == 30 and len(result.history) == 30
    assert result.history[-1]["lr"] == pytest.approx(0.1 * 0.5**2)  # two decays before the last epoch
    rows = read_jsonl(tmp_path / "lin" / "log.jsonl")
    assert sum(r["event"] == "step" for r in rows) == 30 * 4
    assert sum(r["event"] == "epoch" for r in rows) == 30
    assert all("grad_norm" in r for r in rows if r["event"] == "step")


def test_non_finite_loss_is_a_clean_error(tmp_path):
    data = TensorDataset(torch.ones(8, 1), torch.ones(8, 1))
    trainer = Trainer(nn.Linear(1, 1), lambda m, b, c: m(b[0]).sum() * math.nan, data,
                      TrainConfig(epochs=1, batch_size=4, progress=False), tmp_path / "nan", CheckpointInfo("linear", {}))
    with pytest.raises(BlindspotError, match="loss became nan"):
        trainer.fit()


def test_bad_config_and_empty_data():
    data = TensorDataset(torch.ones(3, 1), torch.ones(3, 1))
    info = CheckpointInfo("linear", {})
    with pytest.raises(BlindspotError, match="fewer than one batch"):
        Trainer(nn.Linear(1, 1), lambda *a: None, data, TrainConfig(batch_size=4), "unused", info)
    with pytest.raises(BlindspotError, match="unknown optimizer"):
        Trainer(nn.Linear(1, 1), lambda *a: None, data, TrainConfig(batch_size=1, optimizer="lbfgs"), "unused", info)
    with pytest.raises(BlindspotError, match="no trainable parameters"):
        Trainer(build_model("zero-filled"), lambda *a: None, data, TrainConfig(batch_size=1), "unused",
                CheckpointInfo("zero-filled", {}))


def _mri_run(out_dir, epochs, resume=False, architecture="unet", hparams=UNET, loss="l1", optimizer="adam"):
    masks = EpochMasks(create_mask_func("random", [4, 8], [0.08, 0.04]), seed=5)
    train = EpochDataset(TinyMRIDataset(volumes=3, slices=2, mask_func=masks, seed=0), masks)
    val = TinyMRIDataset(volumes=2, slices=1, seed=100, accelerations=(4,))
    seed_everything(7)
    model = build_model(architecture, **hparams)
    config = TrainConfig(epochs=epochs, batch_size=2, lr=3e-3, optimizer=optimizer, lr_step_size=1, lr_gamma=0.7,
                         grad_clip=1.0, seed=3, log_every=1, progress=False)
    result = train_mri(model, architecture, hparams, train, val, config, out_dir, loss=loss,
                       physics={"modality": "mri", "mask_type": "random", "accelerations": [4, 8]},
                       data="tiny", resume=resume)
    return model, result


def test_mri_training_writes_checkpoints_and_is_deterministic(tmp_path):
    model_a, result = _mri_run(tmp_path / "a", epochs=2)
    model_b, _ = _mri_run(tmp_path / "b", epochs=2)
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), k
    ckpt = load_checkpoint(tmp_path / "a" / "best.pt")
    assert ckpt.architecture == "unet" and ckpt.hparams == UNET
    assert ckpt.physics["accelerations"] == [4, 8] and ckpt.normalization["clamp"] == 6.0
    assert set(ckpt.metrics) >= {"ssim", "nmse", "psnr", "ssim_std"}
    assert 0 < ckpt.metrics["ssim"] <= 1 and ckpt.metrics["volumes"] == 2
    last = read_checkpoint_dict(tmp_path / "a" / "last.pt")
    assert last["training"]["epoch"] == 1 and last["training"]["step"] == 6  # 6 slices / batch 2 × 2 epochs
    summary = (tmp_path / "a" / "summary.json").read_text()
    assert '"best_epoch"' in summary
    assert result.best_epoch in (0, 1)


def test_resume_continues_from_saved_epoch_and_matches_uninterrupted(tmp_path):
    full, full_result = _mri_run(tmp_path / "full", epochs=3)
    _mri_run(tmp_path / "part", epochs=1)
    (tmp_path / "part" / "log.jsonl").open("a").write('{"event": "step", "epoch": 1, "step": 99}\n')  # crashed epoch
    resumed, result = _mri_run(tmp_path / "part", epochs=3, resume=True)
    assert result.epochs_run == 2 and [r["epoch"] for r in result.history] == [0, 1, 2]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in full_result.history]
    rows = read_jsonl(tmp_path / "part" / "log.jsonl")
    assert [r["step"] for r in rows if r["event"] == "step"] == list(range(9))  # the stale row was dropped
    # a finished run resumes to a no-op; a run folder is never overwritten without --resume
    _, again = _mri_run(tmp_path / "part", epochs=3, resume=True)
    assert again.epochs_run == 0
    with pytest.raises(BlindspotError, match="--resume"):
        _mri_run(tmp_path / "part", epochs=3)
    with pytest.raises(BlindspotError, match="holds a 'unet' model"):
        _mri_run(tmp_path / "part", epochs=4, resume=True, hparams={"chans": 2, "num_pool_layers": 2})


def test_irim_trains_with_ssim_loss_and_rmsprop(tmp_path):
    hp = {"n_steps": 2, "n_latent": 6, "hidden_channels": [6], "dilations": [2], "head_channels": 4}
    model, result = _mri_run(tmp_path / "irim", epochs=1, architecture="irim", hparams=hp, loss="ssim",
                             optimizer="rmsprop")
    assert math.isfinite(result.history[0]["train_loss"]) and 0 < result.history[0]["train_loss"] < 1
    ckpt = load_checkpoint(tmp_path / "irim" / "last.pt")
    assert ckpt.architecture == "irim" and ckpt.hparams == hp


def test_epoch_masks_depend_on_seed_epoch_and_volume_only():
    masks = EpochMasks(create_mask_func("random", [4]), seed=1)
    a = masks(64, seed="vol1").mask
    assert torch.equal(a, masks(64, seed="vol1").mask)
    assert not torch.equal(a, masks(64, seed="vol2").mask)
    masks.set_epoch(1)
    assert not torch.equal(a, masks(64, seed="vol1").mask)
    masks.set_epoch(0)
    assert torch.equal(a, masks(64, seed="vol1").mask)


def test_split_volumes_is_disjoint_and_seeded():
    data = TinyMRIDataset(volumes=5, slices=2)
    train, val = split_volumes(data, 0.4, seed=0)
    tv = {data.samples[i][0] for i in train.indices}
    vv = {data.samples[i][0] for i in val.indices}
    assert not tv & vv and len(vv) == 2 and len(tv) == 3 and len(train) + len(val) == 10
    assert split_volumes(data, 0.4, seed=0)[1].indices == val.indices
    with pytest.raises(BlindspotError, match="at least 2 volumes"):
        split_volumes(TinyMRIDataset(volumes=1, slices=2), 0.5)


def test_validator_scores_zero_filled_as_metrics_do():
    """The zero-filled model's validation NMSE equals the hand-computed per-volume NMSE of the inputs."""
    data = TinyMRIDataset(volumes=2, slices=2, seed=3)
    metrics = MRIValidator(data, batch_size=3)(build_model("zero-filled"), DistContext())
    by_volume = {}
    for i in range(len(data)):
        s = data[i]
        sse, energy = by_volume.get(s.fname, (0.0, 0.0))
        by_volume[s.fname] = (sse + float(((s.input - s.target) ** 2).sum()), energy + float((s.target**2).sum()))
    expected = sum(a / b for a, b in by_volume.values()) / len(by_volume)
    assert metrics["nmse"] == pytest.approx(expected, rel=1e-5)
    assert metrics["volumes"] == 2 and metrics["slices"] == 4


def test_split_volumes_of_phantoms_needs_no_rendering():
    from blindspot.data.phantom_dataset import PhantomDataset

    data = PhantomDataset(volumes=3, slices=2, shape=(32, 32), recon_size=(24, 24))
    train, val = split_volumes(data, 0.34, seed=1)
    assert len(val) == 2 and len(train) == 4
    assert len({i // 2 for i in val.indices}) == 1 and not data._cache  # nothing generated


def test_cli_train_mri_on_tiny_phantoms(tmp_path, capsys):
    from blindspot.cli import main

    out = tmp_path / "run"
    base = ["train", "mri", "--model", "unet", "--hparam", "chans=2", "--hparam", "num_pool_layers=2",
            "--phantom-shape", "32", "32", "--phantom-recon-size", "24", "24", "--phantom-volumes", "2",
            "--phantom-val-volumes", "1", "--phantom-slices", "2", "--batch-size", "2", "--no-progress", "--out", str(out)]
    assert main(base + ["--epochs", "1"]) == 0
    assert "validation SSIM" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt.physics["crop"] == [24, 24] and ckpt.physics["phantom"] == {"shape": [32, 32], "recon_size": [24, 24]}
    assert "training volumes from seed 1000" in ckpt.data
    assert main(base + ["--epochs", "2", "--resume"]) == 0
    assert read_checkpoint_dict(out / "last.pt")["training"]["epoch"] == 1
    assert main(base + ["--epochs", "2"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    bad = ["train", "mri", "--model", "unet", "--hparam", "chans=0", "--out", str(tmp_path / "bad")]
    assert main(bad) == 2
    assert "bad hyper-parameters for model 'unet'" in capsys.readouterr().err
    assert main(["train", "mri", "--model", "unet", "--preset", "paper", "--out", str(tmp_path / "bad")]) == 2
    assert main(["train", "mri", "--accelerations", "4", "8", "--center-fractions", "0.08", "--out", "x"]) == 2
    capsys.readouterr()
    # a k-space network on single-coil data: one line, exit 2, no run folder
    tiny = ["--phantom-shape", "32", "32", "--phantom-recon-size", "24", "24", "--phantom-volumes", "1",
            "--phantom-val-volumes", "1", "--phantom-slices", "1"]
    assert main(["train", "mri", "--model", "varnet", "--phantom-coils", "1", *tiny, "--out",
                 str(tmp_path / "varnet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is single-coil data; varnet takes multi-coil k-space" in err[0]
    assert not (tmp_path / "varnet").exists()
    assert main(["train", "mri", "--model", "varnet", "--robust", *tiny, "--out", str(tmp_path / "varnet")]) == 2
    assert "for image-domain networks" in capsys.readouterr().err


def test_cli_train_mri_init_starts_from_the_checkpoints_weights(tmp_path, capsys):
    """--init: a run starts from another run's weights (fine-tuning); with a vanishing learning rate the new run's
    validation equals the old one's, the summary names the file by hash, and mismatches are one-line errors."""
    import hashlib

    from blindspot.cli import main

    base = ["train", "mri", "--model", "unet", "--phantom-shape", "32", "32", "--phantom-recon-size", "24", "24",
            "--phantom-volumes", "2", "--phantom-val-volumes", "1", "--phantom-slices", "2", "--batch-size", "2",
            "--epochs", "1", "--no-progress"]
    first = tmp_path / "first"
    assert main(base + ["--hparam", "chans=2", "--hparam", "num_pool_layers=2", "--out", str(first)]) == 0
    tuned = tmp_path / "tuned"
    assert main(base + ["--init", str(first / "best.pt"), "--optimizer", "sgd", "--lr", "1e-12",
                        "--seed", "7", "--out", str(tuned)]) == 0  # hyper-parameters come from the checkpoint
    assert "starting from the weights of" in capsys.readouterr().out
    a, b = load_checkpoint(first / "best.pt"), load_checkpoint(tuned / "best.pt")
    assert b.hparams == {"chans": 2, "num_pool_layers": 2}
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[key], value, rtol=0, atol=1e-9)
    summary = read_json(tuned / "summary.json")
    assert summary["init"]["sha256"] == hashlib.sha256((first / "best.pt").read_bytes()).hexdigest()
    assert summary["init"]["architecture"] == "unet"
    ssims = [[r["val"]["ssim"] for r in read_jsonl(d / "log.jsonl") if r.get("val")] for d in (first, tuned)]
    assert ssims[1][-1] == pytest.approx(ssims[0][-1], abs=1e-6)
    for args, text in ((["--hparam", "chans=4"], "has chans=2, but the run asks for chans=4"),
                       (["--model", "irim"], "checkpoint is a 'unet' model, not 'irim'"),
                       ([], "checkpoint file not found")):
        init = str(tmp_path / "missing.pt") if not args else str(first / "best.pt")
        out = tmp_path / "bad"
        assert main(base + args + ["--init", init, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0], err
        assert not (out / "best.pt").exists()
