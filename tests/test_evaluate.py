"""Table 1 evaluation: known answers for the zero-filled row, the seed's layout, per-slice CSV, resume, the CLI."""

import csv
import json

import pytest
import torch

from blindspot.cli import main
from blindspot.errors import BlindspotError
from blindspot.models.loading import LoadedModel
from blindspot.report.tables import table1_markdown
from blindspot.runs.evaluate import evaluate_models, load_eval_models, write_tables
from blindspot.metrics import VolumeMetrics
from blindspot.models.checkpoint import save_checkpoint
from blindspot.models.registry import build_model
from helpers_mri import TinyMRIDataset

UNET = {"chans": 4, "num_pool_layers": 2}


def _models(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "u.pt", build_model("unet", **UNET), "unet", UNET,
                           physics={"mask_type": "random", "crop": [32, 32]})
    return load_eval_models([str(path)], device="cpu"), path


def _open(mask_func):
    return TinyMRIDataset(volumes=3, slices=2, mask_func=mask_func, seed=20)


def test_zero_filled_row_equals_direct_metrics(tmp_path):
    models, _ = _models(tmp_path)
    assert [m.name for m in models] == ["Zero-filled", "U-Net"]
    result = evaluate_models(models, [4, 8], [0.08, 0.04], _open, batch_size=4)
    assert [(r["model"], r["acceleration"]) for r in result.rows] == [
        ("Zero-filled", 4.0), ("U-Net", 4.0), ("Zero-filled", 8.0), ("U-Net", 8.0)]
    from blindspot.physics.mri import create_mask_func

    for row in result.rows[::2]:
        ds = _open(create_mask_func("random", [row["acceleration"]], [row["center_fraction"]]))
        direct = VolumeMetrics()
        for i in range(len(ds)):
            s = ds[i]
            direct.update(s.input[None], s.target[None], [s.fname], [s.slice_num], torch.tensor([s.max_value]))
        summary = direct.summary()
        for key in ("ssim", "nmse", "psnr"):
            assert row[f"{key}_mean"] == pytest.approx(summary[key]["mean"], rel=1e-5)
            assert row[f"{key}_std"] == pytest.approx(summary[key]["std"], rel=1e-4, abs=1e-7)
        assert row["volumes"] == 3 and row["slices"] == 6
    # 8x loses more than 4x for the zero-filled input
    assert result.rows[2]["ssim_mean"] < result.rows[0]["ssim_mean"]
    assert len(result.slices) == 2 * 2 * 6


def test_markdown_layout_of_the_seed_table():
    rows = [
        {"model": "U-Net", "acceleration": 4.0, "ssim_mean": 0.72131, "ssim_std": 0.26214, "nmse_mean": 0.034551,
         "nmse_std": 0.050112, "psnr_mean": 31.456, "psnr_std": 2.0},
        {"model": "I-RIM", "acceleration": 4.0, "ssim_mean": 0.75012, "ssim_std": 0.25461, "nmse_mean": 0.034133,
         "nmse_std": 0.058, "psnr_mean": float("nan"), "psnr_std": float("nan")},
    ]
    md = table1_markdown(rows).splitlines()
    assert md[0] == "| 4× | SSIM | NMSE | PSNR (dB) |"
    assert md[2] == "| U-Net | 0.7213 ± 0.2621 | 0.03455 ± 0.05011 | 31.46 ± 2.00 |"
    assert md[3] == "| I-RIM | 0.7501 ± 0.2546 | 0.03413 ± 0.05800 | n/a ± n/a |"


def test_files_and_resume(tmp_path, monkeypatch):
    models, _ = _models(tmp_path)
    out = tmp_path / "ev"
    first = evaluate_models(models, [4], [0.08], _open, out_dir=out)
    paths = write_tables(out, first, per_slice=True, meta={"data": "tiny"})
    with open(paths["slices"]) as fh:
        slices = list(csv.DictReader(fh))
    assert len(slices) == 2 * 6 and {r["model"] for r in slices} == {"Zero-filled", "U-Net"}
    table = json.loads(paths["json"].read_text())
    assert table["accelerations"]["4x"]["U-Net"]["ssim"]["mean"] == pytest.approx(first.rows[1]["ssim_mean"])
    assert table["data"] == "tiny"
    with pytest.raises(BlindspotError, match="--resume"):
        evaluate_models(models, [4], [0.08], _open, out_dir=out)

    def fail(mask_func):
        raise AssertionError("a finished acceleration must not be recomputed")

    again = evaluate_models(models, [4], [0.08], fail, out_dir=out, resume=True)
    for a, b in zip(first.rows, again.rows):
        assert a["ssim_mean"] == pytest.approx(b["ssim_mean"]) and a["nmse_std"] == pytest.approx(b["nmse_std"])
    # a model added later: that acceleration is redone for all models, without duplicated rows in the log
    extra = models + [LoadedModel(models[1].model, "Second", "mri", "unet", "second")]
    third = evaluate_models(extra, [4], [0.08], _open, out_dir=out, resume=True)
    assert len(third.rows) == 3 and len(third.slices) == 3 * 6


def test_duplicate_names_need_labels(tmp_path):
    _, path = _models(tmp_path)
    copy = tmp_path / "other.pt"
    copy.write_bytes(path.read_bytes())
    models = load_eval_models([str(path), str(copy)])
    assert [m.name for m in models] == ["Zero-filled", "U-Net (u)", "U-Net (other)"]
    with pytest.raises(BlindspotError, match="give --names"):
        load_eval_models([str(path), str(path)])
    assert [m.name for m in load_eval_models([str(path), str(path)], names=["a", "b"])] == ["Zero-filled", "a", "b"]
    with pytest.raises(BlindspotError, match="one --names entry"):
        load_eval_models([str(path)], names=["a", "b"])


def test_cli_on_tiny_phantoms(tmp_path, capsys):
    _, path = _models(tmp_path)
    out = tmp_path / "cli"
    code = main(["evaluate", str(path), "--names", "Small U-Net", "--accelerations", "4", "--phantom-shape", "32", "32",
                 "--phantom-recon-size", "24", "24", "--phantom-volumes", "2", "--phantom-slices", "1", "--crop", "24",
                 "24", "--out", str(out), "--per-slice", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| Small U-Net |" in printed and "| Zero-filled |" in printed
    assert {p.name for p in out.iterdir()} >= {"table.md", "table.csv", "table.json", "slices.csv", "run.json"}
    assert json.loads((out / "run.json").read_text())["crop"] == [24, 24]
