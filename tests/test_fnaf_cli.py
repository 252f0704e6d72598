"""``blindspot fnaf``: outputs, determinism, resume after an interruption, replay, and one-line user errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blindspot.attacks.search import RandomSearch
from blindspot.cli import main
from blindspot.fileio import read_jsonl
from blindspot.models.checkpoint import save_checkpoint
from blindspot.models.unet import Unet

S = 40


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Five small NumPy 'knee' images (ellipse + inner disc)."""
    d = tmp_path_factory.mktemp("images")
    r = np.arange(S)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    for i in range(5):
        img = ((yy - 20 - i) ** 2 / 14**2 + (xx - 20) ** 2 / 11**2 <= 1) * 1.0
        img = img + 0.5 * ((yy - 16) ** 2 + (xx - 21 + i) ** 2 <= 16)
        np.save(d / f"knee{i}.npy", img.astype(np.float32))
    return d


def _args(image_dir, out, *extra):
    return ["fnaf", "--model", "zero-filled", "--data", str(image_dir), "--crop", str(S), str(S),
            "--out", str(out), "--batch-size", "2", "--accelerations", "4", "8", *extra]


def test_writes_records_summary_tables_and_figures(image_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(image_dir, out, "--search", "rs", "fd", "--candidates", "4")) == 0
    rows = read_jsonl(out / "records.jsonl")
    assert len(rows) == 5 * 2 * 2
    assert {(r["search"], r["acceleration"]) for r in rows} == {("rs", 4.0), ("rs", 8.0), ("fd", 4.0), ("fd", 8.0)}
    assert all(r["model"] == "zero-filled" and r["queries"] == (5 if r["search"] == "rs" else 12) for r in rows)
    csv_lines = (out / "records.csv").read_text().splitlines()
    assert len(csv_lines) == 21 and csv_lines[0].startswith("key,fname,slice,modality,acceleration,model,search")
    summary = json.loads((out / "summary.json").read_text())
    sm = summary["results"]["4x"]["rs"]
    assert sm["n"] == 5 and 0 <= sm["ci_low"] <= sm["attack_rate"] <= sm["ci_high"] <= 1
    assert set(summary["results"]) == {"4x", "8x"}
    tables = (out / "tables.md").read_text()
    assert "RS (Attack Rate %)" in tables and "Acceptance Rate (%)" in tables
    for tag in ("rs_4x", "fd_8x"):
        for kind in ("locations", "loss_vs_ip", "examples"):
            png = out / "figures" / f"{kind}_{tag}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / "features" / tag / "batch_00002.pt").exists()
    assert "RS (Attack Rate %)" in capsys.readouterr().out


