"""Invariance figures and the HTML section the audit report includes.

* :func:`ct_invariance_figure` — the source document's panels in CT display windows: ``x``, ``x_inv``, ``f(x)``,
  ``f(x_inv)`` in the abdomen (C 50, W 400) and lung (C −600, W 1500) windows, then ``x_inv − x``,
  ``f(x_inv) − f(x)``, the 5×5 local mean of ``x_inv − x`` (its structure, without pixel-level checkerboards) in the
  difference window (C 0, W 100), and the pixel-wise standard deviation over restarts.
* :func:`mri_invariance_figure` — the MRI version: truth, invariance, both reconstructions, the change, the output
  change, and the change split into the part the mask hides (null space) and the part that reaches the network.
* :func:`natural_samples_figure` — an image, several generator samples and their differences (CT windows in HU,
  or data-driven ranges in MRI's normalised units).
* :func:`invariance_section_html` — a self-contained ``<section>`` (figures embedded as PNG data) with the summary
  table and per-image figures of a run folder; :func:`write_invariance_report` writes it alone and as a page.

Images are plain CPU tensors or arrays ``(H, W)``; each figure uses a private matplotlib ``Figure`` (Agg) and is
written atomically.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from blindspot.errors import PathLike
from blindspot.fileio import atomic_write_bytes, atomic_write_text
from blindspot.physics.ct import WINDOWS, Window
from blindspot.report.png import new_figure, png_bytes, png_data_uri


@dataclass
class Panel:
    """One image panel: ``image`` ``(H, W)``, display range ``[vmin, vmax]``, colour map and title."""

    image: Any
    vmin: float
    vmax: float
    title: str
    cmap: str = "gray"
    colorbar: bool = False


def _np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().float().numpy()
    a = np.asarray(a, dtype=np.float32)
    return a.reshape(a.shape[-2:]) if a.ndim > 2 else a


def panel_grid(rows: Sequence[Sequence[Panel | None]], path: PathLike, title: str = "", size: float = 2.6) -> Path:
    """Draw a grid of panels (``None`` leaves a cell empty) and write the PNG atomically."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig = new_figure(size * n_cols + 0.4, size * n_rows + (0.4 if title else 0.0))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_axis_off()
            panel = row[j] if j < len(row) else None
            if panel is None:
                continue
            im = ax.imshow(_np(panel.image), cmap=panel.cmap, vmin=panel.vmin, vmax=panel.vmax, interpolation="nearest")
            ax.set_title(panel.title, fontsize=8)
            if panel.colorbar:
                fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return atomic_write_bytes(path, png_bytes(fig))


def _window_panel(img: Any, w: Window, title: str, colorbar: bool = False, cmap: str = "gray") -> Panel:
    return Panel(img, w.lower, w.upper, f"{title}\n{w}", cmap=cmap, colorbar=colorbar)


def local_mean_map(d: Any, window: int = 5) -> np.ndarray:
    """``window``×``window`` local mean of an ``(H, W)`` image, same size (edge-replicated)."""
    t = torch.as_tensor(_np(d)).reshape(1, 1, *_np(d).shape)
    k = window // 2
    t = F.pad(t, (k, k, k, k), mode="replicate")
    return F.avg_pool2d(t, window, stride=1)[0, 0].numpy()


