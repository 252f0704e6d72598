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

Two entry points share :func:`open_annotated` (boxes read and checked against the data) and
:func:`evaluate_lesions`: ``blindspot lesions`` (one acceleration, :mod:`blindspot.commands.lesions`) and the audit's
lesion section (every audited acceleration, :func:`audit_lesions`).
"""

from __future__ import annotations

import io
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from blindspot.data.fastmri import FastMRISliceDataset
from blindspot.data.lesions import LesionAnnotations, LesionBox, boxes_tensor, read_annotations, \
    validate_annotations, volume_key
from blindspot.data.sample import collate_mri
from blindspot.errors import BlindspotError, PathLike
from blindspot.runs.evaluate import ZERO_FILLED, load_eval_models
from blindspot.models.loading import LoadedModel
from blindspot.fileio import atomic_write_bytes, atomic_write_text, write_csv, write_json
from blindspot.metrics import ssim_map
from blindspot.training.mri import reconstruct_batch
from blindspot.physics.mri import create_mask_func
from blindspot.report.tables import lesion_summary_markdown

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
    models: Sequence[LoadedModel],
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
        models: the rows (e.g. from :func:`blindspot.runs.evaluate.load_eval_models`; the zero-filled baseline included).
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
            preds = {}
            for m in models:
                pred = batch.stats.invert(reconstruct_batch(m.model, batch))
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


def summarize_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The numbers of the lesion tables, JSON-ready: ``{"preserved": {model: {label: {"preserved": p, "total": n}}},
    "mean": {model: {score: mean over the model's lesions}}}`` (labels in order of appearance, ``"all"`` last; means
    of ``kept``, ``ssim_box``, ``ssim_region`` and ``psnr_region``)."""
    table = preservation_table(rows)
    mean: dict[str, dict[str, float]] = {}
    for model in table:
        sel = [r for r in rows if r["model"] == model]
        mean[model] = {k: sum(float(r[k]) for r in sel) / len(sel) for k in ("kept", "ssim_box", "ssim_region",
                                                                             "psnr_region")}
    preserved = {m: {lab: {"preserved": p, "total": n} for lab, (p, n) in v.items()} for m, v in table.items()}
    return {"preserved": preserved, "mean": mean}


def table_markdown(rows: Sequence[dict[str, Any]], rule: PreservationRule, title: str | None = None) -> str:
    """Preserved / total per model (rows) and label (columns), then mean kept fraction and box SSIM per model."""
    return lesion_summary_markdown(summarize_rows(rows), rule.describe(), title)


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
    summary = summarize_rows(result.rows)
    paths = {
        "lesions": write_csv(out / "lesions.csv", result.rows, LESION_COLUMNS),
        "markdown": atomic_write_text(out / "table.md", table_markdown(result.rows, result.rule, title)),
        "json": write_json(out / "table.json", {**(meta or {}), "rule": rule_json(result.rule),
                                                "preserved": summary["preserved"]}),
    }
    for i, crop in enumerate(result.crops):
        paths[f"figure_{i}"] = save_crop_figure(crop, out / "figures" / f"{_figure_stem(i, crop.box)}.png")
    return paths


def rule_json(rule: PreservationRule) -> dict[str, Any]:
    """The rule as stored in result files: threshold, margin (pixels) and its statement."""
    return {"threshold": rule.threshold, "margin": int(rule.margin), "text": rule.describe()}


def _figure_stem(i: int, b: LesionBox) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"lesion_{i:03d}_{volume_key(b.file)}_s{b.slice}_{b.label}")


