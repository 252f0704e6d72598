"""The audit's report: one self-contained HTML page (tables, figures embedded as base64 PNG, no external resources,
no scripts), and the audit's own figure, the qualitative grid.

:func:`render_audit_report` takes the ``results.json`` dict that :func:`blindspot.runs.audit.run_audit` writes and the
list of figures, and writes ``report.html`` atomically. The page opens with what a reader decides on — the attack-rate
figure (:func:`blindspot.report.summary_figure.attack_rate_figure`, with the seed paper's rates) and Table 1 — and
puts the details below, the long ones in ``<details>`` blocks. :func:`markdown_table_html` turns the Markdown tables the
other modules produce into HTML tables, so the page and the terminal show the same numbers.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from blindspot import __version__
from blindspot.attacks.fnaf import CRITERION_TEXT
from blindspot.attacks.records import setting_label
from blindspot.report.seed_paper import SEED_CITATION, SEED_LESIONS, SEED_SETTING, seed_table2
from blindspot.report.summary_figure import ROBUST_PREFIX, attack_rate_figure
from blindspot.report.tables import (acquisition_labels, ct_table1_markdown, invariance_markdown,
                                     lesion_summary_markdown, saturation_markdown, table1_markdown, table2_markdown)
from blindspot.errors import PathLike
from blindspot.fileio import atomic_write_text
from blindspot.report.png import new_figure, png_data_uri, save_png

_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,'DejaVu Sans',Arial,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:28px 36px 60px;background:#fff;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:26px;margin:0 0 4px} h2{font-size:20px;margin:34px 0 8px;border-bottom:2px solid #e3e6eb;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px;color:#36415a}
p,li{line-height:1.5;font-size:14px} .muted{color:#667085;font-size:13px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid #d8dce3;padding:4px 9px;text-align:right;white-space:nowrap}
th{background:#eef1f5;text-align:center;white-space:normal;min-width:60px} .tw{overflow-x:auto}
td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafbfc}
.verdict{border-radius:6px;padding:10px 14px;margin:10px 0;font-size:14px}
.ok{background:#e8f5ec;border:1px solid #9ed3ad} .bad{background:#fdecec;border:1px solid #f0a8a8}
.partial{background:#fff6e0;border:1px solid #e8c872}
.grid{display:flex;flex-wrap:wrap;gap:14px} figure{margin:6px 0;flex:0 1 auto}
figure img{max-width:100%;border:1px solid #e3e6eb} figcaption{font-size:12px;color:#475467;margin-top:3px}
.wide img{max-width:100%} .small img{width:360px}
code{background:#f1f3f6;padding:1px 4px;border-radius:3px;font-size:12.5px}
.lede{font-size:15px;max-width:980px} figure.summary{margin:10px 0 4px} figure.summary img{width:100%;border:0}
figure.summary figcaption{font-size:13px;max-width:1060px}
details{margin:6px 0 10px;border:1px solid #e3e6eb;border-radius:6px;padding:4px 12px}
details[open]{padding-bottom:8px} summary{cursor:pointer;font-size:14px;color:#36415a;padding:4px 0}
"""


def markdown_table_html(md: str) -> str:
    """Markdown (tables, ``**bold**`` lines, plain lines) → HTML; cells are escaped (``\\|`` is a ``|`` inside a
    cell)."""
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if not rows:
            return
        head, body = rows[0], [r for r in rows[1:] if not all(re.fullmatch(r"\s*-+\s*", c) for c in r)]
        out.append("<div class='tw'><table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head)
                   + "</tr></thead><tbody>")
        out.extend("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
        out.append("</tbody></table></div>")
        rows.clear()

    for line in md.splitlines():
        s = line.strip()
        if s.startswith("|"):  # cells split on unescaped pipes; \| is a literal |
            cells = re.split(r"(?<!\\)\|", s[1:-1] if s.endswith("|") and not s.endswith("\\|") else s[1:])
            rows.append([c.strip().replace("\\|", "|") for c in cells])
            continue
        flush()
        if s:
            out.append(f"<h3>{_inline(s)}</h3>" if s.startswith("**") else f"<p>{_inline(s)}</p>")
    flush()
    return "\n".join(out)


def _inline(text: str) -> str:
    t = html.escape(text)
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)


