"""Real-abnormality evaluation: does a reconstruction keep the lesions a radiologist boxed?

For every annotated lesion (a box on one slice, :mod:`blindspot.data.lesions`) and every model, on the model's
reconstruction ``r`` and the ground truth ``t`` of that slice (both in the data's units, ``(h, w)``):

* **image quality inside the box** — SSIM (fastMRI's 7×7 window; the mean of the local SSIM map over the window
  centres inside the box, images reflect-padded by 3 px so boxes at the border work), NMSE and PSNR (data range: the
  volume's maximum) over the box's pixels; the same over the **region**, the box grown by ``margin`` pixels on every
  side (clipped to the image).
* **contrast** — the lesion's contrast against its surroundings: the box's mean minus the mean of the **ring** (the
  region less the box), in truth (``contrast_truth``) and in the reconstruction (``contrast_recon``).
* **kept contrast fraction** — the share of the lesion's contrast pattern (each box pixel relative to the ring mean)
  that the reconstruction reproduces, ``kept = 1 − Σ_box ((r − r̄_ring) − (t − t̄_ring))² / Σ_box (t − t̄_ring)²``:
  DESIGN.md's FNAF ``recovery`` criterion with the box as the feature and its surroundings as the reference. It is
  1 for a perfect reconstruction (any offset of the whole neighbourhood is forgiven), falls as the lesion is smoothed
  into its surroundings or replaced by healthy-looking tissue, and goes negative when the reconstruction's error in
  the box outweighs the lesion itself.
* **preserved** — the verdict of :class:`PreservationRule`: ``kept ≥ threshold`` (default 0.5: the reconstruction
  keeps at least half of the lesion's contrast pattern). The rule is stated in every result file.

Boxes only say where a lesion is, not its exact outline, so a box's pattern includes the tissue around the lesion
inside the box; tight boxes make the figures more specific to the lesion.

Tables group lesions by label as "preserved / total" per model, like the source document's (U-Net 1/8 cartilage,
8/9 meniscus). Models run on the annotated slices only, in batches, all on the same inputs (masks seeded by file
name).
"""

from __future__ import annotations

import io
import re
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from blindspot.data.fastmri import FastMRISliceDataset
from blindspot.data.lesions import LesionBox, boxes_tensor, volume_key
from blindspot.data.sample import collate_mri
from blindspot.errors import BlindspotError, PathLike
from blindspot.evaluate import ZERO_FILLED, EvalModel
from blindspot.fileio import atomic_write_bytes, atomic_write_text, write_csv, write_json
from blindspot.metrics import ssim_map
from blindspot.models.protocol import reconstruct

SCORES = ("ssim_box", "nmse_box", "psnr_box", "ssim_region", "nmse_region", "psnr_region",
          "contrast_truth", "contrast_recon", "kept")
LESION_COLUMNS = ("model", "file", "slice", "label", "x", "y", "width", "height", *SCORES, "preserved")


@dataclass(frozen=True)
class PreservationRule:
    """When a lesion counts as preserved: its kept contrast fraction is at least ``threshold``.

    ``margin`` (pixels) sets the surroundings: the ring between the box and the box grown by ``margin``.
    """

    threshold: float = 0.5
    margin: int = 4

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise BlindspotError(None, f"preservation threshold must be finite, got {self.threshold}")
        if int(self.margin) < 1:
            raise BlindspotError(None, f"lesion margin must be at least 1 pixel, got {self.margin}")

    def describe(self) -> str:
        return (f"preserved when the kept contrast fraction 1 − Σ_box ((r − mean_ring r) − (t − mean_ring t))² / "
                f"Σ_box (t − mean_ring t)² ≥ {self.threshold:g}; ring = box grown by {int(self.margin)} px, less the "
                "box")


