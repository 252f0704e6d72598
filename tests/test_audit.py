"""The audit: tables agree with their records and with the evaluation, results.json is keyed by model name, the report
is one self-contained HTML file, bad input ends with exit code 2, and the README's Python example runs."""

import json
import math
import re
from pathlib import Path

import pytest

from helpers_mri import tiny_mri_checkpoints
from blindspot.runs.audit import AuditConfig, bundled_models, robustness_headline, run_audit
from blindspot.cli import main
from blindspot.fileio import file_sha256, read_jsonl

PHANTOM = {"shape": [32, 32], "recon_size": [32, 32]}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    physics = {"modality": "mri", "mask_type": "random", "accelerations": [4.0], "center_fractions": [0.08],
               "crop": [32, 32], "phantom": PHANTOM}
    return tiny_mri_checkpoints(d, physics)


@pytest.fixture(scope="module")
def audit(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "run"
    cfg = AuditConfig(accelerations=(4.0,), phantom_volumes=1, phantom_slices=3, candidates=3, grad_steps=1,
                      grad_init=2, device="cpu", progress=False)
    result = run_audit([("Tiny U-Net", checkpoints[0]), ("Tiny I-RIM", checkpoints[1])], out, config=cfg)
    return out, result


def test_tables_match_records_and_evaluation(audit, checkpoints):
    out, result = audit
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 2 * 3 * 3 * 2  # 2 models × 3 searches × 3 images × 2 criteria
    assert result.attack_rates == result.attack_rates_by_criterion["seed"]  # the first criterion is the headline
    for criterion, flag in (("seed", "success_seed"), ("recovery", "success_recovery")):
        for model in ("Tiny U-Net", "Tiny I-RIM"):
            for search in ("rs", "fd", "grad"):
                rows = [r for r in records if r["model"] == model and r["search"] == search
                        and r["criterion"] == criterion]
                assert [r["success"] for r in rows] == [r[flag] for r in rows]
                sm = result.attack_rates_by_criterion[criterion][model]["4x"][search]
                assert sm["n"] == 3
                assert sm["attack_rate"] == pytest.approx(sum(bool(r["success"]) for r in rows) / 3)
                assert sm["ci_low"] <= sm["attack_rate"] <= sm["ci_high"]
                assert sm["mean_attack_loss"] == pytest.approx(sum(r["attack_loss"] for r in rows) / 3)
                saturated = [r["baseline_loss"] >= r["loss_threshold"] for r in rows]
                assert sm["baseline_saturation"] == pytest.approx(sum(saturated) / 3)
    # Table 1 has the zero-filled baseline and both models, with the evaluation's own numbers
    names = [r["model"] for r in result.table1]
    assert names == ["Zero-filled", "Tiny U-Net", "Tiny I-RIM"]
    from blindspot.data.mri import open_mri_dataset
    from blindspot.runs.evaluate import evaluate_models, load_eval_models

    models = load_eval_models([str(checkpoints[0])], ["Tiny U-Net"], zero_filled=False)
    ev = evaluate_models(models, [4.0], [0.08],
                         lambda mf: open_mri_dataset(None, mf, (32, 32), volumes=1, slices=3, seed=100,
                                                     shape=(32, 32), recon_size=(32, 32)))
    assert result.table1[1]["ssim_mean"] == pytest.approx(ev.rows[0]["ssim_mean"], rel=1e-6)
    # transfer: each model's features replayed on the other, for every search
    pairs = {(t["source"], t["target"], t["search"], t["criterion"]) for t in result.transfer}
    assert len(pairs) == 2 * 3 * 2 and ("Tiny U-Net", "Tiny I-RIM", "rs", "recovery") in pairs


def test_files_and_self_contained_report(audit):
    out, result = audit
    data = json.loads((out / "results.json").read_text())
    assert set(data["attack_rates"]) == {"Tiny U-Net", "Tiny I-RIM"}
    assert set(data["attack_rates"]["Tiny U-Net"]["4x"]) == {"rs", "fd", "grad"}
    for name in ("table1.csv", "table2.csv", "ip_table.csv", "transfer.csv", "records.csv", "tables.md"):
        assert (out / name).stat().st_size > 0, name
    html = (out / "report.html").read_text()
    assert result.report == out / "report.html"
    assert "Table 1" in html and "Table 2" in html and "Information preservation" in html and "Transferability" in html
    assert len(re.findall(r"src='data:image/png;base64,", html)) >= 4  # grid, scatters, heat-maps, worst cases
    assert not re.search(r"(src|href)=['\"](https?:|file:|/)", html)  # nothing outside the file
    assert "Tiny I-RIM" in result.markdown and "Acceptance Rate" in result.markdown
    assert "seed criterion" in html and "recovery criterion" in html and "error alone at threshold" in html
    # it opens with the attack-rate figure and Table 1 (each row's acquisition); the details follow
    assert html.index("<figure class='summary'>") < html.index("<h2>Table 1") < html.index("<h2>Table 2")
    assert (out / "figures" / "attack_rates.png").stat().st_size > 0
    assert html.count("<td>single-coil, zero-filled image</td>") == 3  # zero-filled and both models, at 4x
    assert "none of these networks is one of the seed" in html  # no seed paper numbers beside tiny nets
    assert set(data["attack_rates_by_criterion"]) == {"seed", "recovery"}


def test_rerun_needs_resume_and_same_settings(audit, checkpoints):
    out, _ = audit
    cfg = AuditConfig(accelerations=(4.0,), phantom_volumes=1, phantom_slices=3, candidates=3, grad_steps=1,
                      grad_init=2, device="cpu", progress=False, figures=False)
    models = [("Tiny U-Net", checkpoints[0]), ("Tiny I-RIM", checkpoints[1])]
    from blindspot.errors import BlindspotError

    with pytest.raises(BlindspotError, match="already holds audit records"):
        run_audit(models, out, config=cfg)
    with pytest.raises(BlindspotError, match="other settings"):
        run_audit(models, out, config=AuditConfig(**{**cfg.__dict__, "candidates": 4}), resume=True)
    again = run_audit(models, out, config=cfg, resume=True)  # nothing recomputed: same records
    assert len(again.records) == 36


def test_cli_bad_input(tmp_path, capsys):
    assert main(["audit", "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["audit", "--model", str(bad), "--out", str(tmp_path / "o2")]) == 2
    mri_model = bundled_models()[0][1]  # an MRI network and a CT denoiser cannot share one audit
    capsys.readouterr()
    assert main(["audit", "--model", "cnn10", "--model", str(mri_model), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "mri_unet.pt" in err and "one modality" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o3").exists()


def test_ct_audit_of_two_bundled_denoisers(tmp_path):
    cfg = AuditConfig(phantom_volumes=1, phantom_slices=2, ct_size=64, searches=("rs", "grad"), candidates=3,
                      grad_steps=1, grad_init=2, invariance_images=1, invariance_iterations=20, device="cpu",
                      progress=False, figures=True)
    result = run_audit([(None, "cnn10"), ("RED", "redcnn")], tmp_path / "ct", config=cfg)
    assert result.modality == "ct"
    names = [r["model"] for r in result.table1]
    assert names == ["Low-dose input", "CNN-10", "RED"] and all(r["dose"] == 0.25 for r in result.table1)
    assert all(r["rmse_hu_mean"] > 0 and 0 < r["ssim_abdomen_mean"] <= 1 for r in result.table1)
    # every (model, criterion, search) attacked each image once, with CT's IP statistic and threshold
    assert len(result.records) == 2 * 2 * 2 * 2
    assert {r["modality"] for r in result.records} == {"ct"} and {r["ip_threshold"] for r in result.records} == {5.0}
    assert set(result.attack_rates) == {"CNN-10", "RED"} and "4x" in result.attack_rates["RED"]
    assert {(t["source"], t["target"]) for t in result.transfer} == {("CNN-10", "RED"), ("RED", "CNN-10")}
    html = (tmp_path / "ct" / "report.html").read_text()
    assert "denoising quality" in html and "low-dose input" in html and "25% dose" in html
    # the invariance section: one short image-domain run per denoiser, its change in HU
    assert set(json.loads((tmp_path / "ct" / "results.json").read_text())["invariances"]) == {"CNN-10", "RED"}
    assert "<h2>Invariances</h2>" in html and (tmp_path / "ct" / "invariances" / "RED" / "records.csv").exists()
    # the same noise realisation reaches every denoiser: the low-dose row is computed once, on the attack's inputs
    assert (tmp_path / "ct" / "table1.csv").read_text().count("Low-dose input") == 1


def test_headline_compares_a_model_with_its_robust_version():
    t1 = [{"model": "U-Net", "acceleration": 4.0, "ssim_mean": 0.70, "nmse_mean": 0.030},
          {"model": "FNAF-robust U-Net", "acceleration": 4.0, "ssim_mean": 0.695, "nmse_mean": 0.031}]
    rates = {"U-Net": {"4x": {"rs": {"attack_rate": 0.9}}}, "FNAF-robust U-Net": {"4x": {"rs": {"attack_rate": 0.3}}}}
    (h,) = robustness_headline(t1, rates)
    assert h["rs_ratio"] == pytest.approx(1 / 3) and h["ssim_diff"] == pytest.approx(-0.005)
    assert h["nmse_rel_change"] == pytest.approx(0.031 / 0.030 - 1)
    assert h["rs_meets"] and h["ssim_within"] and h["nmse_within"] and h["searches_met"] == ["rs"]
    rates["FNAF-robust U-Net"]["4x"]["rs"]["attack_rate"] = 0.31  # just above a third of 0.9
    (h,) = robustness_headline(t1, rates)
    assert not h["rs_meets"] and h["searches_not_met"] == ["rs"]
    t1[1]["ssim_mean"] = 0.75  # a robust model that is better than the standard one has no quality cost
    assert robustness_headline(t1, rates)[0]["ssim_within"]
    t1[1]["ssim_mean"] = 0.689
    assert not robustness_headline(t1, rates)[0]["ssim_within"]


def test_bundled_models_are_recorded():
    models = bundled_models()
    assert [n for n, _ in models] == ["U-Net", "FNAF-robust U-Net", "I-RIM"]
    provenance = json.loads((models[0][1].parent / "mri_models.json").read_text())
    for _, path in models:
        entry = provenance[path.name]
        assert entry["command"].startswith("blindspot train mri") and "--phantom-seed" in entry["command"]
        assert entry["sha256"] == file_sha256(path) and path.stat().st_size < 4_000_000


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The Python block of the README's API section runs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "api" / "report.html").exists()
    assert math.isfinite(namespace["rate"])


def test_readme_own_network_example_runs():
    """The README's "Your own network" block (a user's k-space network, not registered) runs and attacks."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("### Your own network", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert len(result) == 1 and result.modality == "mri" and bool(result.evaluation.accepted[0])
    assert math.isfinite(float(result.evaluation.attack_loss[0]))


def test_no_lesion_section_without_boxes(audit):
    out, result = audit
    assert "lesions" not in json.loads((out / "results.json").read_text())
    assert not (out / "lesions.csv").exists() and "<h2>Lesions</h2>" not in (out / "report.html").read_text()
    assert "## Lesions" not in result.markdown


def test_lesion_phantoms_add_the_lesion_section(checkpoints, tmp_path):
    """``lesion_phantoms`` plants lesions in held-out phantoms and scores them; the counts match the boxes written."""
    from blindspot.data.lesions import read_annotations
    from blindspot.errors import BlindspotError

    cfg = AuditConfig(accelerations=(4.0,), searches=("rs",), phantom_volumes=1, phantom_slices=2, candidates=2,
                      transfer=False, figures=False, device="cpu", progress=False, lesion_phantoms=1)
    result = run_audit([("Tiny U-Net", checkpoints[0])], tmp_path / "run", config=cfg)
    boxes = read_annotations(tmp_path / "run" / "lesion_phantoms" / "boxes.csv")
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(boxes.boxes) > 0
    per_model = data["lesions"]["by_acceleration"]["4x"]["preserved"]
    assert set(per_model) == {"Zero-filled", "Tiny U-Net"}
    assert all(v["all"]["total"] == len(boxes.boxes) for v in per_model.values())
    assert "Lesions" in result.report.read_text()
    with pytest.raises(BlindspotError, match="not both"):
        run_audit([("Tiny U-Net", checkpoints[0])], tmp_path / "run2", config=cfg,
                  boxes=tmp_path / "run" / "lesion_phantoms" / "boxes.csv")


def test_cli_audits_the_bundled_ct_denoisers(tmp_path, capsys):
    out = tmp_path / "ct"
    assert main(["audit", "--modality", "ct", "--out", str(out), "--ct-size", "48", "--phantom-volumes", "1",
                 "--phantom-slices", "2", "--search", "rs", "--candidates", "2", "--criteria", "recovery",
                 "--no-figures", "--no-transfer", "--device", "cpu", "--invariance-images", "0"]) == 0
    printed = capsys.readouterr().out
    assert "denoising quality" in printed and "Low-dose input" in printed and "25% dose" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["modality"] == "ct" and set(results["attack_rates"]) == {"CNN-10", "RED-CNN", "WGAN-VGG"}