def _pct(x: Any) -> str:
    return "—" if x is None or not math.isfinite(float(x)) else f"{100 * float(x):.1f}%"


def _verdicts(headline: Sequence[Mapping[str, Any]]) -> str:
    """The FNAF-robust training check, one line per (criterion, model, acceleration): rates, which searches meet the
    seed's claim (:func:`blindspot.runs.audit.robustness_headline`) and the SSIM / NMSE changes."""
    parts = []
    for h in headline:
        searches = [k[: -len("_ratio")] for k in h if k.endswith("_ratio")]
        cells = ", ".join(f"{s.upper()} {_pct(h[f'{s}_rate'])} → {_pct(h[f'{s}_robust_rate'])}" for s in searches)
        met = [s.upper() for s in h.get("searches_met", [])]
        not_met = [s.upper() for s in h.get("searches_not_met", [])]
        dssim = h.get("ssim_diff", float("nan"))
        dnmse = h.get("nmse_rel_change", float("nan"))
        quality = bool(h.get("ssim_within")) and bool(h.get("nmse_within"))
        ok = bool(met) and not not_met and quality
        cls = "ok" if ok else ("partial" if met and quality else "bad")
        rate_claim = (f"rate at most a third for {', '.join(met)}" + (f", not for {', '.join(not_met)}" if not_met else "")
                      if met else f"rate at most a third for none of {', '.join(not_met)}")
        qual_claim = (f"SSIM {'at most' if h.get('ssim_within') else 'more than'} 0.01 lower, NMSE "
                      f"{'at most' if h.get('nmse_within') else 'more than'} 5% higher")
        parts.append(
            f"<div class='verdict {cls}'><b>{html.escape(h['robust'])} vs {html.escape(h['model'])}, "
            f"{html.escape(setting_label(float(str(h['acceleration']).rstrip('x'))))}, "
            f"{html.escape(str(h.get('criterion', '')))} criterion</b>: attack "
            f"rate {cells}; SSIM change {dssim:+.4f}, NMSE change {100 * dnmse:+.1f}%. Seed's claim: "
            f"{rate_claim}; {qual_claim}.</div>"
        )
    return "\n".join(parts)


def _figure_html(items: Sequence[tuple[str, str, Path]], cls: str) -> str:
    return "<div class='grid'>" + "".join(
        f"<figure class='{cls}'><img alt='{html.escape(c)}' src='{png_data_uri(p)}'><figcaption>{html.escape(c)}"
        f"</figcaption></figure>" for _, c, p in items) + "</div>" if items else "<p class='muted'>none</p>"


def _collapsible(summary: str, body: str, open_: bool = False) -> str:
    """A ``<details>`` block (``summary`` is HTML)."""
    return f"<details{' open' if open_ else ''}><summary>{summary}</summary>\n{body}\n</details>"


def _summaries_of(per_model: Mapping[str, Any]) -> dict[tuple[str, float, str], Mapping[str, Any]]:
    """``results["attack_rates_by_criterion"][criterion]`` → the ``{(model, setting, search): summary}`` the table
    functions take."""
    return {(m, float(str(a).rstrip("x")), s): sm for m, per in per_model.items() for a, ps in per.items()
            for s, sm in ps.items()}


def _folded_section(section: str) -> str:
    """A self-contained ``<section>`` whose heading stays visible and whose body folds away (as it is, when it is not
    ``<section …><h2>…</h2>…</section>``)."""
    m = re.fullmatch(r"\s*(<section[^>]*>)\s*(<h2[^>]*>.*?</h2>)(.*)(</section>)\s*", section, re.S)
    if not m:
        return section
    return m.group(1) + m.group(2) + _collapsible("Details", m.group(3)) + m.group(4)