def box_masks(boxes: Tensor, size: tuple[int, int], margin: int) -> tuple[Tensor, Tensor]:
    """Box and region masks for ``L`` boxes.

    Args:
        boxes: ``(L, 4)`` integer ``(x, y, width, height)`` in pixels (rows from the top).
        size: image ``(h, w)``.
        margin: pixels the region extends beyond the box on every side (clipped to the image).
    Returns:
        ``(box, region)``: bool ``(L, 1, h, w)`` each.
    """
    h, w = size
    rows = torch.arange(h, device=boxes.device).reshape(1, 1, h, 1)
    cols = torch.arange(w, device=boxes.device).reshape(1, 1, 1, w)
    x, y, bw, bh = (boxes[:, i].reshape(-1, 1, 1, 1) for i in range(4))
    box = (rows >= y) & (rows < y + bh) & (cols >= x) & (cols < x + bw)
    m = int(margin)
    region = (rows >= y - m) & (rows < y + bh + m) & (cols >= x - m) & (cols < x + bw + m)
    return box, region


def score_lesions(
    truth: Tensor, recon: Tensor, boxes: Tensor, data_range: Tensor, rule: PreservationRule = PreservationRule()
) -> dict[str, Tensor]:
    """Per-lesion scores (see the module docs), batched over lesions.

    Args:
        truth: ``(L, 1, h, w)`` ground truth of each lesion's slice, data units.
        recon: ``(L, 1, h, w)`` reconstruction of the same slices, same units.
        boxes: ``(L, 4)`` ``(x, y, width, height)``, pixels.
        data_range: ``(L,)`` the volume's maximum (SSIM / PSNR range).
        rule: the preservation rule (and the ring margin).
    Returns:
        ``{name: (L,) tensor}`` for every name in :data:`SCORES`, plus ``preserved`` (bool).
    """
    if truth.shape != recon.shape or truth.ndim != 4 or truth.shape[0] != boxes.shape[0]:
        raise ValueError(f"truth {tuple(truth.shape)}, recon {tuple(recon.shape)} and {boxes.shape[0]} boxes disagree")
    truth, recon = truth.to(torch.float64), recon.to(torch.float64)
    box, region = box_masks(boxes.to(truth.device), tuple(truth.shape[-2:]), rule.margin)
    ring = region & ~box
    dr = torch.as_tensor(data_range, dtype=truth.dtype, device=truth.device).reshape(-1)
    pad = 3
    smap = ssim_map(F.pad(recon, (pad,) * 4, mode="reflect"), F.pad(truth, (pad,) * 4, mode="reflect"), dr)
    dims = (1, 2, 3)

    def masked_mean(v: Tensor, m: Tensor) -> Tensor:
        return (v * m).sum(dims) / m.sum(dims).clamp_min(1)

    out: dict[str, Tensor] = {}
    err2 = (truth - recon) ** 2
    for name, m in (("box", box), ("region", region)):
        out[f"ssim_{name}"] = masked_mean(smap, m)
        out[f"nmse_{name}"] = (err2 * m).sum(dims) / (truth**2 * m).sum(dims).clamp_min(1e-30)
        out[f"psnr_{name}"] = 10 * torch.log10(dr**2 / masked_mean(err2, m).clamp_min(1e-30))
    t_ring, r_ring = masked_mean(truth, ring), masked_mean(recon, ring)
    out["contrast_truth"] = masked_mean(truth, box) - t_ring
    out["contrast_recon"] = masked_mean(recon, box) - r_ring
    dt = (truth - t_ring.reshape(-1, 1, 1, 1)) * box
    dq = (recon - r_ring.reshape(-1, 1, 1, 1)) * box
    out["kept"] = 1.0 - ((dq - dt) ** 2).sum(dims) / (dt * dt).sum(dims).clamp_min(1e-30)
    out["preserved"] = out["kept"] >= rule.threshold
    return out


def slice_boxes(dataset: FastMRISliceDataset, boxes: Sequence[LesionBox]) -> dict[int, list[int]]:
    """``{dataset index: [indices into boxes]}`` for the slices that carry boxes (every box must find its slice)."""
    where = {f"{volume_key(dataset.volumes[v].fname)}:{s}": i for i, (v, s) in enumerate(dataset.samples)}
    out: dict[int, list[int]] = {}
    for j, b in enumerate(boxes):
        if b.key not in where:
            raise BlindspotError(None, f"{b.row}: {b.file} slice {b.slice} is not in the data set")
        out.setdefault(where[b.key], []).append(j)
    return out


