"""``blindspot invariances`` end to end on tiny data: CT (phantoms, .npy, LDCT layout), MRI, generator, errors."""

import json

import numpy as np
import pytest
import torch

from blindspot.cli import main

CT_FAST = ["--phantoms", "2", "--size", "64", "--iterations", "150", "--restarts", "2", "--device", "cpu"]


def _rows(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]


def test_ct_gaussian_ri_end_to_end_known_answer(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["invariances", "--model", "gaussian-ri", *CT_FAST, "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 4 and {r["restart"] for r in rows} == {0, 1}
    # the known answer, through the CLI: structure inside the 30×30 square, output (HU) nearly unchanged
    assert all(r["square_ratio"] >= 5 for r in rows)
    assert all(r["change_ratio"] <= 0.02 for r in rows)
    assert all(r["mean_abs_change"] > 50 for r in rows)  # HU
    for name in ("records.csv", "summary.json", "section.html", "report.html", "run.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["units"] == "HU" and summary["images"] == 2 and "square_ratio" in summary["aggregate"]
    npz = sorted((out / "arrays").glob("*.npz"))
    assert len(npz) == 2
    with np.load(npz[0]) as a:
        assert a["x"].shape == (64, 64) and a["x_inv"].shape == (2, 64, 64) and a["f_x_inv"].shape == (2, 64, 64)
        assert -1100 < a["x"].min() < -800  # air, in HU
        assert a["x_inv"].min() >= -1024.01 and a["x_inv"].max() <= 3071.01  # default HU bounds
    assert len(list((out / "figures").glob("*.png"))) == 2
    assert "<section" in (out / "section.html").read_text()
    assert "square_ratio" in capsys.readouterr().out


def test_resume_rules_and_same_seed_same_result(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["invariances", "--model", "gaussian-ri", *CT_FAST, "--iterations", "20", "--seed", "3"]
    assert main([*args, "--out", str(a)]) == 0
    assert main([*args, "--out", str(b)]) == 0
    for fa in sorted((a / "arrays").glob("*.npz")):
        with np.load(fa) as x, np.load(b / "arrays" / fa.name) as y:
            assert np.array_equal(x["x_inv"], y["x_inv"])
    n = len(_rows(a))
    capsys.readouterr()
    assert main([*args, "--out", str(a)]) == 2  # existing records, no --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--out", str(a), "--resume"]) == 0  # nothing left to do, nothing duplicated
    assert len(_rows(a)) == n
    assert main([*args, "--alpha", "0.5", "--out", str(a), "--resume"]) == 2  # other settings
    assert "alpha" in capsys.readouterr().err


def test_resume_finishes_a_partial_run(tmp_path):
    args = ["invariances", "--model", "gaussian-ri", "--phantoms", "2", "--size", "32", "--iterations", "10",
            "--restarts", "1", "--batch-size", "1", "--device", "cpu"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*args, "--out", str(full)]) == 0
    assert main([*args, "--out", str(part), "--limit", "1"]) == 0
    # pretend the run stopped after the first image (and mid-line): resume completes it identically
    with (part / "records.jsonl").open("a") as fh:
        fh.write('{"key": "trunc')
    run_json = json.loads((part / "run.json").read_text())
    run_json["settings"]["limit"] = None
    (part / "run.json").write_text(json.dumps(run_json))
    assert main([*args, "--out", str(part), "--resume"]) == 0
    rows_full, rows_part = _rows(full), _rows(part)
    assert [r["key"] for r in rows_part] == [r["key"] for r in rows_full]
    assert [r["mean_abs_change"] for r in rows_part] == pytest.approx([r["mean_abs_change"] for r in rows_full])


def test_ct_npy_data_ssim_distance_and_region(tmp_path):
    from blindspot.data.ct_phantom import ct_phantom

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        np.save(data / f"slice{i}.npy", ct_phantom("abdomen", size=48, seed=i).numpy())
    out = tmp_path / "run"
    assert main(["invariances", "--model", "gaussian-ri", "--data", str(data), "--distance", "ssim",
                 "--iterations", "30", "--restarts", "1", "--region", "box:10,10,20,20", "--device", "cpu",
                 "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["key"] for r in rows] == ["slice0.npy", "slice1.npy"]
    assert all(0 < r["distance"] <= 1 for r in rows)
    with np.load(out / "arrays" / "slice0.npy.npz") as a:
        d = a["x_inv"][0] - a["x"]
        outside = np.ones_like(d, dtype=bool)
        outside[10:30, 10:30] = False
        assert np.abs(d[outside]).max() < 1e-2 and np.abs(d[~outside]).mean() > 1.0


def test_ct_ldct_layout_data(tmp_path):
    from blindspot.data.ct_phantom import ct_phantom
    from blindspot.data.ldct import ldct_uid, write_ct_slice

    root = tmp_path / "LDCT-and-Projection-data" / "L001" / "study"
    for kind, desc, noise in (("full", "Full Dose Images", 0.0), ("low", "Low Dose Images", 30.0)):
        for i in range(2):
            img = ct_phantom("abdomen", size=32, seed=0, z=0.4 + 0.1 * i).numpy()
            img = img + noise * np.random.default_rng(i).standard_normal(img.shape)
            write_ct_slice(root / f"1.000000-{desc}-1234{len(kind)}" / f"1-{i + 1:03d}.dcm", img,
                           patient_id="L001", study_uid=ldct_uid("s"), series_uid=ldct_uid(kind),
                           frame_uid=ldct_uid("f"), sop_uid=ldct_uid(kind, i), series_number=1 if kind == "full" else 2,
                           series_description=desc, instance_number=i + 1, z_mm=3.0 * i, pixel_spacing_mm=12.0)
    out = tmp_path / "run"
    assert main(["invariances", "--model", "gaussian-ri", "--data", str(tmp_path / "LDCT-and-Projection-data"),
                 "--iterations", "10", "--restarts", "1", "--device", "cpu", "--out", str(out)]) == 0
    assert [r["key"] for r in _rows(out)] == ["L001:0", "L001:1"]


def test_mri_zero_filled_end_to_end(tmp_path):
    data = tmp_path / "mri"
    data.mkdir()
    yy, xx = np.mgrid[:32, :32]
    for i in range(2):
        img = 1.0 * (((yy - 16) / 11.0) ** 2 + ((xx - 16) / 8.0) ** 2 < 1) + 0.05 * (i + 1)
        np.save(data / f"knee{i}.npy", img.astype(np.float32))
    out = tmp_path / "run"
    assert main(["invariances", "--model", "zero-filled", "--data", str(data), "--crop", "32", "32",
                 "--iterations", "200", "--restarts", "1", "--alpha", "0.01", "--device", "cpu", "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 2
    # the zero-filled reconstruction ignores exactly what the mask hides
    assert all(r["null_energy_fraction"] > 0.99 and r["units"] == "normalised" for r in rows)
    with np.load(sorted((out / "arrays").glob("*.npz"))[0]) as a:
        assert a["null_abs"].shape == (1, 32, 32) and a["mask"].shape == (32,)


def test_generator_train_resume_and_sample(tmp_path, capsys):
    gen = tmp_path / "gen"
    common = ["--model", "gaussian-ri", "--phantoms", "2", "--size", "32", "--patch", "16", "--train-batch", "4",
              "--n-critic", "1", "--scales", "2", "--channels", "4", "--critic-channels", "4", "--device", "cpu",
              "--out", str(gen)]
    assert main(["invariances", "train-generator", *common, "--steps", "3"]) == 0
    assert main(["invariances", "train-generator", *common, "--steps", "5"]) == 2  # exists, no --resume
    assert main(["invariances", "train-generator", *common, "--steps", "5", "--resume"]) == 0
    assert "resuming from step 3" in capsys.readouterr().out
    assert torch.load(gen / "generator.pt", weights_only=True)["step"] == 5
    out = tmp_path / "samples"
    assert main(["invariances", "sample", "--generator", str(gen), "--phantoms", "2", "--size", "32",
                 "--samples", "3", "--device", "cpu", "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 2 and all(np.isfinite(r["critic_samples"]) for r in rows)
    with np.load(sorted((out / "arrays").glob("*.npz"))[0]) as a:
        assert a["samples"].shape == (3, 32, 32) and a["f_samples"].shape == (3, 32, 32)
    assert (out / "report.html").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no-such-model"], "neither a checkpoint"),
        (["--model", "gaussian-ri", "--distance", "vgg"], "VGG16 weights"),
        (["--model", "gaussian-ri", "--region", "square:500"], "square must fit"),
        (["--model", "gaussian-ri", "--data", "/no/such/folder"], "no such file"),
        (["--model", "gaussian-ri", "--bounds-hu", "5,1"], "LOW must be below"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached VGG weights
    code = main(["invariances", *argv, "--phantoms", "1", "--size", "32", "--iterations", "2", "--device", "cpu",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_vgg_distance_with_a_weights_file(tmp_path):
    from blindspot.models.vgg import write_seeded_vgg16

    weights = write_seeded_vgg16(tmp_path / "vgg16-seeded.pth")
    out = tmp_path / "run"
    assert main(["invariances", "--model", "gaussian-ri", "--phantoms", "1", "--size", "32", "--iterations", "3",
                 "--restarts", "1", "--distance", "vgg", "--vgg-weights", str(weights), "--device", "cpu",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distance_weights"]["vgg_imagenet"] is False