def test_same_seed_gives_identical_records(image_dir, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    extra = ("--search", "grad", "--grad-steps", "2", "--grad-init", "2", "--no-figures", "--seed", "7")
    assert main(_args(image_dir, a, *extra)) == 0
    assert main(_args(image_dir, b, *extra)) == 0
    assert read_jsonl(a / "records.jsonl") == read_jsonl(b / "records.jsonl")
    assert main(_args(image_dir, c, "--search", "grad", "--grad-steps", "2", "--grad-init", "2", "--no-figures", "--seed", "8")) == 0
    assert read_jsonl(a / "records.jsonl") != read_jsonl(c / "records.jsonl")


def test_an_interrupted_run_resumes_to_the_same_records(image_dir, tmp_path, monkeypatch, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = ("--search", "rs", "--candidates", "3")
    assert main(_args(image_dir, full, *extra)) == 0

    original = RandomSearch.run
    calls = {"n": 0}

    def flaky(self, model, ctx):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th batch: 4x is done, 8x is on its first batch
            raise KeyboardInterrupt
        return original(self, model, ctx)

    monkeypatch.setattr(RandomSearch, "run", flaky)
    assert main(_args(image_dir, cut, *extra)) == 130
    assert "results written so far are kept" in capsys.readouterr().err
    monkeypatch.setattr(RandomSearch, "run", original)
    assert len(read_jsonl(cut / "records.jsonl")) == 5
    with (cut / "records.jsonl").open("a") as fh:  # and a crash left half a line behind
        fh.write('{"key": "knee0.npy:0", "accel')
    assert main(_args(image_dir, cut, *extra, "--resume")) == 0
    assert read_jsonl(cut / "records.jsonl") == read_jsonl(full / "records.jsonl")
    assert (cut / "records.csv").read_text() == (full / "records.csv").read_text()
    # resuming a finished run does nothing new
    assert main(_args(image_dir, cut, *extra, "--resume")) == 0
    assert len(read_jsonl(cut / "records.jsonl")) == 10


def test_replay_measures_transfer_from_a_checkpoint(image_dir, tmp_path):
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "unet.pt", Unet(chans=4, num_pool_layers=2), "unet",
                           {"chans": 4, "num_pool_layers": 2}, physics={"mask_type": "random"})
    src, dst = tmp_path / "src", tmp_path / "dst"
    assert main(["fnaf", "--model", str(ckpt), "--data", str(image_dir), "--crop", str(S), str(S), "--out", str(src),
                 "--accelerations", "4", "--search", "rs", "--candidates", "3", "--no-figures"]) == 0
    src_rows = read_jsonl(src / "records.jsonl")
    assert {r["model"] for r in src_rows} == {"unet"}
    assert main(["fnaf", "--model", "zero-filled", "--data", str(image_dir), "--crop", str(S), str(S),
                 "--out", str(dst), "--accelerations", "4", "--replay", str(src)]) == 0
    rows = read_jsonl(dst / "records.jsonl")
    assert len(rows) == 5 and {r["search"] for r in rows} == {"replay-rs"}
    assert [r["pixels"] for r in rows] == [r["pixels"] for r in src_rows]  # the same features, replayed
    tr = json.loads((dst / "summary.json").read_text())["transfer"]["4x"]["rs"]
    assert tr["source_model"] == "unet" and tr["target_model"] == "zero-filled"
    assert tr["n_matched"] == sum(r["success_seed"] for r in src_rows)
    assert "Transferability" in (dst / "tables.md").read_text()


def test_a_region_mask_file_places_every_feature(image_dir, tmp_path):
    mask = np.zeros((S, S), bool)
    mask[10:13, 25:27] = True
    np.save(tmp_path / "region.npy", mask)
    out = tmp_path / "run"
    assert main(_args(image_dir, out, "--region", str(tmp_path / "region.npy"), "--family", "disc",
                      "--candidates", "2", "--no-figures")) == 0
    for r in read_jsonl(out / "records.jsonl"):
        assert mask[int(r["row"]), int(r["col"])]


def test_user_mistakes_end_with_one_line_and_exit_2(image_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(image_dir, out, "--candidates", "2", "--no-figures", "--accelerations", "4")) == 0
    capsys.readouterr()
    assert main(_args(image_dir, out, "--candidates", "2", "--accelerations", "4")) == 2  # records, no --resume
    assert "--resume" in capsys.readouterr().err
    assert main(_args(image_dir, out, "--candidates", "3", "--accelerations", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert "other settings (candidates)" in err and len(err.strip().splitlines()) == 1
    assert main(_args(image_dir, tmp_path / "x", "--model", "no-such-model")) == 2
    assert "neither a checkpoint file nor a known model" in capsys.readouterr().err
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    assert main(["fnaf", "--model", str(tmp_path / "broken.pt"), "--out", str(tmp_path / "y")]) == 2
    assert "broken.pt" in capsys.readouterr().err
    assert main(_args(image_dir, tmp_path / "z", "--region", str(tmp_path / "nope.npy"))) == 2
    assert main(_args(image_dir, tmp_path / "w", "--replay", str(tmp_path / "nothing"))) == 2
    assert "no such features" in capsys.readouterr().err


def test_fnaf_on_a_bundled_ct_denoiser(tmp_path, capsys):
    out = tmp_path / "ct"
    assert main(["fnaf", "--model", "cnn10", "--out", str(out), "--phantom-volumes", "2", "--size", "64",
                 "--candidates", "3", "--search", "rs", "fd", "--no-figures"]) == 0
    rows = read_jsonl(out / "records.jsonl")
    assert len(rows) == 4 and {r["modality"] for r in rows} == {"ct"}
    assert {r["acceleration"] for r in rows} == {4.0}  # the dose-reduction factor of the network's 25 % dose
    assert all(r["ip_threshold"] == 5.0 and r["family"] == "disc" for r in rows)
    assert all(30.0 <= r["intensity"] <= 100.0 for r in rows if r["search"] == "rs")  # HU, low contrast
    summary = json.loads((out / "summary.json").read_text())
    assert summary["modality"] == "ct" and summary["results"]["4x"]["rs"]["n"] == 2
    # the same run resumed is a no-op; the same folder for an MRI network is refused (other settings)
    assert main(["fnaf", "--model", "cnn10", "--out", str(out), "--phantom-volumes", "2", "--size", "64",
                 "--candidates", "3", "--search", "rs", "fd", "--no-figures", "--resume"]) == 0
    assert len(read_jsonl(out / "records.jsonl")) == 4
    capsys.readouterr()
    assert main(["fnaf", "--model", "zero-filled", "--out", str(out), "--resume", "--no-figures"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_fnaf_run_python_api_on_ct(tmp_path):
    from blindspot.models.loading import load_model
    from blindspot.runs.fnaf import FnafConfig, ct_settings, run_fnaf

    model = load_model("redcnn")
    run = run_fnaf(model, ct_settings(model, phantoms=2, size=64), FnafConfig(candidates=2, figures=False),
                   tmp_path / "api")
    assert len(run.rows) == 2 and run.summary["results"]["4x"]["rs"]["n"] == 2
    assert (tmp_path / "api" / "features" / "rs_4x").is_dir()