@dataclass
class LesionCrops:
    """Pixels kept for one lesion's figure: ``(rows, cols)`` window and the crops ``{panel: (h', w')}``."""

    box: LesionBox
    window: tuple[int, int, int, int]  # top, left, height, width
    panels: dict[str, Tensor]


@dataclass
class LesionResult:
    """Per-model, per-lesion rows, and the crops for figures."""

    rows: list[dict[str, Any]]
    crops: list[LesionCrops]
    rule: PreservationRule


def _window(b: LesionBox, size: tuple[int, int], min_side: int = 24) -> tuple[int, int, int, int]:
    """A square window around the box: three times its larger side, at least ``min_side`` (clipped to the image)."""
    h, w = size
    side = min(max(min_side, 3 * max(b.width, b.height)), h, w)
    cy, cx = b.y + b.height / 2, b.x + b.width / 2
    top = int(min(max(0, round(cy - side / 2)), h - side))
    left = int(min(max(0, round(cx - side / 2)), w - side))
    return top, left, side, side


def evaluate_lesions(
    models: Sequence[EvalModel],
    dataset: FastMRISliceDataset,
    boxes: Sequence[LesionBox],
    rule: PreservationRule = PreservationRule(),
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    max_crops: int = 12,
    progress: bool | None = None,
) -> LesionResult:
    """Run ``models`` on the annotated slices of ``dataset`` and score every lesion (see the module docs).

    Args:
        models: the rows (e.g. from :func:`blindspot.evaluate.load_eval_models`; the zero-filled baseline included).
        dataset: the annotated volumes with the under-sampling mask to test.
        boxes: validated boxes (:func:`blindspot.data.lesions.validate_annotations`).
        max_crops: crops kept for figures (the first lesions in file order).
    """
    per_slice = slice_boxes(dataset, boxes)
    order = sorted(per_slice)
    loader = DataLoader(Subset(dataset, order), batch_size=batch_size, shuffle=False, collate_fn=collate_mri,
                        num_workers=0)
    all_boxes = boxes_tensor(boxes)
    rows: list[dict[str, Any]] = []
    crops: list[LesionCrops] = []
    pos = 0
    with torch.no_grad():
        for batch in tqdm(loader, desc="lesions", unit="batch", disable=None if progress is None else not progress):
            batch = batch.to(device)
            idx = order[pos: pos + len(batch)]
            pos += len(batch)
            item = [k for k, i in enumerate(idx) for _ in per_slice[i]]  # batch item of each lesion
            lesion = [j for i in idx for j in per_slice[i]]
            item_t = torch.tensor(item, device=device)
            bx = all_boxes[lesion].to(device)
            truth = batch.target[item_t]
            x, _ = batch.normalized()
            preds = {}
            for m in models:
                pred = batch.stats.invert(reconstruct(m.model, x, batch.mask))
                if not torch.isfinite(pred).all():
                    raise BlindspotError(m.source, f"model output contains NaN or Inf on {batch.keys[0]}")
                preds[m.name] = pred
                scores = score_lesions(truth, pred[item_t], bx, batch.max_value[item_t], rule)
                host = {k: v.cpu().tolist() for k, v in scores.items()}
                for n, j in enumerate(lesion):
                    b = boxes[j]
                    rows.append({"model": m.name, "file": b.file, "slice": b.slice, "label": b.label, "x": b.x,
                                 "y": b.y, "width": b.width, "height": b.height,
                                 **{k: float(host[k][n]) for k in SCORES}, "preserved": bool(host["preserved"][n])})
            for n, j in enumerate(lesion):
                if len(crops) >= max_crops:
                    break
                k = item[n]
                top, left, hh, ww = win = _window(boxes[j], tuple(batch.target.shape[-2:]))
                cut = lambda t: t[k, 0, top: top + hh, left: left + ww].float().cpu()  # noqa: E731
                # The zero-filled input, unless the zero-filled baseline is a row already (the same image).
                zf_row = next((m.name for m in models if m.architecture == ZERO_FILLED), None)
                panels = {zf_row or "zero-filled input": cut(batch.input), "truth": cut(batch.target)}
                panels.update({name: cut(p) for name, p in preds.items() if name != zf_row})
                crops.append(LesionCrops(boxes[j], win, panels))
    return LesionResult(rows, crops, rule)


