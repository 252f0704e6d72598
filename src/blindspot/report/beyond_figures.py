"""Figures and HTML fragments of the sections beyond the seeds (:mod:`blindspot.runs.beyond`): hallucination maps,
worst-case error-amplification curves, false-positive success curves and sampling-rate stability curves.

Every function takes plain summary rows (dicts) or CPU arrays, draws on a private matplotlib ``Figure`` (Agg, no
pyplot state) and writes its PNG atomically; :func:`section_html` makes a self-contained ``<section>`` (figures as
data URIs) for the audit report.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from blindspot.errors import PathLike
from blindspot.report.html import markdown_table_html
from blindspot.report.png import new_figure, png_data_uri, save_empty, save_png

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


def _models(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r["model"]) for r in rows))


def amplification_curves(summary: Sequence[Mapping[str, Any]], path: PathLike, title: str = "",
                         error_unit: str = "relative l2 error") -> Path:
    """Reconstruction error against the relative budget ε: PGD worst case (solid) and random perturbations of the same
    norm (dashed) per model, from ``ε = 0`` (the clean error).

    Args:
        summary: rows ``model, budget, error_clean, error_pgd, error_random`` (means over images) of one setting.
    """
    fig = new_figure(5.2, 3.6)
    ax = fig.add_subplot()
    for k, m in enumerate(_models(summary)):
        rs = sorted((r for r in summary if r["model"] == m), key=lambda r: float(r["budget"]))
        x = [0.0] + [float(r["budget"]) for r in rs]
        c = _COLORS[k % len(_COLORS)]
        ax.plot(x, [float(rs[0]["error_clean"])] + [float(r["error_pgd"]) for r in rs], "-o", color=c, ms=3,
                label=f"{m}: PGD worst case")
        ax.plot(x, [float(rs[0]["error_clean"])] + [float(r["error_random"]) for r in rs], "--", color=c,
                label=f"{m}: random, same norm")
    ax.set_xlabel("budget ε (‖e‖ / measurement scale)")
    ax.set_ylabel(error_unit)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5)
    if title:
        ax.set_title(title, fontsize=9)
    return save_png(fig, path)


def success_curves(summary: Sequence[Mapping[str, Any]], path: PathLike, title: str = "") -> Path:
    """False-positive attack rate (share of images whose feature appears) against the budget, per model.

    Args:
        summary: rows ``model, budget, rate`` of one setting.
    """
    fig = new_figure(5.0, 3.4)
    ax = fig.add_subplot()
    for k, m in enumerate(_models(summary)):
        rs = sorted((r for r in summary if r["model"] == m), key=lambda r: float(r["budget"]))
        ax.plot([float(r["budget"]) for r in rs], [100 * float(r["rate"]) for r in rs], "-o", ms=3,
                color=_COLORS[k % len(_COLORS)], label=m)
    ax.set_xscale("log")
    ax.set_xlabel("budget ε (‖e‖ / measurement scale)")
    ax.set_ylabel("feature appears (% of images)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return save_png(fig, path)


def sampling_curves(summary: Sequence[Mapping[str, Any]], path: PathLike, title: str = "") -> Path:
    """SSIM and NMSE against acceleration per model; red rings mark where more samples made the model worse.

    Args:
        summary: rows ``model, acceleration, ssim, nmse, flag_ssim, flag_nmse``.
    """
    fig = new_figure(8.6, 3.4)
    axes = fig.subplots(1, 2)
    for j, (metric, label) in enumerate((("ssim", "SSIM (↑)"), ("nmse", "NMSE (↓)"))):
        ax = axes[j]
        for k, m in enumerate(_models(summary)):
            rs = sorted((r for r in summary if r["model"] == m), key=lambda r: float(r["acceleration"]))
            x = [float(r["acceleration"]) for r in rs]
            y = [float(r[metric]) for r in rs]
            ax.plot(x, y, marker="o", ms=3, color=_COLORS[k % len(_COLORS)], label=m,
                    ls="--" if m == "zero-filled" else "-")
            bad = [(a, b) for a, b, r in zip(x, y, rs) if r.get(f"flag_{metric}")]
            if bad:
                ax.scatter(*zip(*bad), s=70, facecolors="none", edgecolors="red", linewidths=1.4, zorder=5)
        ax.set_xscale("log", base=2)
        xs = sorted({float(r["acceleration"]) for r in summary})
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{a:g}x" for a in xs])
        ax.set_xlabel("acceleration (more samples ←)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_png(fig, path)


def image_panels(rows: Sequence[tuple[str, Mapping[str, Any]]], columns: Sequence[tuple[str, str, str]],
                 path: PathLike, title: str = "") -> Path:
    """A grid of images: one row per ``(label, images)``; ``columns`` are ``(key, header, kind)`` with ``kind``
    ``"gray"`` (the row's gray images share their limits) or ``"heat"`` (each from 0 to the largest heat value of
    the row, so maps of one row compare); images are CPU arrays ``(h, w)`` or ``(1, 1, h, w)``."""
    fig = new_figure(1.9 * len(columns) + 0.8, 1.9 * max(1, len(rows)) + 0.5, layout=None)  # fixed layout: 5x faster
    fig.subplots_adjust(left=0.8 / fig.get_figwidth(), right=0.99, bottom=0.02, wspace=0.04, hspace=0.06,
                        top=1 - 0.45 / fig.get_figheight())
    if not rows:
        return save_empty(fig, path)
    grid = fig.subplots(len(rows), len(columns), squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        arr = {k: np.asarray(imgs[k], dtype=np.float32).reshape(np.asarray(imgs[k]).shape[-2:])
               for k, _, _ in columns if k in imgs}
        gray = [arr[k] for k, _, kind in columns if kind == "gray" and k in arr]
        heat = [arr[k] for k, _, kind in columns if kind == "heat" and k in arr]
        lo = min((float(a.min()) for a in gray), default=0.0)
        hi = max((float(a.max()) for a in gray), default=1.0)
        hmax = max((float(a.max()) for a in heat), default=1.0) or 1e-6
        for j, (k, header, kind) in enumerate(columns):
            ax = grid[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(header, fontsize=7.5)
            if k not in arr:
                ax.axis("off")
                continue
            if kind == "gray":
                ax.imshow(arr[k], cmap="gray", vmin=lo, vmax=hi)
            else:
                ax.imshow(arr[k], cmap="inferno", vmin=0.0, vmax=hmax)
        grid[i][0].set_ylabel(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_png(fig, path)


def section_html(title: str, intro: str, markdown: str, figures: Sequence[tuple[str, PathLike]] = (),
                 anchor: str = "") -> str:
    """A self-contained ``<section>``: heading, an escaped introduction, the Markdown tables as HTML and the figures
    (``(caption, png path)``) embedded as data URIs."""
    parts = [f"<section class='beyond'{f' id={html.escape(anchor)!r}' if anchor else ''}>",
             f"<h2>{html.escape(title)}</h2>", f"<p class='muted'>{html.escape(intro)}</p>",
             markdown_table_html(markdown)]
    figs = [(c, Path(p)) for c, p in figures if Path(p).is_file()]
    if figs:
        parts.append("<div class='grid'>" + "".join(
            f"<figure class='wide'><img alt='{html.escape(c)}' src='{png_data_uri(p)}' style='max-width:100%'>"
            f"<figcaption>{html.escape(c)}</figcaption></figure>" for c, p in figs) + "</div>")
    parts.append("</section>")
    return "\n".join(parts)


_PAGE_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 7px;"
    "text-align:right}td:first-child{text-align:left}th{background:#f3f3f3}.muted{color:#555;font-size:13px}"
    "figure{margin:1em 0}figcaption{font-size:13px;color:#555}"
)


def standalone_page(title: str, section: str) -> str:
    """A self-contained HTML page around a :func:`section_html` fragment (what each command writes as
    ``report.html``)."""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_PAGE_CSS}</style></head><body>\n{section}\n</body></html>\n")


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats with ``digits`` significant digits, NaN / None as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


__all__ = ["amplification_curves", "fmt", "image_panels", "sampling_curves", "section_html", "standalone_page",
           "success_curves"]
