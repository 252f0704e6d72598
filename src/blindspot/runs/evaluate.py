"""Evaluate reconstruction models on a validation set: the source document's Table 1 (SSIM and NMSE, mean ± std,
plus PSNR) at each acceleration, as Markdown, CSV and JSON, and optionally one CSV row per slice.

Metrics follow fastMRI (:mod:`blindspot.metrics`): each volume's SSIM is the mean over its slices, NMSE and PSNR
are over all of its pixels, the data range is the volume's maximum; the table reports mean ± (population) standard
deviation over volumes, and the JSON also over slices. All models are run on the same batches (one pass over the
data per acceleration), with masks seeded by file name, so every row sees identical inputs. Per-slice results are
appended to ``slices.jsonl`` after each acceleration, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from blindspot.data.sample import collate_mri
from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import append_jsonl, atomic_write_text, read_jsonl, write_csv, write_json
from blindspot.metrics import TABLE1_METRICS, VolumeMetrics
from blindspot.training.mri import reconstruct_batch
from blindspot.models.loading import DISPLAY_NAMES, LoadedModel, load_model
from blindspot.physics.mri import MaskFunc, create_mask_func
from blindspot.report.tables import table1_markdown

ZERO_FILLED = "zero-filled"
METRICS = TABLE1_METRICS


def load_eval_models(
    sources: Sequence[str],
    names: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    zero_filled: bool = True,
    arch: str | None = None,
    hparams: dict[str, Any] | None = None,
) -> list[LoadedModel]:
    """Load MRI reconstruction models (checkpoints, bundled names or ``"zero-filled"``) as table rows.

    Args:
        sources: checkpoint paths or names (:func:`blindspot.models.loading.load_model`); ``"zero-filled"`` stands
            for the baseline.
        names: row labels, one per source (default: the architecture's display name, made unique with the file
            name when two rows would share it).
        device: where the models run.
        zero_filled: put the zero-filled baseline first if it is not among ``sources``.
        arch, hparams: architecture and hyper-parameters for bare state dicts (e.g. a fastMRI U-Net).
    A CT network is a one-line error naming it: these rows are evaluated on MRI data.
    """
    if names is not None and len(names) != len(sources):
        raise BlindspotError(None, f"give one --names entry per checkpoint ({len(sources)}), got {len(names)}")
    sources = list(sources)
    names = list(names) if names is not None else [None] * len(sources)
    if zero_filled and ZERO_FILLED not in sources:
        sources.insert(0, ZERO_FILLED)
        names.insert(0, None)
    out: list[LoadedModel] = []
    for src, name in zip(sources, names):
        if src == ZERO_FILLED:
            m = load_model(ZERO_FILLED, device, name=name or DISPLAY_NAMES[ZERO_FILLED], warn=False)
            m.source = "baseline"
        else:
            m = load_model(src, device, architecture=arch, hparams=hparams, name=name, warn=False)
            if m.modality != "mri":
                raise BlindspotError(src, f"is a {m.modality.upper()} network ({m.architecture}); MRI "
                                          "reconstruction is evaluated here")
            if name is None:
                m.name = DISPLAY_NAMES.get(m.architecture, m.architecture)
        out.append(m)
    labels = [m.name for m in out]
    for m in out:  # make default labels unique
        if labels.count(m.name) > 1 and m.source not in ("baseline", "registry"):
            m.name = f"{m.name} ({Path(m.source).stem})"
    labels = [m.name for m in out]
    dupes = sorted({n for n in labels if labels.count(n) > 1})
    if dupes:
        raise BlindspotError(None, f"two rows would be called {dupes[0]!r}; give --names")
    return out


def run_models(
    models: Sequence[LoadedModel],
    dataset: Dataset,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    desc: str = "evaluate",
) -> dict[str, VolumeMetrics]:
    """Run every model on every batch of ``dataset``; returns per-model :class:`VolumeMetrics`.

    Predictions are mapped back to the data's units (``stats.invert``) before scoring against the target.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_mri, num_workers=0)
    metrics = {m.name: VolumeMetrics() for m in models}
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, unit="batch", disable=None if progress is None else not progress):
            batch = batch.to(device)
            for m in models:
                pred = batch.stats.invert(reconstruct_batch(m.model, batch))
                if not torch.isfinite(pred).all():
                    raise BlindspotError(m.source, f"model output contains NaN or Inf on {batch.keys[0]}")
                metrics[m.name].update(pred, batch.target, batch.fname, batch.slice_num, batch.max_value)
    return metrics


def summary_row(model: str, acceleration: float, center_fraction: float, metrics: VolumeMetrics) -> dict[str, Any]:
    """One table row: per-volume mean/std of SSIM, NMSE, PSNR plus the per-slice ones and the counts."""
    s = metrics.summary()
    row: dict[str, Any] = {"model": model, "acceleration": acceleration, "center_fraction": center_fraction}
    for key in METRICS:
        row[f"{key}_mean"], row[f"{key}_std"] = s[key]["mean"], s[key]["std"]
    for key in METRICS:
        row[f"{key}_slice_mean"], row[f"{key}_slice_std"] = s[f"{key}_slice"]["mean"], s[f"{key}_slice"]["std"]
    row["volumes"], row["slices"] = s["ssim"]["n"], s["ssim_slice"]["n"]
    return row