def open_annotated(
    data: PathLike | None,
    boxes: PathLike | LesionAnnotations,
    mask_func=None,
    origin: str = "top",
    progress: bool | None = None,
) -> tuple[FastMRISliceDataset, list[LesionBox], LesionAnnotations]:
    """The annotated fastMRI data under ``mask_func``, and its boxes checked against it.

    Args:
        data: the fastMRI ``.h5`` file or folder the boxes name (``None`` is an error: boxes need their volumes).
        boxes: the boxes file (CSV or JSON, :func:`blindspot.data.lesions.read_annotations`) or its parsed content.
        mask_func: the under-sampling mask function (fastMRI seeding: masks fixed by file name).
        origin: ``"top"`` or ``"bottom"`` (rows of ``y`` counted from the image's bottom, as fastMRI+ draws them).
    Returns:
        ``(dataset, boxes with rows from the top, annotations)``; boxes are in pixels of the volumes'
        reconstruction images (each file's own size, no other crop).
    Raises:
        BlindspotError: no data, data that is not fastMRI, or a box that does not match the volumes (naming the row).
    """
    from blindspot.data.mri import FASTMRI, detect_kind

    annotations = boxes if isinstance(boxes, LesionAnnotations) else read_annotations(boxes)
    if data is None:
        raise BlindspotError(annotations.source, "lesion boxes need --data: the fastMRI volumes they name "
                                                 "(phantoms with lesions: blindspot data lesion-phantoms)")
    if detect_kind(data) != FASTMRI:
        raise BlindspotError(data, "lesion boxes name fastMRI volumes: give an .h5 file or a folder of them")
    dataset = FastMRISliceDataset(data, mask_func=mask_func, progress=progress)
    volumes = {v.fname: (v.num_slices, v.crop) for v in dataset.volumes}
    return dataset, validate_annotations(annotations, volumes, origin=origin), annotations


@dataclass(frozen=True)
class LesionAuditOptions:
    """The audit's lesion section: the preservation rule, the boxes' row origin, crop figures per acceleration."""

    rule: PreservationRule = PreservationRule()
    origin: str = "top"
    max_figures: int = 3
    batch_size: int = 4


#: The held-out lesion phantoms of ``docs/lesions.md``: volume seeds from 2000 (training uses 1000+, validation 0+,
#: the audit's FNAF phantoms 100+), lesion seed 2, 8 slices and 4 planted lesions per volume.
HELD_OUT_LESIONS = {"seed": 2000, "lesion_seed": 2, "slices": 8, "lesions_per_volume": 4}


def write_held_out_lesion_phantoms(folder: PathLike, volumes: int, shape: Sequence[int] | None = None,
                                   recon_size: Sequence[int] | None = None) -> tuple[Path, Path]:
    """Write ``volumes`` knee phantoms with planted lesions (:data:`HELD_OUT_LESIONS`) as ``folder/data/*.h5`` and their
    boxes as ``folder/boxes.csv``; ``shape`` / ``recon_size`` default to fastMRI's. Returns ``(data folder, boxes)``."""
    from blindspot.data.lesion_phantom import write_lesion_phantoms

    folder = Path(folder)
    geometry = {k: tuple(v) for k, v in (("shape", shape), ("recon_size", recon_size)) if v is not None}
    write_lesion_phantoms(folder / "data", folder / "boxes.csv", volumes, HELD_OUT_LESIONS["slices"],
                          HELD_OUT_LESIONS["lesions_per_volume"], seed=HELD_OUT_LESIONS["seed"],
                          lesion_seed=HELD_OUT_LESIONS["lesion_seed"], progress=False, **geometry)
    return folder / "data", folder / "boxes.csv"


@dataclass
class LesionSection:
    """What :func:`audit_lesions` gives the audit: ``results`` (its ``results.json`` ``"lesions"`` entry),
    ``markdown`` (the tables), ``figures`` (``("lesion", caption, png path)``), ``csv`` (``lesions.csv``) and
    ``seconds``."""

    results: dict[str, Any]
    markdown: str
    figures: list[tuple[str, str, Path]] = field(default_factory=list)
    csv: Path | None = None
    seconds: float = 0.0


