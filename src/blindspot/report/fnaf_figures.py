"""FNAF figures: where successful features sit, attack loss against IP loss, and example panels.

Every function takes plain records (the dicts of ``records.csv`` / ``records.jsonl``) or CPU tensors, draws with a
private matplotlib ``Figure`` (no global pyplot state, Agg backend) and writes the PNG atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from blindspot.errors import PathLike
from blindspot.report.png import new_figure, save_empty, save_png


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes")
    return bool(v)


def location_heatmap(
    rows: Sequence[Mapping[str, Any]],
    image_shape: tuple[int, int],
    path: PathLike,
    region_box: tuple[int, int, int, int] | None = None,
    success_key: str = "success",
    bins: int = 24,
    title: str = "",
) -> Path:
    """Heat-map of the locations of successful features over the placement region (the seed's location figure).

    Args:
        rows: records with ``row``, ``col`` (pixels) and ``success_key``.
        image_shape: ``(h, w)`` of the images.
        region_box: ``(top, left, height, width)`` of the region to show (the central crop); ``None`` → the image.
        bins: histogram bins per side.
    """
    h, w = image_shape
    top, left, rh, rw = region_box if region_box is not None else (0, 0, h, w)
    ok = [r for r in rows if _truthy(r[success_key])]
    rr = np.array([float(r["row"]) for r in ok], dtype=np.float64)
    cc = np.array([float(r["col"]) for r in ok], dtype=np.float64)
    edges_r = np.linspace(top - 0.5, top + rh - 0.5, bins + 1)
    edges_c = np.linspace(left - 0.5, left + rw - 0.5, bins + 1)
    counts, _, _ = np.histogram2d(rr, cc, bins=(edges_r, edges_c))
    fig = new_figure(4.6, 4.0)
    ax = fig.add_subplot()
    im = ax.imshow(
        counts,
        origin="upper",
        extent=(edges_c[0], edges_c[-1], edges_r[-1], edges_r[0]),
        cmap="magma",
        interpolation="nearest",
    )
    fig.colorbar(im, ax=ax, label="successful features")
    ax.set_xlabel("column (px)")
    ax.set_ylabel("row (px)")
    ax.set_title((title + "\n" if title else "") + f"{len(ok)} successful of {len(rows)} images", fontsize=9)
    return save_png(fig, path)


def loss_vs_ip_scatter(
    rows: Sequence[Mapping[str, Any]],
    path: PathLike,
    loss_threshold: float = 1e-3,
    ip_threshold: float = 1e-4,
    success_key: str = "success",
    title: str = "",
) -> Path:
    """Attack loss against IP loss, one point per image (the seed's "FNAF attack loss vs. IP loss" figure).

    Points are coloured: successful attacks, features the network kept, and features rejected by IP.
    """
    fig = new_figure(5.0, 4.0)
    ax = fig.add_subplot()
    groups = {"attack (lost, accepted)": [], "kept by the network": [], "rejected by IP": []}
    for r in rows:
        x, y = float(r["ip_loss"]), float(r["attack_loss"])
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        if not _truthy(r["accepted"]):
            groups["rejected by IP"].append((x, y))
        elif _truthy(r[success_key]):
            groups["attack (lost, accepted)"].append((x, y))
        else:
            groups["kept by the network"].append((x, y))
    colours = {"attack (lost, accepted)": "tab:red", "kept by the network": "tab:blue", "rejected by IP": "0.55"}
    floor = 1e-12
    for name, pts in groups.items():
        if pts:
            a = np.maximum(np.array(pts), floor)
            ax.scatter(a[:, 0], a[:, 1], s=12, alpha=0.75, color=colours[name], label=f"{name} ({len(pts)})")
    ax.axvline(ip_threshold, color="0.3", ls="--", lw=0.8)
    ax.axhline(loss_threshold, color="0.3", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ct = any(str(r.get("modality", "mri")) == "ct" for r in rows)
    ax.set_xlabel("IP: detectability d' in the low-dose input" if ct else "IP loss (MSE of normalised inputs)")
    ax.set_ylabel("attack loss L_atk")
    ax.set_title(title or "FNAF attack loss vs. IP loss")
    if any(groups.values()):
        ax.legend(fontsize=7, loc="best")
    return save_png(fig, path)


def example_panels(examples: Mapping[str, Mapping[str, Any]], path: PathLike, title: str = "") -> Path:
    """The seed's qualitative figure: one row per example (e.g. ``"failed"``, ``"successful"``).

    Args:
        examples: name → dict with CPU tensors/arrays ``(h, w)`` (or ``(1, 1, h, w)``) ``input`` (normalised
            zero-filled ``N(x')``), ``truth`` (``N(y')``), ``output`` (``f(N(x'))``), ``feature`` (``δ'/σ``), ``T``,
            and numbers ``attack_loss``, ``recovery``, ``ip_loss``, and ``key``.
    """
    names = [n for n in examples if examples[n]]
    cols = ("input", "truth", "output", "feature", "error")
    ct = any(examples[n].get("display") is not None for n in names)
    headers = ("low-dose input N(x')" if ct else "zero-filled input N(x')", "truth with feature N(y')",
               "output f(N(x'))", "feature δ'/σ", "|error| in T")  # fmt: skip
    fig = new_figure(2.3 * len(cols), 2.5 * max(1, len(names)) + 0.3)
    if not names:
        return save_empty(fig, path)
    grid = fig.subplots(len(names), len(cols), squeeze=False)
    for i, name in enumerate(names):
        ex = examples[name]
        img = {k: np.asarray(ex[k], dtype=np.float32).reshape(np.asarray(ex[k]).shape[-2:])
               for k in ("input", "truth", "output", "feature", "T")}
        img["error"] = np.abs(img["output"] - img["truth"]) * img["T"]
        lo = min(img["truth"].min(), img["input"].min())
        hi = max(img["truth"].max(), img["input"].max())
        if ex.get("display") is not None:  # a display window (CT: abdomen), in the same normalised units
            lo, hi = (float(v) for v in np.asarray(ex["display"], dtype=np.float32).reshape(2))
        for j, c in enumerate(cols):
            ax = grid[i][j]
            if c in ("input", "truth", "output"):
                ax.imshow(img[c], cmap="gray", vmin=lo, vmax=hi)
            else:
                ax.imshow(img[c], cmap="inferno", vmin=0.0, vmax=max(1e-6, float(img[c].max())))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(headers[j], fontsize=8)
        rec = float(ex.get("recovery", float("nan")))
        grid[i][0].set_ylabel(
            f"{name}\n{ex.get('key', '')}\nL_atk={float(ex['attack_loss']):.3g}\n"
            f"recovery={rec:.2f}  IP={float(ex['ip_loss']):.2g}",
            fontsize=7,
        )
    if title:
        fig.suptitle(title, fontsize=9)
    return save_png(fig, path)