@dataclass
class EvalResult:
    """Rows of the table (one per model and acceleration) and, per slice, the raw scores."""

    rows: list[dict[str, Any]]
    slices: list[dict[str, Any]]


def evaluate_models(
    models: Sequence[LoadedModel],
    accelerations: Sequence[float],
    center_fractions: Sequence[float],
    open_dataset: Callable[[MaskFunc], Dataset],
    *,
    mask_type: str = "random",
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    out_dir: PathLike | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> EvalResult:
    """Table 1 for ``models``: one data pass per (acceleration, centre fraction).

    Args:
        open_dataset: builds the validation set for a mask function (masks seeded by file name).
        out_dir: if given, per-slice scores are appended to ``out_dir/slices.jsonl`` after each acceleration; with
            ``resume`` the accelerations already there for every model are not recomputed.
    """
    if len(accelerations) != len(center_fractions):
        raise BlindspotError(None, "give one centre fraction per acceleration")
    log = Path(out_dir) / "slices.jsonl" if out_dir is not None else None
    done_rows: list[dict[str, Any]] = []
    if log is not None and log.exists():
        if not resume:
            raise BlindspotError(log.parent, "already holds an evaluation (slices.jsonl); pass --resume or use "
                                             "another --out")
        done_rows = read_jsonl(log)
    names = [m.name for m in models]
    result_slices: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for acc, cf in zip(accelerations, center_fractions):
        acc, cf = float(acc), float(cf)
        previous = [r for r in done_rows if float(r["acceleration"]) == acc and float(r["center_fraction"]) == cf]
        have = {r["model"] for r in previous}
        if previous and have >= set(names):
            per_model = {n: VolumeMetrics.from_rows(r for r in previous if r["model"] == n) for n in names}
            unique = {(r["model"], r["fname"], r["slice"]): r for r in previous if r["model"] in names}
            slices = list(unique.values())
        else:
            if previous and log is not None:  # an incomplete setting (models added, or a cut-off write): redo it
                done_rows = [
                    r for r in done_rows if not (float(r["acceleration"]) == acc and float(r["center_fraction"]) == cf)
                ]
                atomic_write_text(log, "")
                append_jsonl(log, done_rows)
            dataset = open_dataset(create_mask_func(mask_type, [acc], [cf]))
            per_model = run_models(models, dataset, batch_size, device, progress, desc=f"evaluate {acc:g}x")
            slices = [
                {"model": n, "acceleration": acc, "center_fraction": cf, **r}
                for n in names for r in per_model[n].slice_rows
            ]
            if log is not None:
                append_jsonl(log, slices)
        result_slices.extend(slices)
        rows.extend(summary_row(n, acc, cf, per_model[n]) for n in names)
    return EvalResult(rows, result_slices)


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------
def table_json(rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"accelerations": {"4x": {"U-Net": {"ssim": {"mean", "std", "slice_mean", "slice_std"}, …}}}, …}``."""
    out: dict[str, Any] = {"table": "Table 1: validation set evaluation with SSIM, NMSE and PSNR",
                           "statistic": "per-volume mean ± population std (fastMRI); slice_* over slices",
                           **(meta or {}), "accelerations": {}}
    for r in rows:
        key = f"{float(r['acceleration']):g}x"
        entry = out["accelerations"].setdefault(key, {})
        entry[r["model"]] = {
            **{k: {"mean": r[f"{k}_mean"], "std": r[f"{k}_std"], "slice_mean": r[f"{k}_slice_mean"],
                   "slice_std": r[f"{k}_slice_std"]} for k in METRICS},
            "center_fraction": r["center_fraction"], "volumes": r["volumes"], "slices": r["slices"],
        }
    return out


TABLE_COLUMNS = (
    "model", "acceleration", "center_fraction",
    "ssim_mean", "ssim_std", "nmse_mean", "nmse_std", "psnr_mean", "psnr_std",
    "ssim_slice_mean", "ssim_slice_std", "nmse_slice_mean", "nmse_slice_std", "psnr_slice_mean", "psnr_slice_std",
    "volumes", "slices",
)
SLICE_COLUMNS = ("model", "acceleration", "center_fraction", "fname", "slice", "ssim", "nmse", "psnr", "max_value")


def write_tables(out_dir: PathLike, result: EvalResult, per_slice: bool = False, meta: dict[str, Any] | None = None,
                 title: str | None = None) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv``, ``table.json`` (and ``slices.csv``) atomically; returns their paths."""
    out = Path(out_dir)
    paths = {
        "markdown": atomic_write_text(out / "table.md", table1_markdown(result.rows, title)),
        "csv": write_csv(out / "table.csv", result.rows, TABLE_COLUMNS),
        "json": write_json(out / "table.json", table_json(result.rows, meta)),
    }
    if per_slice:
        paths["slices"] = write_csv(out / "slices.csv", result.slices, SLICE_COLUMNS)
    return paths