def ct_invariance_figure(
    x_hu: Any,
    x_inv_hu: Any,
    f_x_hu: Any,
    f_x_inv_hu: Any,
    path: PathLike,
    restart: int = 0,
    title: str = "",
    windows: Sequence[str | Window] = ("abdomen", "lung"),
    difference: Window = WINDOWS["difference"],
    zoom: tuple[int, int, int, int] | None = None,
) -> Path:
    """The CT invariance panels of one image.

    Args:
        x_hu, f_x_hu: ``(H, W)`` clean input and output in HU.
        x_inv_hu, f_x_inv_hu: ``(R, H, W)`` invariances and their outputs in HU (``R`` restarts; ``(H, W)`` for one).
        restart: which restart to show in the image panels (the std panel uses all).
        windows: display windows of the image rows (names of :data:`blindspot.physics.ct.WINDOWS` or windows).
        difference: window of the difference panels.
        zoom: optional ``(top, left, height, width)`` box shown enlarged in a last row (x_inv − x, its local mean,
            f(x_inv) − f(x), x_inv) — e.g. around Gaussian + RI's square on a 512×512 image.
    """
    x, fx = _np(x_hu), _np(f_x_hu)
    xi = np.asarray(x_inv_hu.detach().cpu() if isinstance(x_inv_hu, torch.Tensor) else x_inv_hu, dtype=np.float32)
    fi = np.asarray(f_x_inv_hu.detach().cpu() if isinstance(f_x_inv_hu, torch.Tensor) else f_x_inv_hu, dtype=np.float32)
    xi = xi.reshape(-1, *x.shape)
    fi = fi.reshape(-1, *fx.shape)
    r = min(restart, xi.shape[0] - 1)
    rows: list[list[Panel | None]] = []
    for w in windows:
        win = WINDOWS[w] if isinstance(w, str) else w
        rows.append([
            _window_panel(x, win, "x"),
            _window_panel(xi[r], win, "x_inv"),
            _window_panel(fx, win, "f(x)"),
            _window_panel(fi[r], win, "f(x_inv)"),
        ])
    d = xi[r] - x
    std = xi.std(axis=0, ddof=1) if xi.shape[0] > 1 else np.zeros_like(x)
    rows.append([
        _window_panel(d, difference, "x_inv − x", colorbar=True, cmap="RdBu_r"),
        _window_panel(fi[r] - fx, difference, "f(x_inv) − f(x)", colorbar=True, cmap="RdBu_r"),
        _window_panel(local_mean_map(d), difference, "x_inv − x, 5×5 local mean", colorbar=True, cmap="RdBu_r"),
        Panel(std, 0.0, max(float(np.percentile(std, 99)), 1.0), f"std of x_inv over {xi.shape[0]} restarts (HU)",
              cmap="magma", colorbar=True),
    ])
    if zoom is not None:
        t, l, h, w = zoom
        box = (slice(t, t + h), slice(l, l + w))
        lm = local_mean_map(d)
        win = WINDOWS[windows[0]] if windows and isinstance(windows[0], str) else WINDOWS["abdomen"]
        where = f"rows {t}–{t + h - 1}, cols {l}–{l + w - 1}"
        rows.append([
            _window_panel(d[box], difference, f"x_inv − x, zoom\n{where}", colorbar=True, cmap="RdBu_r"),
            _window_panel(lm[box], difference, "5×5 local mean, zoom", colorbar=True, cmap="RdBu_r"),
            _window_panel((fi[r] - fx)[box], difference, "f(x_inv) − f(x), zoom", colorbar=True, cmap="RdBu_r"),
            _window_panel(xi[r][box], win, "x_inv, zoom"),
        ])
    return panel_grid(rows, path, title)


def _sym(a: np.ndarray, q: float = 99.5) -> float:
    v = float(np.percentile(np.abs(a), q)) if a.size else 0.0
    return v if v > 0 else 1.0


def mri_invariance_figure(
    y: Any,
    y_inv: Any,
    f_y: Any,
    f_y_inv: Any,
    null_abs: Any,
    range_abs: Any,
    path: PathLike,
    std: Any | None = None,
    title: str = "",
) -> Path:
    """The MRI invariance panels of one image (normalised units, all ``(H, W)``).

    Row 1: truth ``y``, invariance ``y_inv``, reconstructions ``f(A(y))`` and ``f(A(y_inv))``, std over restarts.
    Row 2: ``y_inv − y``, the output change, and the change's null-space part (hidden by the mask) and range-space
    part (seen by the network, yet ignored) as moduli, plus the 5×5 local mean of the change.
    """
    y, yi, fy, fyi = _np(y), _np(y_inv), _np(f_y), _np(f_y_inv)
    lo, hi = float(np.percentile(y, 0.5)), float(np.percentile(y, 99.5))
    d, od = yi - y, fyi - fy
    s = _sym(d)
    rows: list[list[Panel | None]] = [
        [Panel(y, lo, hi, "truth y"), Panel(yi, lo, hi, "invariance y_inv"), Panel(fy, lo, hi, "f(A(y))"),
         Panel(fyi, lo, hi, "f(A(y_inv))"),
         None if std is None else Panel(_np(std), 0.0, s, "std over restarts", cmap="magma", colorbar=True)],
        [Panel(d, -s, s, "y_inv − y", cmap="RdBu_r", colorbar=True),
         Panel(od, -s, s, "f(A(y_inv)) − f(A(y))", cmap="RdBu_r", colorbar=True),
         Panel(_np(null_abs), 0.0, s, "|null-space part| (mask hides)", cmap="magma", colorbar=True),
         Panel(_np(range_abs), 0.0, s, "|range-space part| (network ignores)", cmap="magma", colorbar=True),
         Panel(local_mean_map(d), -s / 3, s / 3, "y_inv − y, 5×5 local mean", cmap="RdBu_r", colorbar=True)],
    ]
    return panel_grid(rows, path, title)


