"""The audit report as a reader sees it: it opens with the attack-rate figure and Table 1 (with the acquisition of each
row and the seed paper's numbers), details below; and in a real browser (headless Chromium) every figure decodes, the
page raises no error and does not overflow sideways.

The reports are rendered from ``results`` dicts built here (the layout ``blindspot.runs.audit`` writes), so the test
needs no attack run; the browser part is skipped, saying why, when Chromium is not installed (``.ci/run`` installs
it where it can)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from blindspot.report.html import render_audit_report
from blindspot.report.seed_paper import SEED_TABLE2
from blindspot.report.summary_figure import paired_order
from blindspot.report.tables import acquisition_labels, table2_markdown

MRI_MODELS = ("U-Net", "FNAF-robust U-Net", "I-RIM")
CT_MODELS = ("CNN-10", "RED-CNN")


def _summary(rate: float, n: int, modality: str) -> dict:
    return {"n": n, "attack_rate": rate, "ci_low": max(0.0, rate - 0.2), "ci_high": min(1.0, rate + 0.2),
            "mean_attack_loss": 1e-3 * (1 + rate), "loss_threshold": 1e-3, "mean_baseline_loss": 2e-4,
            "baseline_saturation": 0.0, "ip_acceptance": 1.0, "mean_ip_loss": 5e-4, "modality": modality}


def _results(modality: str, coil_maps: str | None = None) -> dict:
    ct = modality == "ct"
    models = CT_MODELS if ct else MRI_MODELS
    keys = ["4x"] if ct else ["4x", "8x"]
    rates = {c: {m: {k: {s: _summary((i + 1) / 8 + (0.25 if c == "recovery" else 0), 8, modality)
                         for s in ("rs", "fd")} for k in keys} for i, m in enumerate(models)}
             for c in ("seed", "recovery")}
    if ct:
        table1 = [{"model": m, "dose": 0.25, "rmse_hu_mean": 20.0, "rmse_hu_std": 1.0,
                   **{f"{q}_{w}_{s}": 0.9 for w in ("abdomen", "lung") for q in ("psnr", "ssim")
                      for s in ("mean", "std")}}
                  for m in ("Low-dose input", *models)]
    else:
        table1 = [{"model": m, "acceleration": float(k[:-1]), "ssim_mean": 0.7, "ssim_std": 0.1, "nmse_mean": 0.03,
                   "nmse_std": 0.01, "psnr_mean": 30.0, "psnr_std": 1.0}
                  for k in keys for m in ("Zero-filled", *models)]
    settings = {"modality": modality, "models": [{"name": m, "source": f"{m}.pt",
                                                  "architecture": "cnn10" if ct else "unet"} for m in models],
                "data": "built-in knee phantoms, 1 volumes x 8 slices from seed 100" if not ct else
                        "built-in CT phantoms, 8 slices from seed 100",
                "accelerations": [] if ct else [4.0, 8.0], "coil_maps": coil_maps, "family": None}
    headline = [] if ct else [{"criterion": "seed", "model": "U-Net", "robust": "FNAF-robust U-Net",
                               "acceleration": "4x", "rs_rate": 0.125, "rs_robust_rate": 0.25, "rs_ratio": 2.0,
                               "rs_meets": False, "ssim_diff": 0.0, "nmse_rel_change": 0.0, "ssim_within": True,
                               "nmse_within": True, "searches_met": [], "searches_not_met": ["rs"]}]
    return {"settings": settings, "modality": modality, "criteria": ["seed", "recovery"],
            "attack_rates": rates["seed"], "attack_rates_by_criterion": rates, "table1": table1, "table2": [],
            "ip_table": [], "transfer": [], "headline": headline, "invariances": {}, "timings_s": {"total": 1.0}}


def _render(tmp_path: Path, modality: str, coil_maps: str | None = None) -> tuple[Path, str]:
    from blindspot.report.fnaf_figures import location_heatmap

    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = [{"row": 10 + i, "col": 12 + i, "success": i % 2} for i in range(6)]
    heat = location_heatmap(rows, (32, 32), tmp_path / "heat.png", bins=4)
    results = _results(modality, coil_maps)
    extra = "<section class='beyond'><h2>An extra section</h2><p>its body</p></section>"
    page = render_audit_report(tmp_path / "report.html", results, {"table1": "", "table2": {}, "ip": {}},
                               figures=[("qualitative", "4×: a qualitative figure", heat),
                                        ("heatmap", "4×: where attacks succeed", heat)], extra_sections=[extra])
    return page, page.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("reports")
    return {m: _render(root / m, m) for m in ("mri", "ct")}


def test_report_opens_with_the_figure_and_table1_details_below(reports):
    page, text = reports["mri"]
    order = [text.index(s) for s in ("<figure class='summary'>", "<h2>Table 1", "<h2>FNAF-robust training",
                                     "<h2>Table 2", "<h2>Information preservation", "<h2>Run</h2>")]
    assert order == sorted(order)
    assert text.count("<img") == 3 and (page.parent / "figures" / "attack_rates.png").stat().st_size > 10_000
    assert not re.search(r"(src|href)=['\"](https?:|file:|/)", text)  # still self-contained
    # Table 1: the acquisition of each row and the seed paper's numbers beside its own networks
    table1 = text[text.index("<h2>Table 1"): text.index("<h2>FNAF-robust training")]
    assert "<th>acquisition</th>" in table1 and table1.count("<td>single-coil, zero-filled image</td>") == 8
    assert "<td>0.7213 ± 0.2621</td>" in table1 and "<td>0.04438 ± 0.06830</td>" in table1
    # Table 2 under both criteria: the seed's RS / FD rates beside the same network and setting
    table2 = text[text.index("<h2>Table 2"): text.index("<h2>Information preservation")]
    assert table2.count("<td>84.44 / 72.17</td>") == 2 and table2.count("<td>15.09 / 13.30</td>") == 2
    assert "<details" in text[text.index("<h2>Information preservation"):]  # long parts fold away
    assert ("<section class='beyond'><h2>An extra section</h2><details><summary>Details</summary>\n<p>its body</p>"
            in text) and text.index("<h2>An extra section") < text.index("<h2>Run</h2>")


def test_acquisition_labels_from_the_settings():
    mri = _results("mri")["settings"]
    assert acquisition_labels(mri, ["U-Net", "Zero-filled"]) == {"U-Net": "single-coil, zero-filled image",
                                                                 "Zero-filled": "single-coil, zero-filled image"}
    multi = {**mri, "coil_maps": "espirit", "acquisition": {"coils": 8, "coil_maps": "espirit"},
             "models": [*mri["models"], {"name": "VarNet", "architecture": "varnet"}]}
    labels = acquisition_labels(multi, ["U-Net", "VarNet"])
    assert labels == {"U-Net": "8-coil, maps espirit, RSS image", "VarNet": "8-coil, maps espirit, k-space + mask"}
    # without the recorded coil count: built-in phantoms get maps only when multi-coil
    assert acquisition_labels({**mri, "coil_maps": "full"}, ["U-Net"])["U-Net"] == "multi-coil, maps full, RSS image"
    files = {**mri, "coil_maps": "full", "data": "/data/knee"}  # files: the coil count was not recorded
    assert acquisition_labels(files, ["U-Net"])["U-Net"] == "as the data files (if multi-coil: maps full, RSS image)"
    ct = _results("ct")
    assert acquisition_labels(ct["settings"], ["CNN-10"], ct["table1"]) == {
        "CNN-10": "CT, 25% dose (simulated in the projection domain)"}


def test_seed_columns_only_where_the_seed_has_numbers():
    res = _results("mri")
    summaries = {(m, float(k[:-1]), s): sm for m, per in res["attack_rates_by_criterion"]["seed"].items()
                 for k, ps in per.items() for s, sm in ps.items()}
    md = table2_markdown(summaries)
    for (model, acc), ref in SEED_TABLE2.items():
        block = md.split(f"**{acc:g}×**")[1].split("**")[0]
        assert f"| {model} |" in block and f"{100 * ref['rs'][0]:.2f} / {100 * ref['fd'][0]:.2f} |" in block
    renamed = {("My net", a, s): sm for (m, a, s), sm in summaries.items() if m == "U-Net"}
    assert "seed paper" not in table2_markdown(renamed) and "seed paper" not in table2_markdown(summaries, seed=False)
    assert paired_order(["FNAF-robust U-Net", "I-RIM", "U-Net", "FNAF-robust X"]) == [
        "I-RIM", "U-Net", "FNAF-robust U-Net", "FNAF-robust X"]


def test_ct_report_says_there_are_no_seed_numbers(reports):
    _, text = reports["ct"]
    assert "No published attack rates exist for CT denoisers" in text and "seed paper RS" not in text
    assert "FNAF-robust counterpart" not in text  # no robust pairs: the caption does not promise them
    assert "<td>CT, 25% dose (simulated in the projection domain)</td>" in text


# ----------------------------------------------------------------------------------------------------------------
# In a real browser
# ----------------------------------------------------------------------------------------------------------------
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)

#: Appended to a copy of the report: once the page has loaded (the load event waits for every image, those in
#: closed ``<details>`` too), write each image's decoded size (0 × 0: broken), the page's errors and its sideways
#: overflow into the DOM, which ``--dump-dom`` prints.
CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const found = Array.from(document.images).map(i => [i.alt, i.complete ? i.naturalWidth : 0, i.naturalHeight]);
  const out = document.createElement('pre');
  out.id = 'check';
  out.textContent = JSON.stringify({images: found, errors: window.__errors,
    overflow: document.documentElement.scrollWidth - window.innerWidth});
  document.body.appendChild(out);
});
</script>"""


def _in_browser(page: Path, tmp_path: Path) -> tuple[dict, str]:
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-zygote", "--single-process",
           "--window-size=1300,2600", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r"<pre id=\"check\">(.*?)</pre>", run.stdout, re.S)
    assert found, "the check script wrote nothing: " + run.stderr[-2000:]
    import html

    return json.loads(html.unescape(found.group(1))), run.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does it "
                                             "where apt is available): the report is not opened in a browser")
@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_every_figure_decodes_and_the_page_has_no_errors(reports, tmp_path, modality):
    page, text = reports[modality]
    check, log = _in_browser(page, tmp_path)
    assert len(check["images"]) == text.count("<img") == 3
    for alt, width, height, *err in check["images"]:
        assert width > 0 and height > 0, (alt, err)
    assert check["errors"] == []
    assert check["overflow"] <= 0  # nothing wider than the window
    console = [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