def audit_lesions(
    models: Sequence[LoadedModel],
    data: PathLike | None,
    boxes: PathLike | LesionAnnotations,
    accelerations: Sequence[float],
    center_fractions: Sequence[float],
    mask_type: str,
    out_dir: PathLike,
    options: LesionAuditOptions | None = None,
    device: torch.device | str = "cpu",
    figures: bool = True,
    progress: bool | None = None,
) -> LesionSection:
    """The audit's lesion section: :func:`evaluate_lesions` at every acceleration, as ``blindspot lesions`` runs it.

    The zero-filled baseline is added in front of ``models`` unless it is among them. Writes ``out_dir/lesions.csv``
    (one row per acceleration, model and lesion: ``acceleration`` then :data:`LESION_COLUMNS`) and, with ``figures``,
    up to ``options.max_figures`` crop figures per acceleration in ``out_dir/figures/lesions/``.

    Args:
        models: the audited models (:class:`blindspot.models.loading.LoadedModel`, on ``device``).
        data, boxes: the annotated fastMRI data and its boxes (:func:`open_annotated`).
        accelerations, center_fractions: one centre fraction per acceleration.
        mask_type: ``"random"`` or ``"equispaced"`` (masks seeded by file name, as everywhere).
    """
    t0 = time.perf_counter()
    opts = options or LesionAuditOptions()
    if opts.max_figures < 0 or opts.batch_size < 1:
        raise BlindspotError(None, "lesion max_figures must be >= 0 and batch_size >= 1")
    if not any(m.architecture == ZERO_FILLED for m in models):
        models = [*load_eval_models([ZERO_FILLED], device=device, zero_filled=False), *models]
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []
    per_acc: dict[str, Any] = {}
    md: list[str] = []
    figs: list[tuple[str, str, Path]] = []
    meta: dict[str, Any] = {}
    annotations: PathLike | LesionAnnotations = boxes
    for acc, cf in zip(accelerations, center_fractions):
        acc = float(acc)
        dataset, checked, annotations = open_annotated(data, annotations, create_mask_func(mask_type, [acc], [cf]),
                                                       opts.origin, progress)
        res = evaluate_lesions(models, dataset, checked, opts.rule, batch_size=opts.batch_size, device=device,
                               max_crops=opts.max_figures if figures else 0, progress=progress)
        rows += [{"acceleration": acc, **r} for r in res.rows]
        key = f"{acc:g}x"
        per_acc[key] = {"acceleration": acc, "center_fraction": float(cf), **summarize_rows(res.rows)}
        md.append(lesion_summary_markdown(per_acc[key], opts.rule.describe(),
                                   f"**{acc:g}×: lesions preserved / total** ({len(checked)} lesions on "
                                   f"{len({b.key for b in checked})} slices, {mask_type} masks)"))
        for i, crop in enumerate(res.crops):
            b = crop.box
            path = save_crop_figure(crop, out / "figures" / "lesions" / f"{key}_{_figure_stem(i, b)}.png")
            figs.append(("lesion", f"{acc:g}×: {b.label}, {b.file} slice {b.slice} (box {b.width}×{b.height} px)",
                         path))
        meta = {"lesions": len(checked), "slices": len({b.key for b in checked}),
                "volumes": len({volume_key(b.file) for b in checked}),
                "labels": dict(Counter(b.label for b in checked)),
                "study_level_rows_skipped": annotations.study_level}
    csv = write_csv(out / "lesions.csv", rows, ("acceleration", *LESION_COLUMNS))
    results = {"data": str(data), "boxes": str(annotations.source), "origin": annotations.origin or opts.origin,
               **meta,
               "mask_type": mask_type, "rule": rule_json(opts.rule), "models": [m.name for m in models],
               "by_acceleration": per_acc}
    md_text = "## Lesions\n\n" + "\n".join(md)
    return LesionSection(results, md_text, figs, csv, time.perf_counter() - t0)
