"""Every Markdown table blindspot prints or writes, rendered in one place from the rows and summaries the run layer
builds (:mod:`blindspot.attacks.records`, :mod:`blindspot.runs.evaluate`, :mod:`blindspot.runs.lesions`, the audit).

The HTML report turns the same Markdown into HTML tables (:func:`blindspot.report.html.markdown_table_html`), so the
terminal, ``tables.md`` and ``report.html`` always agree.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from blindspot.attacks.records import IP_LABEL, setting_label
from blindspot.metrics import TABLE1_METRICS
from blindspot.physics.ct import WINDOWS
from blindspot.report.seed_paper import seed_table1, seed_table2

#: Table 1 (MRI): metric headers and digits.
MRI_HEADERS = {"ssim": "SSIM", "nmse": "NMSE", "psnr": "PSNR (dB)"}
MRI_DIGITS = {"ssim": 4, "nmse": 5, "psnr": 2}
#: Table 1 (CT): the display windows whose PSNR / SSIM are reported (DESIGN.md §1.4).
CT_WINDOWS: tuple[str, ...] = ("abdomen", "lung")

Summaries = Mapping[tuple[str, float, str], Mapping[str, Any]]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """A Markdown table: ``header`` cells, then one line per row (cells formatted with ``str``); ``title`` (a bold
    line, say) above it, separated by a blank line."""
    lines = [title, ""] if title else []
    lines.append("| " + " | ".join(str(h) for h in header) + " |")
    lines.append("|" + " --- |" * len(header))
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pct(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{100 * x:.2f}"


def _modality(summaries: Summaries) -> str:
    return next(iter(summaries.values()))["modality"] if summaries else "mri"


# ----------------------------------------------------------------------------------------------------------------
# Acquisition
# ----------------------------------------------------------------------------------------------------------------
#: Architectures that take the masked k-space and the mask (the others take the zero-filled image).
KSPACE_ARCHITECTURES: frozenset[str] = frozenset({"varnet"})


def acquisition_labels(settings: Mapping[str, Any], names: Sequence[str],
                       table1: Sequence[Mapping[str, Any]] = ()) -> dict[str, str]:
    """What each row's network was given, from an audit's ``results.json["settings"]``: MRI single-coil (zero-filled
    image) or multi-coil (coil count, the coil-map estimator of the attacks' acquisition, RSS image or k-space + mask
    for a k-space network); CT the dose of the low-dose input (from ``table1`` rows' ``dose`` or the settings).

    ``settings["acquisition"]`` (``{"coils": int, "coil_maps": str | None}``), where the run recorded it, is read
    first; without it the coil count is inferred (the audit records ``coil_maps`` only for multi-coil phantoms or
    for files, so for files whose coil count is unrecorded the label says "as the data files").
    Rows not among ``settings["models"]`` (the zero-filled / low-dose baselines) get the image-domain label.
    """
    archs = {m.get("name"): m.get("architecture") for m in settings.get("models", []) if isinstance(m, Mapping)}
    data = str(settings.get("data", ""))
    if settings.get("modality", "mri") == "ct":
        doses = sorted({float(r["dose"]) for r in table1 if r.get("dose") is not None})
        if not doses and settings.get("dose") is not None:
            doses = [float(settings["dose"])]
        dose = ", ".join(f"{100 * d:g}%" for d in doses) or "the checkpoint's"
        how = ("simulated in the projection domain" if data.startswith("built-in")
               else "the data's real low-dose series")
        return {n: f"CT, {dose} dose ({how})" for n in names}
    acq = settings.get("acquisition") or {}
    maps = acq.get("coil_maps", settings.get("coil_maps"))
    coils = acq.get("coils")
    if coils is None:
        coils = 1 if maps is None else ("multi" if data.startswith("built-in") else None)
    out = {}
    for n in names:
        kspace = archs.get(n) in KSPACE_ARCHITECTURES
        if coils == 1:
            out[n] = "single-coil, k-space + mask" if kspace else "single-coil, zero-filled image"
        elif coils is None:
            out[n] = f"as the data files (if multi-coil: maps {maps}, {'k-space + mask' if kspace else 'RSS image'})"
        else:
            count = f"{coils}-coil" if isinstance(coils, int) else "multi-coil"
            out[n] = f"{count}, maps {maps}, " + ("k-space + mask" if kspace else "RSS image")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Table 1
# ----------------------------------------------------------------------------------------------------------------
def table1_markdown(rows: Sequence[Mapping[str, Any]], title: str | None = None, per: str = "volume",
                    acquisition: Mapping[str, str] | None = None, seed: bool = False) -> str:
    """MRI Table 1 (the seed's layout): one block per acceleration, a row per model, ``mean ± std`` cells of SSIM,
    NMSE and PSNR; ``per`` is ``"volume"`` (fastMRI) or ``"slice"`` statistics. ``acquisition`` (model → label,
    :func:`acquisition_labels`) adds an "acquisition" column; ``seed`` adds the seed paper's SSIM and NMSE
    (:data:`blindspot.report.seed_paper.SEED_TABLE1`) for the rows it has."""
    suffix = "" if per == "volume" else "_slice"
    parts = [title, ""] if title else []
    for acc in dict.fromkeys(float(r["acceleration"]) for r in rows):
        block = [r for r in rows if float(r["acceleration"]) == acc]
        with_seed = seed and any(seed_table1(r["model"], acc) for r in block)
        body = []
        for r in block:
            cells = [r["model"], *([acquisition.get(r["model"], "—")] if acquisition else []),
                     *(f"{_fmt(r[f'{k}{suffix}_mean'], MRI_DIGITS[k])} ± {_fmt(r[f'{k}{suffix}_std'], MRI_DIGITS[k])}"
                       for k in TABLE1_METRICS)]
            if with_seed:
                ref = seed_table1(r["model"], acc)
                cells += [f"{ref[k][0]:.{MRI_DIGITS[k]}f} ± {ref[k][1]:.{MRI_DIGITS[k]}f}" if ref else "—"
                          for k in ("ssim", "nmse")]
            body.append(cells)
        header = [setting_label(acc), *(["acquisition"] if acquisition else []),
                  *(MRI_HEADERS[k] for k in TABLE1_METRICS),
                  *(["seed paper SSIM", "seed paper NMSE"] if with_seed else [])]
        parts.append(markdown_table(header, body))
    return "\n".join(parts)


def ct_table1_markdown(rows: Sequence[Mapping[str, Any]], acquisition: Mapping[str, str] | None = None) -> str:
    """CT Table 1: per model (and the low-dose input) RMSE in HU and windowed PSNR / SSIM, mean ± std over images;
    ``acquisition`` (model → label) adds an "acquisition" column."""
    header = ["model", *(["acquisition"] if acquisition else []), "RMSE (HU)"] + [
        f"{k} {w}" for w in CT_WINDOWS for k in ("PSNR (dB)", "SSIM")]
    body = []
    for r in rows:
        cells = [r["model"], *([acquisition.get(r["model"], "—")] if acquisition else []),
                 f"{r['rmse_hu_mean']:.1f} ± {r['rmse_hu_std']:.1f}"]
        for w in CT_WINDOWS:
            cells += [f"{r[f'psnr_{w}_mean']:.2f} ± {r[f'psnr_{w}_std']:.2f}",
                      f"{r[f'ssim_{w}_mean']:.4f} ± {r[f'ssim_{w}_std']:.4f}"]
        body.append(cells)
    dose = rows[0]["dose"] if rows else None
    title = (f"**{100 * dose:g}% dose** (against the full-dose image; windows: "
             + ", ".join(str(WINDOWS[w]) for w in CT_WINDOWS) + ")")
    return markdown_table(header, body, title)


# ----------------------------------------------------------------------------------------------------------------
# FNAF tables
# ----------------------------------------------------------------------------------------------------------------
def table2_markdown(summaries: Summaries, acquisition: Mapping[str, str] | None = None, seed: bool = True) -> str:
    """The seed's Table 2: per setting and model, each search's attack rate (%) with its 95% interval and its mean
    attack loss ("MSE"). ``summaries``: ``{(model, setting, search): summarize(...)}``. ``acquisition`` (model →
    label, :func:`acquisition_labels`) adds an "acquisition" column; with ``seed``, a setting where the seed paper
    has rows for these model names (:data:`blindspot.report.seed_paper.SEED_TABLE2`, MRI 4× / 8×) gets its RS / FD
    attack rates and MSE beside them."""
    searches = list(dict.fromkeys(s for _, _, s in summaries))
    models = list(dict.fromkeys(m for m, _, _ in summaries))
    modality = _modality(summaries)
    parts = []
    for acc in sorted({a for _, a, _ in summaries}):
        with_seed = seed and any(seed_table2(m, acc, modality) for m in models)
        header = (["model"] + (["acquisition"] if acquisition else [])
                  + [f"{s.upper()} (Attack Rate %)" for s in searches] + [f"{s.upper()} (MSE)" for s in searches]
                  + (["seed paper RS / FD (Attack Rate %)", "seed paper RS / FD (MSE)"] if with_seed else []))
        body = []
        for m in models:
            cells = [m] + ([acquisition.get(m, "—")] if acquisition else [])
            for s in searches:
                sm = summaries.get((m, acc, s))
                cells.append("—" if sm is None else f"{_pct(sm['attack_rate'])} ({_pct(sm['ci_low'])}–"
                                                     f"{_pct(sm['ci_high'])})")
            cells += ["—" if summaries.get((m, acc, s)) is None else f"{summaries[(m, acc, s)]['mean_attack_loss']:.6f}"
                      for s in searches]
            if with_seed:
                ref = seed_table2(m, acc, modality)
                cells += ([f"{100 * ref['rs'][0]:.2f} / {100 * ref['fd'][0]:.2f}",
                           f"{ref['rs'][1]:.6f} / {ref['fd'][1]:.6f}"] if ref else ["—", "—"])
            body.append(cells)
        parts.append(markdown_table(header, body, f"**{setting_label(acc, modality)}** (attack rate with its 95% "
                                                  "Wilson interval)"))
    return "\n".join(parts)


def ip_table_markdown(summaries: Summaries) -> str:
    """The seed's IP table: one column per (model, search, setting), rows "Acceptance Rate (%)" and the mean IP
    statistic ("IP Loss (MSE)" for MRI, the detectability d' for CT)."""
    cols = list(summaries)
    modality = _modality(summaries)
    digits = ".3g" if modality == "ct" else ".5f"
    names = [f"{m} {s.upper()} {setting_label(a, modality)}".strip() for m, a, s in cols]
    return markdown_table([""] + names, [
        ["Acceptance Rate (%)"] + [_pct(summaries[c]["ip_acceptance"]) for c in cols],
        [IP_LABEL.get(modality, "IP statistic")] + [format(summaries[c]["mean_ip_loss"], digits) for c in cols],
    ])


def ip_long_markdown(summaries: Summaries) -> str:
    """The IP table in long form: one row per model, setting and search (acceptance %, mean IP statistic)."""
    modality = _modality(summaries)
    digits = ".3g" if modality == "ct" else ".5f"
    header = ["model", "setting", "search", "Acceptance Rate (%)", IP_LABEL.get(modality, "IP statistic"), "images"]
    return markdown_table(header, [[m, setting_label(a, modality), s.upper(), f"{100 * sm['ip_acceptance']:.2f}",
                                    format(sm["mean_ip_loss"], digits), sm["n"]] for (m, a, s), sm in summaries.items()])


def saturation_markdown(summaries: Summaries) -> str:
    """How much of the seed criterion's verdict the network's own error explains: per model, setting and search, the
    share of images whose found feature's neighbourhood already reaches the threshold without the feature."""
    body = []
    for (m, a, s), sm in summaries.items():
        sat = sm.get("baseline_saturation", float("nan"))
        body.append([m, setting_label(a, sm["modality"]), s.upper(), "—" if not math.isfinite(sat) else f"{100 * sat:.1f}",
                     f"{sm.get('mean_baseline_loss', float('nan')):.5f}", f"{sm['mean_attack_loss']:.5f}",
                     f"{sm.get('loss_threshold', float('nan')):.5f}"])
    return markdown_table(["model", "setting", "search", "error alone at threshold (%)", "mean error alone",
                           "mean L_atk", "threshold"], body,
                          "**How much the network's own error decides the seed criterion** (share of images whose "
                          "found feature's neighbourhood T holds, without any feature, reconstruction error at the "
                          "threshold — there every feature counts as lost)")


def transfer_matrix_markdown(transfer: Sequence[Mapping[str, Any]], modality: str = "mri") -> str:
    """Transfer rates as one source × target matrix per setting; a cell lists each search's rate (%) and, in
    brackets, how many of the source's successful features were replayed."""
    parts = []
    for acc in dict.fromkeys(float(t["acceleration"]) for t in transfer):
        block = [t for t in transfer if float(t["acceleration"]) == acc]
        names = list(dict.fromkeys(n for t in block for n in (t["source"], t["target"])))
        sources = [n for n in names if any(t["source"] == n for t in block)]
        targets = [n for n in names if any(t["target"] == n for t in block)]
        body = []
        for src in sources:
            cells = [src]
            for tgt in targets:
                items = [t for t in block if t["source"] == src and t["target"] == tgt]
                cells.append("—" if not items else " · ".join(
                    f"{t['search'].upper()} " + ("—" if not math.isfinite(t["transfer_rate"])
                                                 else f"{100 * t['transfer_rate']:.0f}% ({t['n_matched']})")
                    for t in items))
            body.append(cells)
        parts.append(markdown_table(["source \\ target", *targets], body,
                                    f"**{setting_label(acc, modality)}** (source → target: share of the source's "
                                    "successful features that also fool the target)"))
    return "\n".join(parts)


def transfer_list_markdown(transfer: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """A replay run's transfer rates: ``{"4x": {search: transfer_rate(...) + source_model, target_model}}``."""
    body = [[a, s, f"{tr['source_model']} → {tr['target_model']}", f"{100 * tr['transfer_rate']:.2f}",
             f"[{100 * tr['ci_low']:.2f}, {100 * tr['ci_high']:.2f}]"]
            for a, per in transfer.items() for s, tr in per.items()]
    return markdown_table(["acceleration", "search", "source → target", "transfer rate (%)", "95% CI"], body)


def headline_markdown(headline: Sequence[Mapping[str, Any]], rate_fraction: float, ssim_tolerance: float,
                      nmse_tolerance: float) -> str:
    """The FNAF-robust training check (:func:`blindspot.runs.audit.robustness_headline` rows): per criterion and
    acceleration, each search's attack rate of the standard and the robust model with ✓ where it meets the seed's
    claim, and the SSIM / NMSE changes."""
    searches = list(dict.fromkeys(k[: -len("_ratio")] for h in headline for k in h if k.endswith("_ratio")))
    body = []
    for h in headline:
        cells = [("—" if f"{s}_rate" not in h else
                  f"{100 * h[f'{s}_rate']:.1f}% → {100 * h[f'{s}_robust_rate']:.1f}% {'✓' if h[f'{s}_meets'] else '✗'}")
                 for s in searches]
        dssim, dnmse = h.get("ssim_diff", float("nan")), h.get("nmse_rel_change", float("nan"))
        body.append([f"{h['robust']} vs {h['model']}", h.get("criterion", ""), h["acceleration"], *cells,
                     f"{dssim:+.4f} {'✓' if h.get('ssim_within') else '✗'}",
                     f"{100 * dnmse:+.1f}% {'✓' if h.get('nmse_within') else '✗'}"])
    return markdown_table(["models", "criterion", "acceleration", *(s.upper() for s in searches), "SSIM change",
                           "NMSE change"], body,
                          f"(✓: the robust model's attack rate is at most {rate_fraction:.3g} of the standard one's; "
                          f"SSIM may be at most {ssim_tolerance} lower and NMSE at most {100 * nmse_tolerance:.0f}% "
                          "higher)")


# ----------------------------------------------------------------------------------------------------------------
# Lesions
# ----------------------------------------------------------------------------------------------------------------
def lesion_summary_markdown(summary: Mapping[str, Any], rule_text: str, title: str | None = None,
                            with_rule: bool = True) -> str:
    """The lesion tables (:func:`blindspot.runs.lesions.summarize_rows`' dict): preserved / total per model (rows) and
    label (columns), the rule (unless ``with_rule`` is false: a page that states it once), then mean kept fraction
    and box / region SSIM and region PSNR per model."""
    table = summary["preserved"]
    labels = list(dict.fromkeys(lab for v in table.values() for lab in v if lab != "all")) + ["all"]
    counts = markdown_table(["model", *labels], [
        [model, *(f"{cells[lab]['preserved']}/{cells[lab]['total']}" if lab in cells else "–" for lab in labels)]
        for model, cells in table.items()], title)
    means = markdown_table(["model", "mean kept fraction", "mean SSIM (box)", "mean SSIM (region)",
                            "mean PSNR (region, dB)"],
                           [[model, f"{m['kept']:.3f}", f"{m['ssim_box']:.4f}", f"{m['ssim_region']:.4f}",
                             f"{m['psnr_region']:.2f}"] for model, m in summary["mean"].items()])
    return counts + (f"\nRule: {rule_text}.\n\n" if with_rule else "\n") + means


# ----------------------------------------------------------------------------------------------------------------
# Invariances
# ----------------------------------------------------------------------------------------------------------------
def invariance_markdown(summary: Mapping[str, Mapping[str, float]]) -> str:
    """Per model, the mean change of the input (HU), of the output (HU) and their ratio over its invariances."""
    return markdown_table(["model", "mean \\|x_inv − x\\| (HU)", "mean \\|f(x_inv) − f(x)\\| (HU)",
                           "output / input change"],
                          [[m, f"{v.get('mean_abs_change', float('nan')):.1f}",
                            f"{v.get('output_mean_abs_change', float('nan')):.2f}",
                            f"{v.get('change_ratio', float('nan')):.3f}"] for m, v in summary.items()])