def render_audit_report(path: PathLike, results: Mapping[str, Any], md_tables: Mapping[str, str],
                        figures: Sequence[tuple[str, str, Path]] = (), sections: Sequence[str] = (),
                        extra_sections: Sequence[str] = ()) -> Path:
    """Write the self-contained audit report.

    The page opens with what a decision needs in a minute: one figure (:func:`attack_rate_figure`: every network's
    attack rates with their 95% intervals per setting and criterion, beside its FNAF-robust counterpart and the seed
    paper's rates) and Table 1 (with the acquisition each row used and the seed paper's numbers); the details —
    the robust-training verdicts, Table 2 (with the seed paper's rates), IP, transferability, figures, lesions,
    invariances — follow, the long ones collapsible. The opening figure is also written to
    ``figures/attack_rates.png`` beside the report.

    Args:
        path: the ``report.html`` to write.
        results: the dict written to ``results.json`` (``settings``, ``attack_rates``, ``headline``, ``timings_s``…).
        md_tables: Markdown of ``table1``; ``table2``, ``ip`` and ``transfer`` are ``{criterion: markdown}`` (Table 1
            and Table 2 are re-rendered from ``results`` with the acquisition and seed columns when it has them).
        figures: ``(kind, caption, png path)``; kinds ``qualitative``, ``scatter``, ``heatmap``, ``worst``.
        sections: self-contained HTML sections (the invariance runs' ``section.html``) shown under "Invariances".
        extra_sections: further self-contained ``<section>``s with their own ``<h2>`` (e.g. the beyond-the-seed
            sections), placed after the invariances, each body folded under its heading.
    """
    path = Path(path)
    st = results.get("settings", {})
    models = ", ".join(html.escape(m["name"]) for m in st.get("models", []))
    criteria = list(results.get("criteria", []))
    ct = results.get("modality", st.get("modality", "mri")) == "ct"
    modality = "ct" if ct else "mri"
    rates_by = results.get("attack_rates_by_criterion", {})
    t1_rows = list(results.get("table1", []))
    acquisition = acquisition_labels({**st, "modality": modality}, [r["model"] for r in t1_rows]
                                     + [m["name"] for m in st.get("models", [])], t1_rows)

    # ---- the opening figure ----------------------------------------------------------------------------------------
    opening = "<p class='muted'>No attack results.</p>"
    names = {m for per in rates_by.values() for m in per}
    pair_note = ("; each network sits directly above its FNAF-robust counterpart (shaded pair)"
                 if any(m.startswith(ROBUST_PREFIX) and m[len(ROBUST_PREFIX):] in names for m in names) else "")
    if rates_by:
        fig_path = attack_rate_figure(rates_by, path.parent / "figures" / "attack_rates.png", modality)
        seed_note = ("No published attack rates exist for CT denoisers (the CT source document reconstructs "
                     "invariances; it reports no FNAF rates), so no seed-paper marks are drawn." if ct else
                     f"◇: the seed paper's rate for the same network, setting and search ({SEED_CITATION}: "
                     f"{SEED_SETTING}; RS and FD, for its U-Net, I-RIM and FNAF-robust U-Net)"
                     + ("" if any(seed_table2(m, float(str(a).rstrip("x"))) for per in rates_by.values()
                                  for m, pm in per.items() for a in pm)
                        else " — none of these networks is one of the seed's, so none is drawn") + ".")
        opening = (f"<figure class='summary'><img alt='Attack rates per network, setting and criterion' "
                   f"src='{png_data_uri(fig_path)}'><figcaption>Attack rate of each search (dot) with its 95% Wilson "
                   f"interval (line) over n images, per setting (rows) and criterion (columns)"
                   f"{pair_note}. {html.escape(seed_note)} Lower is better.</figcaption></figure>")

    def per_criterion(key: str, empty: str, render=None) -> str:
        parts = []
        for c in criteria:
            md = render(c) if render is not None else md_tables.get(key, {}).get(c, "")
            body = markdown_table_html(md)
            parts.append(f"<h3 class='criterion'>{html.escape(c)} criterion: {html.escape(CRITERION_TEXT[c])}</h3>"
                         + (body or f"<p class='muted'>{empty}</p>"))
        return "\n".join(parts)

    def table2_of(criterion: str) -> str:
        summaries = _summaries_of(rates_by.get(criterion, {}))
        if not summaries:
            return md_tables.get("table2", {}).get(criterion, "")
        rows = {m for m, _, _ in summaries}
        varies = len({acquisition.get(m) for m in rows}) > 1  # one acquisition for all: said once, above
        return table2_markdown(summaries, acquisition=acquisition if varies else None)

    def saturation_of(criterion: str) -> str:
        summaries = _summaries_of(rates_by.get(criterion, {}))
        return saturation_markdown(summaries) if criterion == "seed" and summaries else ""

    t = results.get("timings_s", {})
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in t.items())
    ip_note = ("its detectability d' in the low-dose input (‖FBP(P(δ))‖ / noise σ) reaches 5, the Rose criterion"
               if ct else "it is still in the measurements (IP loss &gt; 1e-4)")
    thr_note = ("Each criterion is attacked on its own (its searches maximise what it measures). <b>seed</b>: a "
                "feature is <i>lost</i> when the attack loss <code>L_atk</code> (mean squared error of the "
                "normalised output against the normalised truth-with-feature, on the feature's neighbourhood "
                "T, averaged over the whole image) reaches the seed's 1e-3 at 320×320, scaled by 320²/(h·w) for "
                "other sizes. That loss also counts the network's own error around the feature, so the table under "
                "it says how often that error alone reaches the threshold. <b>recovery</b>: lost when the change of "
                "the output keeps less than half of the feature's energy in T, whatever the network's "
                f"error without the feature. Under both, a lost feature counts as an <i>attack</i> only when {ip_note}. "
                "The attack rate is the share of images with such a feature, with its 95% Wilson interval."
                + ("" if ct else " The seed paper's columns are its published rates and mean attack losses "
                   f"({SEED_CITATION}, {SEED_SETTING}), the same beside both criteria: a reference point measured "
                   "on other data, not a result of this run."))
    if ct:
        doses = {r.get("dose") for r in t1_rows if r.get("dose")}
        settings_line = "dose " + ", ".join(f"{100 * float(d):g}%" for d in sorted(doses))
        intro = ("The FNAF attack adds a small, low-contrast feature (in HU) to the full-dose image, simulates the "
                 "low-dose acquisition through the projection domain, and asks whether each denoiser's output keeps "
                 "it. The share of images where some feature is lost — although it is still detectable above the "
                 "low-dose input's noise — is the attack rate: lower is better.")
        t1_title, t1_note = "Table 1: denoising quality", (
            "Mean ± standard deviation over images against the full-dose image, on the same low-dose inputs the "
            "attacks use; PSNR and SSIM of windowed images (data range 1). The seed paper has no CT numbers.")
        t1_md = ct_table1_markdown(t1_rows, acquisition) if t1_rows else md_tables.get("table1", "")
        ip_text = ("Acceptance rate: share of the chosen features detectable in the low-dose input (d' ≥ 5); "
                   "d': the feature's matched-filter signal-to-noise ratio there.")
        q_text = "Columns: the low-dose input, the truth with the feature (outlined neighbourhood T), then each " \
                 "denoiser's output"
    else:
        settings_line = "accelerations: " + ", ".join(f"{a:g}×" for a in st.get("accelerations", []))
        intro = ("The FNAF attack adds a small, real-looking feature to the true image and asks whether each "
                 "network's reconstruction keeps it. The share of images where some feature is lost — although the "
                 "under-sampled measurements still carry it — is the attack rate: lower is better.")
        t1_title, t1_note = "Table 1: reconstruction quality", (
            "Per-volume mean ± standard deviation (fastMRI definitions; data range = each volume's maximum). "
            f"Seed paper: {SEED_CITATION}, {SEED_SETTING.split(', the seed')[0]} — a reference point, not the same "
            "data.")
        t1_md = (table1_markdown(t1_rows, acquisition=acquisition, seed=True) if t1_rows
                 else md_tables.get("table1", ""))
        ip_text = ("Acceptance rate: share of the chosen features still present in the measurements (IP loss &gt; "
                   "ε); IP loss: mean squared difference of the normalised perturbed and clean zero-filled inputs.")
        q_text = "Columns: the zero-filled input, the truth with the feature (outlined neighbourhood T), then each " \
                 "model's reconstruction"
    acq_values = list(dict.fromkeys(acquisition.values()))
    acq_line = ("acquisition: " + "; ".join(acq_values)) if len(acq_values) == 1 else "acquisition: per row"
    inv_names = list(results.get("invariances", {}))
    if len(inv_names) != len(sections):
        inv_names = [f"model {i + 1} of {len(sections)}" for i in range(len(sections))]
    invariance_html = "" if not sections else (
        "<h2>Invariances</h2><p class='muted'>Large changes of each denoiser's low-dose input that leave its output "
        "(nearly) unchanged, found by image-domain optimisation (the CT source document's method: distance MSE, "
        "α = 0.01, a short Adam budget); mean input and output changes in HU per model, then each run's details.</p>"
        + markdown_table_html(invariance_markdown(results.get("invariances", {})))
        + "\n".join(_collapsible(f"Details: {html.escape(n)}", s) for n, s in zip(inv_names, sections)))
    headline = results.get("headline", [])
    verdicts = "" if not headline else (
        "<h2>FNAF-robust training against the seed's claim</h2><p class='muted'>The seed's claim: the FNAF-robust "
        "network's attack rate is at most a third of the standard one's, with SSIM at most 0.01 lower (and NMSE at "
        "most 5% higher). Green: met for every search; amber: for some; red: for none or at a quality cost.</p>"
        + _collapsible(f"{sum(1 for h in headline if h.get('searches_met'))} of {len(headline)} comparisons meet the "
                       "rate claim for some search", _verdicts(headline), open_=True))
    kinds = {k: [f for f in figures if f[0] == k] for k in ("qualitative", "scatter", "heatmap", "worst")}
    body = f"""
<h1>blindspot audit</h1>
<p class="muted">blindspot {html.escape(__version__)} · models: {models} · data: {html.escape(str(st.get('data', '')))}
 · {settings_line} · {html.escape(acq_line)} · feature family
 {html.escape(str(st.get('family') or ('disc' if ct else 'walk')))} · criteria {html.escape(', '.join(criteria))}</p>
<p class="lede">{intro}</p>
{opening}
<h2>{t1_title}</h2>
<p class="muted">{t1_note}</p>
{markdown_table_html(t1_md)}
{verdicts}
<h2>Table 2: FNAF attack rates</h2>
<p class="muted">{thr_note}</p>
{per_criterion('table2', 'none', table2_of)}
{_collapsible("How much the network's own error decides the seed criterion (error alone at threshold)",
              per_criterion('saturation', 'none', saturation_of)) if 'seed' in criteria and rates_by else ''}
<h2>Information preservation</h2>
<p class="muted">{ip_text}</p>
{_collapsible("IP tables, per criterion", per_criterion('ip', 'none'))}
<h2>Transferability</h2>
<p class="muted">Features that fooled the source model, replayed on the target: the share that fool it too.</p>
{_collapsible("Transfer matrices, per criterion and setting", per_criterion('transfer', 'none'))
 if results.get('transfer') else "<p class='muted'>not computed (one model, or --no-transfer)</p>"}
<h2>Qualitative results</h2>
<p class="muted">{q_text}; rows: a failed and a successful attack. Figures show the features found under the
{html.escape(criteria[0] if criteria else '')} criterion.</p>
{_figure_html(kinds['qualitative'], 'wide')}
<h2>Attack loss vs IP statistic, where attacks succeed, worst cases</h2>
{"".join(_collapsible(f"{title} ({len(kinds[k])} figures)", _figure_html(kinds[k], cls)) for k, title, cls in (
    ("scatter", "Attack loss vs IP statistic", "small"), ("heatmap", "Where attacks succeed", "small"),
    ("worst", "Worst cases", "wide")) if kinds[k]) or "<p class='muted'>none</p>"}
{invariance_html}
{"".join(_folded_section(x) for x in extra_sections)}
{lesion_section_html(results.get('lesions'), figures)}
<h2>Run</h2>
<p class="muted">Timings: {html.escape(timing)}. Files beside this report: <code>results.json</code>,
<code>table1.csv</code>, <code>table2.csv</code>, <code>ip_table.csv</code>, <code>transfer.csv</code>,
<code>records.csv</code>, <code>features/</code>, <code>figures/</code>.</p>
"""
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>blindspot audit</title>"
            f"<style>{_CSS}</style></head><body><main>{body}</main></body></html>\n")
    return atomic_write_text(path, page)