def natural_samples_figure(
    x: Any,
    samples: Any,
    f_x: Any,
    f_samples: Any,
    path: PathLike,
    window: str | Window = "abdomen",
    difference: Window = WINDOWS["difference"],
    max_samples: int = 4,
    title: str = "",
    units: str = "HU",
) -> Path:
    """An image and generator samples ``(S, H, W)``: rows = image / sample − x / f(sample) − f(x).

    With ``units="HU"`` (CT) the panels use the display ``window`` and the ``difference`` window; in any other unit
    (MRI's normalised units) the image range is the image's 0.5–99.5 percentiles and the difference range is
    symmetric about 0 (the 99.5th percentile of the sample changes).
    """
    x, fx = _np(x), _np(f_x)
    s = np.asarray(samples.detach().cpu() if isinstance(samples, torch.Tensor) else samples, dtype=np.float32)
    fs = np.asarray(f_samples.detach().cpu() if isinstance(f_samples, torch.Tensor) else f_samples, dtype=np.float32)
    s, fs = s.reshape(-1, *x.shape), fs.reshape(-1, *fx.shape)
    n = min(max_samples, s.shape[0])
    if units == "HU":
        win = WINDOWS[window] if isinstance(window, str) else window
        image = lambda a, t: _window_panel(a, win, t)  # noqa: E731
        diff = lambda a, t: _window_panel(a, difference, t, cmap="RdBu_r")  # noqa: E731
    else:
        lo, hi = float(np.percentile(x, 0.5)), float(np.percentile(x, 99.5))
        r = _sym(s - x)
        image = lambda a, t: Panel(a, lo, hi if hi > lo else lo + 1.0, f"{t} ({units})")  # noqa: E731
        diff = lambda a, t: Panel(a, -r, r, f"{t} ({units})", cmap="RdBu_r")  # noqa: E731
    rows: list[list[Panel | None]] = [
        [image(x, "x")] + [image(s[i], f"g(z{i + 1}|x)") for i in range(n)],
        [None] + [diff(s[i] - x, f"g(z{i + 1}|x) − x") for i in range(n)],
        [image(fx, "f(x)")] + [diff(fs[i] - fx, f"f(g(z{i + 1}|x)) − f(x)") for i in range(n)],
    ]
    return panel_grid(rows, path, title)


# ----------------------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return html.escape(str(v))
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table class='inv-table'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='{png_data_uri(path)}' style='max-width:100%'>"


#: What each recorded quantity means, and whether it carries the run's units.
QUANTITIES: dict[str, tuple[str, bool]] = {
    "mean_abs_change": ("mean |x_inv − x|", True),
    "max_abs_change": ("max |x_inv − x|", True),
    "rms_change": ("RMS of x_inv − x", True),
    "output_mean_abs_change": ("mean |f(x_inv) − f(x)|", True),
    "output_rms_change": ("RMS of f(x_inv) − f(x)", True),
    "change_ratio": ("RMS output change / RMS input change", False),
    "distance": ("D(x, x_inv)", False),
    "fidelity": ("‖f(x) − f(x_inv)‖", False),
    "objective": ("‖f(x) − f(x_inv)‖ − α·D", False),
    "null_mean_abs": ("mean |null-space part| (the mask hides it)", True),
    "range_mean_abs": ("mean |range-space part| (the network ignores it)", True),
    "null_energy_fraction": ("share of the change's energy in the null space", False),
    "input_mean_abs_change": ("mean |A(y_inv) − A(y)| (change of the network input)", True),
    "square_inside": ("|5×5 local mean of x_inv − x| inside the RI square", True),
    "square_outside": ("|5×5 local mean of x_inv − x| outside the RI square", True),
    "square_ratio": ("inside / outside (≥ 5 expected for Gaussian + RI)", False),
    "iterations": ("Adam iterations run", False),
    "sample_std": ("std over samples (diversity)", True),
    "critic_real": ("critic score of real network inputs", False),
    "critic_samples": ("critic score of the samples", False),
    "critic_noise": ("critic score of x + white noise of equal size", False),
    "critic_gap": ("critic: real − samples", False),
}

