"""CT training through the CLI: L2 (CNN-10), WGAN-GP + VGG (WGAN-VGG), exact resume, HU evaluation, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from blindspot.cli import main
from blindspot.data.ct_phantom import PhantomDatasetSpec, write_phantom_dataset
from blindspot.data.ldct import LDCTDataset, find_ldct
from blindspot.models.checkpoint import load_checkpoint
from blindspot.models.vgg import write_seeded_vgg16
from blindspot.physics.ct import WINDOWS, HUNormalization
from blindspot.training.ct import CTValidator, slice_metrics

COMMON = ["--dose", "0.25", "--patch-size", "16", "--samples-per-epoch", "32", "--batch-size", "8",
          "--val-fraction", "0.25", "--test-fraction", "0.25", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    spec = PhantomDatasetSpec(patients=4, min_slices=1, max_slices=2, size=40, n_angles=40, i0=2e5,
                              doses=(0.25,))
    write_phantom_dataset(root, spec, progress=False)
    return root


def _weights(path):
    return load_checkpoint(path).model.state_dict()


def test_cnn10_training_resume_and_records(data, tmp_path, capsys):
    out = tmp_path / "cnn"
    args = ["train", "ct", "--model", "cnn10", "--data", str(data), "--out", str(out), "--lr", "1e-3",
            "--hparam", "chans1=8", "--hparam", "chans2=4", *COMMON]
    assert main(args + ["--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "val PSNR" in printed and "test (" in printed
    summary = json.loads((out / "summary.json").read_text())
    split = summary["split"]
    assert sorted(split["train"] + split["val"] + split["test"]) == ["C001", "C003", "L002", "L004"]
    assert len(split["val"]) == 1 and len(split["test"]) == 1
    for key in ("rmse_hu", "psnr", "ssim", "input_psnr", "psnr_gain"):
        assert key in summary["test"] and key in summary["best_val"]
    ck = load_checkpoint(out / "best.pt")
    assert ck.architecture == "cnn10" and ck.hparams == {"chans1": 8, "chans2": 4}
    norm = HUNormalization.from_dict(ck.normalization)
    assert -1000 < norm.mean < 0 and norm.std > 100
    assert ck.physics["modality"] == "ct" and ck.physics["dose"] == 0.25 and ck.physics["i0"] == 2e5
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["event"] == "epoch"] == [0, 1]
    # a run stopped after one epoch and resumed ends with the same weights as the uninterrupted run
    out2 = tmp_path / "cnn-resumed"
    args2 = [a if a != str(out) else str(out2) for a in args]
    assert main(args2 + ["--epochs", "1"]) == 0
    assert main(args2 + ["--epochs", "2", "--resume"]) == 0
    for k, v in _weights(out / "last.pt").items():
        assert torch.equal(v, _weights(out2 / "last.pt")[k]), k
    # the same folder without --resume is refused (nothing overwritten)
    capsys.readouterr()
    assert main(args + ["--epochs", "3"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_wganvgg_training_with_vgg_and_exact_resume(data, tmp_path, capsys):
    vgg = write_seeded_vgg16(tmp_path / "vgg16-seeded.pth", seed=0)  # random weights: allowed in tests only
    base = ["train", "ct", "--model", "wganvgg", "--data", str(data), "--lr", "1e-4", "--hparam", "chans=8",
            "--vgg-weights", str(vgg), "--vgg-layers", "relu2_2", "--n-critic", "2", "--critic-widths", "8", "8", "8",
            "--critic-hidden", "16", *COMMON]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(base + ["--out", str(a), "--epochs", "2"]) == 0
    assert "not torchvision's ImageNet" in capsys.readouterr().err
    assert (a / "critic-epoch1.pt").is_file() and (a / "critic-epoch0.pt").is_file()
    ck = load_checkpoint(a / "best.pt")
    assert ck.physics["perceptual"]["vgg_imagenet"] is False and "NOT ImageNet" in ck.data
    summary = json.loads((a / "summary.json").read_text())
    assert summary["loss"] == "wgan-vgg" and summary["physics"]["perceptual"]["layers"] == ["relu2_2"]
    log = [json.loads(line) for line in (a / "log.jsonl").read_text().splitlines()]
    epoch_rows = [r for r in log if r["event"] == "epoch"]
    assert {"adv", "vgg", "critic", "w_dist"} <= set(epoch_rows[-1]["train"])
    assert main(base + ["--out", str(b), "--epochs", "1"]) == 0
    assert main(base + ["--out", str(b), "--epochs", "2", "--resume"]) == 0
    for k, v in _weights(a / "last.pt").items():
        assert torch.equal(v, _weights(b / "last.pt")[k]), k
    ca = torch.load(a / "critic-epoch1.pt", weights_only=True)["critic"]
    cb = torch.load(b / "critic-epoch1.pt", weights_only=True)["critic"]
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


def test_perceptual_loss_without_weights_is_a_clear_error(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    code = main(["train", "ct", "--model", "wganvgg", "--data", str(data), "--out", str(tmp_path / "w"),
                 "--epochs", "1", *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--vgg-weights" in err[0] and "nothing is downloaded" in err[0]
    assert not (tmp_path / "w").exists()
    # a plain WGAN (no perceptual term) needs no weights
    assert main(["train", "ct", "--model", "wganvgg", "--data", str(data), "--out", str(tmp_path / "plain"),
                 "--epochs", "1", "--lambda-vgg", "0", "--lambda-mse", "1", "--hparam", "chans=4",
                 "--critic-widths", "4", "4", "4", "--critic-hidden", "8", *COMMON]) == 0


def test_hu_evaluation_known_answers(data):
    ds = LDCTDataset(find_ldct(data, dose=0.25))
    norm = ds.normalization()
    identity = torch.nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        identity.weight.fill_(1.0)
    m = CTValidator(ds, norm).evaluate(identity)
    s = m.summary()
    assert s["slices"] == len(ds)
    assert s["psnr"] == pytest.approx(s["input_psnr"], abs=1e-3) and abs(s["psnr_gain"]) < 1e-3
    assert s["rmse_hu"] == pytest.approx(s["input_rmse_hu"], rel=1e-4) and s["rmse_hu"] > 1.0
    # the metrics themselves: a constant 10 HU error → RMSE 10 HU; windowed PSNR with data range 1
    full = torch.full((1, 1, 16, 16), 50.0)
    out = slice_metrics(full + 10.0, full, WINDOWS["abdomen"])
    assert float(out["rmse_hu"][0]) == pytest.approx(10.0)
    assert float(out["psnr"][0]) == pytest.approx(10 * torch.log10(torch.tensor(1 / (10 / 400) ** 2)).item(), rel=1e-4)