# ----------------------------------------------------------------------------------------------------------------
def qualitative_grid(examples: Mapping[str, Mapping[str, Mapping[str, Any]]], model_names: Sequence[str],
                     path: PathLike, title: str = "", input_label: str = "zero-filled input") -> Path:
    """The seed's qualitative figure: per example row, the network input (``input_label``: zero-filled or low-dose),
    truth with the feature, and every model's output (all normalised, one grey scale per row), the feature's
    neighbourhood ``T`` outlined.

    Args:
        examples: row name (e.g. ``"failed attack"``) → model name → the dict of
            :func:`blindspot.attacks.search.example_images` (CPU ``(h, w)`` tensors ``input``, ``truth``, ``output``,
            ``T`` and the numbers ``attack_loss``, ``ip_loss``).
        model_names: column order.
    """
    names = list(examples)
    ncol = 2 + len(model_names)
    fig = new_figure(2.25 * ncol, 2.45 * max(1, len(names)) + 0.4)
    grid = fig.subplots(max(1, len(names)), ncol, squeeze=False)
    for i, name in enumerate(names):
        per = examples[name]
        first = per[model_names[0]]
        arr = {k: np.asarray(first[k], dtype=np.float32) for k in ("input", "truth", "T")}
        lo, hi = float(min(arr["truth"].min(), arr["input"].min())), float(arr["truth"].max())
        if first.get("display") is not None:  # a display window (CT: abdomen), in the same normalised units
            lo, hi = (float(v) for v in np.asarray(first["display"], dtype=np.float32).reshape(2))
        cols = [(input_label, arr["input"], None), ("truth with feature", arr["truth"], None)]
        for m in model_names:
            e = per[m]
            lost = float(e["attack_loss"])
            cols.append((m, np.asarray(e["output"], dtype=np.float32), lost))
        for j, (head, img, lost) in enumerate(cols):
            ax = grid[i][j]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            if arr["T"].any():
                ax.contour(arr["T"], levels=[0.5], colors="#ff4d4d", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(head, fontsize=8)
            if lost is not None:
                ax.set_xlabel(f"L_atk={lost:.3g}", fontsize=7)
        grid[i][0].set_ylabel(f"{name}\n{first.get('key', '')}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_png(fig, path)


def lesion_section_html(lesions: Mapping[str, Any] | None, figures: Sequence[tuple[str, str, Path]] = ()) -> str:
    """The report's "Lesions" section (empty without boxes): the preservation rule, "preserved / total" per model
    and label at each acceleration (:func:`blindspot.report.tables.lesion_summary_markdown` of ``results["lesions"]``, the
    terminal's tables) and the ``"lesion"`` crop figures."""
    if not lesions:
        return ""
    rule = lesions["rule"]
    labels = ", ".join(f"{n} {lab}" for lab, n in lesions.get("labels", {}).items())
    tables = "\n".join(markdown_table_html(lesion_summary_markdown(
        per, rule["text"], f"**{per['acceleration']:g}×** (centre fraction {per['center_fraction']:g})",
        with_rule=False))
        for per in lesions["by_acceleration"].values())
    items = [f for f in figures if f[0] == "lesion"]
    seed_lesions = "; ".join(f"{m} " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in per.items())
                             for m, per in SEED_LESIONS.items())
    figs = ("<div class='grid'>" + "".join(
        f"<figure class='wide'><img alt='{html.escape(c)}' src='{png_data_uri(p)}'><figcaption>{html.escape(c)}"
        f"</figcaption></figure>" for _, c, p in items) + "</div>") if items else "<p class='muted'>none</p>"
    return f"""<h2>Lesions</h2>
<p>Every annotated lesion (a box on one slice of {html.escape(str(lesions.get('data', '')))}, boxes from
<code>{html.escape(str(lesions.get('boxes', '')))}</code>: {lesions.get('lesions', 0)} lesions —
{html.escape(labels)} — on {lesions.get('slices', 0)} slices of {lesions.get('volumes', 0)} volumes) is scored on each model's reconstruction
and on the zero-filled input, under the same seeded masks as <code>blindspot lesions</code>.</p>
<p><b>Preservation rule</b>: {html.escape(rule['text'])}.</p>
<p class="muted">Seed paper ({SEED_CITATION}, real lesions on fastMRI knee, as a reference):
{html.escape(seed_lesions)}.</p>
<p class="muted">Cells: lesions preserved / total, by label; below each table the mean kept contrast fraction and the
SSIM / PSNR in the box and its surroundings. Per-lesion scores: <code>lesions.csv</code>.</p>
{tables}
{_collapsible(f"Lesion crops ({len(items)} figures): zero-filled input, truth and each model's reconstruction "
              "around the box (yellow), one grey scale per lesion", figs)}
"""