def preservation_table(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[int, int]]]:
    """``{model: {label: (preserved, total)}}`` plus an ``"all"`` label, in order of appearance."""
    out: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        for label in (r["label"], "all"):
            cell = out.setdefault(r["model"], {}).setdefault(label, [0, 0])
            cell[0] += int(bool(r["preserved"]))
            cell[1] += 1
    return {m: {lab: (c[0], c[1]) for lab, c in sorted(v.items(), key=lambda kv: kv[0] == "all")}
            for m, v in out.items()}


def table_markdown(rows: Sequence[dict[str, Any]], rule: PreservationRule, title: str | None = None) -> str:
    """Preserved / total per model (rows) and label (columns), then mean kept fraction and box SSIM per model."""
    table = preservation_table(rows)
    labels = list(dict.fromkeys(lab for v in table.values() for lab in v if lab != "all")) + ["all"]
    lines = [title, ""] if title else []
    lines.append("| model | " + " | ".join(labels) + " |")
    lines.append("| --- |" + " --- |" * len(labels))
    for model, cells in table.items():
        lines.append(f"| {model} | " + " | ".join(
            f"{cells[lab][0]}/{cells[lab][1]}" if lab in cells else "–" for lab in labels) + " |")
    lines += ["", f"Rule: {rule.describe()}.", "",
              "| model | mean kept fraction | mean SSIM (box) | mean SSIM (region) | mean PSNR (region, dB) |",
              "| --- | --- | --- | --- | --- |"]
    for model in table:
        sel = [r for r in rows if r["model"] == model]
        mean = lambda k: sum(r[k] for r in sel) / len(sel)  # noqa: E731
        lines.append(f"| {model} | {mean('kept'):.3f} | {mean('ssim_box'):.4f} | {mean('ssim_region'):.4f} | "
                     f"{mean('psnr_region'):.2f} |")
    return "\n".join(lines) + "\n"


def save_crop_figure(crops: LesionCrops, path: PathLike, dpi: int = 110) -> Path:
    """One lesion's crops side by side (zero-filled input, truth, each model) with the box drawn; PNG, atomic.

    All panels share the truth crop's grey scale (0 to its maximum).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    b, (top, left, _, _) = crops.box, crops.window
    names = list(crops.panels)
    vmax = float(crops.panels["truth"].max())
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 2.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.imshow(crops.panels[name].numpy(), cmap="gray", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.add_patch(Rectangle((b.x - left - 0.5, b.y - top - 0.5), b.width, b.height, fill=False, lw=1.0,
                               edgecolor="yellow"))
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{b.label}: {b.file} slice {b.slice}", fontsize=8)
    fig.tight_layout(pad=0.3, rect=(0.0, 0.0, 1.0, 0.88))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_results(out_dir: PathLike, result: LesionResult, meta: dict[str, Any] | None = None,
                  title: str | None = None) -> dict[str, Path]:
    """Write ``lesions.csv`` (one row per model and lesion), ``table.md``, ``table.json`` and ``figures/*.png``."""
    out = Path(out_dir)
    table = preservation_table(result.rows)
    paths = {
        "lesions": write_csv(out / "lesions.csv", result.rows, LESION_COLUMNS),
        "markdown": atomic_write_text(out / "table.md", table_markdown(result.rows, result.rule, title)),
        "json": write_json(out / "table.json", {
            **(meta or {}), "rule": {"threshold": result.rule.threshold, "margin": result.rule.margin,
                                      "text": result.rule.describe()},
            "preserved": {m: {lab: {"preserved": p, "total": n} for lab, (p, n) in v.items()}
                          for m, v in table.items()},
        }),
    }
    for i, crop in enumerate(result.crops):
        b = crop.box
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"lesion_{i:03d}_{volume_key(b.file)}_s{b.slice}_{b.label}")
        paths[f"figure_{i}"] = save_crop_figure(crop, out / "figures" / f"{stem}.png")
    return paths