_SECTION_CSS = (
    ".invariances .inv-table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}"
    ".invariances .inv-table td,.invariances .inv-table th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
    ".invariances .inv-table td:first-child{text-align:left}.invariances .inv-table th{background:#f3f3f3}"
    ".invariances figure{margin:1em 0}.invariances figcaption{font-size:13px;color:#555}"
)


def invariance_section_html(
    summary: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    figures: Sequence[tuple[str, PathLike]] = (),
    title: str = "Invariances",
    max_rows: int = 50,
) -> str:
    """A self-contained HTML ``<section>`` (own scoped style, figures as data URIs) for the audit report.

    Args:
        summary: the run's ``summary.json`` (its ``model``, ``config``, ``units`` and ``aggregate`` are shown).
        rows: per-(image, restart) records; the first ``max_rows`` are tabulated.
        figures: ``(caption, png path)`` pairs, embedded.
    """
    unit = str(summary.get("units", ""))
    cfg = summary.get("config", {}) or {}
    parts = [f"<section class='invariances'><style>{_SECTION_CSS}</style><h2>{html.escape(title)}</h2>"]
    model = html.escape(str(summary.get("model", "")))
    if summary.get("command") == "invariances sample":
        parts.append(
            f"<p>Natural invariances of <b>{model}</b> drawn from a conditional generator g(z|x) trained against a "
            f"WGAN-GP critic ({_fmt(cfg.get('samples'))} samples per image, no optimisation). Changes are in "
            f"{html.escape(unit)}; critic scores are higher for inputs more like the real ones.</p>"
        )
    else:
        parts.append(
            "<p>Large input changes that leave the network's output unchanged, found by minimising "
            "‖f(x) − f(x<sub>inv</sub>)‖ − α·D(x, x<sub>inv</sub>) with Adam from x + noise"
            f" (model <b>{model}</b>, D = <b>{html.escape(str(cfg.get('distance', '')))}</b>,"
            f" ‖·‖ = {html.escape(str(cfg.get('fidelity', '')))}, α = {_fmt(cfg.get('alpha'))},"
            f" at most {_fmt(cfg.get('iterations'))} iterations, {_fmt(cfg.get('restarts'))} restart(s) per image)."
            f" Changes are in {html.escape(unit)}.</p>"
        )
    agg = summary.get("aggregate") or {}
    if agg:
        agg_rows = []
        for k, v in agg.items():
            if not isinstance(v, Mapping):
                continue
            label, has_unit = QUANTITIES.get(k, (k, False))
            agg_rows.append({"quantity": label + (f" ({unit})" if has_unit and unit else ""),
                             "mean": v.get("mean"), "std": v.get("std"), "n": v.get("n")})
        parts.append("<h3>Summary</h3>" + _table(agg_rows, ["quantity", "mean", "std", "n"]))
    if rows:
        preferred = ["key", "restart", "mean_abs_change", "output_mean_abs_change", "output_rms_change",
                     "change_ratio", "distance", "fidelity", "null_mean_abs", "range_mean_abs",
                     "null_energy_fraction", "square_ratio", "sample_std", "critic_real", "critic_samples",
                     "critic_noise", "iterations", "converged"]
        cols = [c for c in preferred if any(c in r for r in rows)]
        parts.append(f"<h3>Per image ({min(len(rows), max_rows)} of {len(rows)} rows)</h3>")
        parts.append(_table(list(rows)[:max_rows], cols))
    for caption, path in figures:
        p = Path(path)
        if p.is_file():
            parts.append(f"<figure>{_img(p, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</section>")
    return "\n".join(parts)


_CSS = "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"


def write_invariance_report(run_dir: PathLike, section: str, title: str = "blindspot invariances") -> tuple[Path, Path]:
    """Write ``section.html`` (the fragment) and ``report.html`` (a standalone page around it) into ``run_dir``."""
    run_dir = Path(run_dir)
    frag = atomic_write_text(run_dir / "section.html", section + "\n")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>\n{section}\n</body></html>\n"
    )
    return frag, atomic_write_text(run_dir / "report.html", page)
