"""The figure the audit report opens with: every network's FNAF attack rates with their 95% intervals, per setting
and criterion, each network beside its FNAF-robust counterpart, and the seed paper's rates where it has them.

One panel per (setting, criterion): a row per network (``X`` directly above ``FNAF-robust X``, the pair on a shaded
band), a dot per search (RS, FD, gradient) at its attack rate with a horizontal line for its 95% Wilson interval, and
an open diamond at the seed paper's rate for the same network, setting and search
(:data:`blindspot.report.seed_paper.SEED_TABLE2`: MRI, U-Net / I-RIM / FNAF-robust U-Net, 4× and 8×, RS and FD).
Drawn with a private matplotlib ``Figure`` (Agg, no global state); written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from blindspot.attacks.records import setting_label
from blindspot.errors import PathLike
from blindspot.report.png import new_figure, save_png
from blindspot.report.seed_paper import SEED_CITATION, seed_table2

#: Colour of each search's marks.
SEARCH_COLOURS = {"rs": "#1f77b4", "fd": "#d62728", "grad": "#2ca02c"}
ROBUST_PREFIX = "FNAF-robust "

# {criterion: {model: {setting key "4x": {search: summary (attack_rate, ci_low, ci_high, n, …)}}}}
RatesByCriterion = Mapping[str, Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]]


def paired_order(models: Sequence[str]) -> list[str]:
    """``models`` with every ``FNAF-robust X`` moved right after ``X`` (other order kept)."""
    out: list[str] = []
    for m in models:
        if m in out:
            continue
        if m.startswith(ROBUST_PREFIX) and m[len(ROBUST_PREFIX):] in models:
            continue  # placed right after its standard model
        out.append(m)
        if ROBUST_PREFIX + m in models:
            out.append(ROBUST_PREFIX + m)
    return out + [m for m in models if m not in out]


def _setting_value(key: str) -> float:
    return float(str(key).rstrip("x"))


def attack_rate_figure(rates: RatesByCriterion, path: PathLike, modality: str = "mri") -> Path:
    """Draw the report's opening figure (see the module docs) and write it as PNG.

    Args:
        rates: ``results.json["attack_rates_by_criterion"]``.
        path: the PNG to write.
        modality: ``mri`` (the seed paper's rates are drawn where it has them) or ``ct`` (no published rates).
    """
    from matplotlib.lines import Line2D

    criteria = list(rates)
    models = paired_order(list(dict.fromkeys(m for per in rates.values() for m in per)))
    settings = list(dict.fromkeys(k for per in rates.values() for m in per.values() for k in m))
    searches = list(dict.fromkeys(s for per in rates.values() for m in per.values() for k in m.values() for s in k))
    rows, cols = max(1, len(settings)), max(1, len(criteria))
    fig = new_figure(5.3 * cols, 0.62 * max(1, len(models)) * rows + 1.35)
    if not models or not settings:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no attack results", ha="center", va="center")
        return save_png(fig, path)
    grid = fig.subplots(rows, cols, squeeze=False, sharex=True)
    step = 0.62 / max(1, len(searches))
    offsets = {s: (i - (len(searches) - 1) / 2) * step for i, s in enumerate(searches)}
    seed_shown = False
    for i, key in enumerate(settings):
        for j, criterion in enumerate(criteria):
            ax = grid[i][j]
            per_model = rates[criterion]
            labels = []
            for y, m in enumerate(models):
                if m.startswith(ROBUST_PREFIX) and y > 0 and models[y - 1] == m[len(ROBUST_PREFIX):]:
                    ax.axhspan(y - 1.45, y + 0.45, color="#eef1f5", zorder=0)
                cell = per_model.get(m, {}).get(key, {})
                n = max((int(sm.get("n", 0)) for sm in cell.values()), default=0)
                labels.append(f"{m}\n(n = {n})" if cell else f"{m}\n(not attacked)")
                seed = seed_table2(m, _setting_value(key), modality) or {}
                for s in searches:
                    yy = y + offsets[s]
                    colour = SEARCH_COLOURS.get(s, "0.3")
                    sm = cell.get(s)
                    if sm is not None and _finite(sm.get("attack_rate")):
                        lo, hi = 100 * float(sm.get("ci_low", math.nan)), 100 * float(sm.get("ci_high", math.nan))
                        if _finite(lo) and _finite(hi):
                            ax.plot([lo, hi], [yy, yy], color=colour, lw=1.6, solid_capstyle="butt", zorder=2)
                        ax.plot(100 * float(sm["attack_rate"]), yy, "o", color=colour, ms=5.5, zorder=3)
                    if s in seed:
                        seed_shown = True
                        ax.plot(100 * seed[s][0], yy, "D", mfc="white", mec=colour, mew=1.4, ms=6, zorder=4)
            ax.set_yticks(range(len(models)), labels, fontsize=8)
            ax.set_ylim(len(models) - 0.5, -0.5)
            ax.set_xlim(-3, 103)
            ax.set_xticks([0, 25, 50, 75, 100])
            ax.grid(axis="x", color="0.88", lw=0.8)
            ax.set_axisbelow(True)
            ax.tick_params(axis="x", labelsize=8)
            ax.set_title(f"{setting_label(_setting_value(key), modality)} · {criterion} criterion", fontsize=9.5)
            if i == rows - 1:
                ax.set_xlabel("attack rate (%) — lower is better", fontsize=8.5)
    handles = [Line2D([], [], color=SEARCH_COLOURS.get(s, "0.3"), marker="o", lw=1.6, ms=5,
                      label=f"{s.upper()} (95% interval)") for s in searches]
    if seed_shown:
        handles.append(Line2D([], [], ls="none", marker="D", mfc="white", mec="0.2", mew=1.4, ms=6,
                              label=f"seed paper ({SEED_CITATION}; its criterion, fastMRI knee)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    return save_png(fig, path)


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False

