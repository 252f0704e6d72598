"""Invariance runs (DESIGN.md §1.3): data discovery, run folders, record loops and reports, below the CLI.

Python entry points (each takes objects; ``blindspot invariances`` only parses arguments and calls one):

* :func:`run_invariances` — image-domain invariances by optimisation
  (:class:`~blindspot.attacks.invariance.InvarianceAttack`): for a CT denoiser on its normalised low-dose input,
  for any MRI network (image, image + mask or k-space convention) on the true image through the acquisition.
* :func:`run_train_generator` — train the conditional generator of natural invariances with its WGAN-GP critic
  (:mod:`blindspot.attacks.natural`), checkpointed and resumable.
* :func:`run_sample` — draw natural invariances from a trained generator and score them.

The model is a :class:`~blindspot.models.loading.LoadedModel` (from :func:`~blindspot.models.loading.load_model`), a
:class:`~blindspot.models.adapters.Network` or a bare ``nn.Module``. The images are either :class:`DataOptions`
(what the CLI's data flags say, resolved against the checkpoint's physics: built-in phantoms, or ``data`` — CT: a
DICOM series, the LDCT layout or ``.npy`` files in HU; MRI: fastMRI HDF5 or image files) or an image set built from
tensors (:meth:`CTImageSet.from_tensor`: low-dose images in HU; :meth:`MRIImageSet.from_tensor`: true images and
their acquisition).

**Natural invariances of MRI networks.** The generator's condition is the normalised zero-filled input. For an
image-convention network (the U-Net) it is trained on patches of it, as for CT. A network that needs the mask or the
k-space (I-RIM, a k-space network) is trained on whole images, and each generated change is made realisable by the
acquisition — taken as a change of the true image and measured again (``AcquisitionTarget`` in
:mod:`blindspot.attacks.natural`) — so the network gets real measurements in its own convention and nothing the
mask hides counts as an invariance.

A run folder (:class:`~blindspot.runs.folder.RunFolder`) holds ``run.json`` (settings; a resumed run must match
them), ``records.jsonl`` (one line per image and restart, appended after each batch: the durable log),
``records.csv``, ``summary.json``, ``arrays/<key>.npz`` (HU for CT, normalised units for MRI), ``figures/<key>.png``
and ``section.html`` / ``report.html`` (the section the audit report includes); under ``torchrun``,
:func:`run_invariances` shares the batches among the processes and rank 0 merges (:mod:`blindspot.runs.ranks`).
A generator folder holds ``generator.pt`` and ``train_log.jsonl``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from blindspot.attacks.distances import Distance, build_distance
from blindspot.attacks.invariance import (DenoiserTarget, InvarianceAttack, InvarianceConfig, MRITarget, box_mask,
                                          mri_decomposition, null_range_images, square_contrast, square_mask)
from blindspot.attacks.natural import (AcquisitionTarget, ImageTarget, NaturalConfig, NaturalInvarianceTrainer,
                                       NaturalTarget, evaluate_samples, load_generator, realise_samples,
                                       sample_invariances)
from blindspot.data.images import read_mask
from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import atomic_write_bytes, read_json, write_csv, write_json
from blindspot.metrics import mean_std
from blindspot.models.adapters import Network, as_network, model_device
from blindspot.models.loading import LoadedModel, load_model
from blindspot.physics.ct import HUNormalization
from blindspot.report.invariance_figures import (ct_invariance_figure, invariance_section_html, mri_invariance_figure,
                                                 natural_samples_figure, write_invariance_report)
from blindspot.runs.folder import RunFolder
from blindspot.runs.ranks import RankRecords, joined, open_folder
from blindspot.runs.images import CTImageSet, DataOptions, ImageBatch, MRIImageSet, as_image_set
__all__ = ["GeneratorTraining", "InvarianceRun", "parse_region", "run_invariances", "run_sample", "run_train_generator"]

#: Per-row metrics of an image-domain invariance (see :meth:`InvarianceResult.metrics`).
METRIC_KEYS = ("mean_abs_change", "max_abs_change", "rms_change", "output_mean_abs_change", "output_rms_change",
               "change_ratio", "distance", "fidelity", "objective")
#: Every numeric record column that the summary aggregates.
AGGREGATE_KEYS = METRIC_KEYS + (
    "null_mean_abs", "range_mean_abs", "null_energy_fraction", "input_mean_abs_change", "square_inside",
    "square_outside", "square_ratio", "iterations", "critic_real", "critic_samples", "critic_noise", "critic_gap",
    "sample_std",
)  # fmt: skip
#: Default HU box of CT invariances (air … the top of a 12-bit scanner range).
CT_BOUNDS_HU = (-1024.0, 3071.0)


def _resolve(model: "LoadedModel | Network | nn.Module", images: Any) -> tuple[LoadedModel, Network]:
    """The model's description and its network; a bare network's modality comes from the images when unknown."""
    if isinstance(model, LoadedModel):
        return model, model.network
    net = as_network(model)
    modality = net.modality or getattr(images, "modality", None) or "mri"
    return LoadedModel(net.module, net.name, modality, type(net.module).__name__, "python"), net


def _model_spec(model: LoadedModel) -> str | None:
    """What :func:`load_model` needs to load this model again (``None`` for a model given in Python)."""
    if model.source not in ("registry", "python", "baseline") and Path(model.source).is_file():
        return model.source
    return model.architecture if model.source == "registry" else None


def _distance(d: "str | Distance", vgg_weights: PathLike | None, device: torch.device) -> tuple[str, Distance]:
    if isinstance(d, str):
        return d, build_distance(d, vgg_weights=vgg_weights, device=device)
    return str(getattr(d, "name", type(d).__name__)), d


def safe_name(key: str) -> str:
    """A file name for an image key (``[A-Za-z0-9._-]``, at most 150 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")[:150] or "image"


def save_npz(path: Path, **arrays: Any) -> None:
    """Write tensors and values as one compressed ``.npz``, atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v))
                                for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def aggregate(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and count of each numeric, finite column ``keys`` over ``rows``."""
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                and math.isfinite(float(r[k]))]
        if vals:
            m, s = mean_std(vals)
            out[k] = {"mean": m, "std": s, "n": len(vals)}
    return out


def parse_region(spec: "str | Tensor | None", height: int, width: int) -> Tensor | None:
    """Where ``x`` may change: ``square:SIZE`` (central), ``box:TOP,LEFT,H,W``, a ``.npy`` mask file, or a mask
    tensor → bool ``(H, W)`` (``None`` = everywhere)."""
    if spec is None or isinstance(spec, Tensor):
        return spec
    try:
        if spec.startswith("square:"):
            size = int(spec.split(":", 1)[1])
            if not 0 < size <= min(height, width):
                raise BlindspotError(None, f"--region {spec}: square must fit the {height}x{width} image")
            return square_mask(height, width, size)
        if spec.startswith("box:"):
            top, left, bh, bw = (int(v) for v in spec.split(":", 1)[1].split(","))
            return box_mask(height, width, top, left, bh, bw)
    except ValueError:
        raise BlindspotError(None, f"bad --region {spec!r}: use square:SIZE or box:TOP,LEFT,H,W") from None
    if not Path(spec).is_file():
        raise BlindspotError(spec, "--region must be square:SIZE, box:TOP,LEFT,H,W or a .npy mask file")
    return read_mask(spec, (height, width))


def _region_setting(region: "str | Tensor | None") -> str | None:
    if isinstance(region, Tensor):
        return "mask:" + hashlib.sha1(region.detach().cpu().numpy().tobytes()).hexdigest()[:12]
    return region


def _zoom_box(square: Any, height: int, width: int) -> tuple[int, int, int, int] | None:
    """A box three times a model's invariant square around the image centre, when the image is much larger."""
    if not isinstance(square, int) or square < 1 or 3 * square >= min(height, width):
        return None
    side = 3 * square
    return (height - side) // 2, (width - side) // 2, side, side


def _inputs(images: Any) -> list[PathLike]:
    """The paths a run reads (its folder may not lie inside them)."""
    return [images.data] if isinstance(images, DataOptions) and images.data is not None else []


def _figures_made(folder: RunFolder) -> int:
    return sum(1 for _ in folder.file("figures").glob("*.png")) if folder.file("figures").is_dir() else 0


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class InvarianceRun:
    """What an invariance or sampling run wrote.

    Attributes:
        out: the run folder.
        rows: every record (those of earlier runs of a resumed folder included).
        summary: ``summary.json`` (settings, aggregate of every record column, units).
    """

    out: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    def lines(self) -> list[str]:
        """The terminal summary."""
        agg, unit, s = self.summary["aggregate"], self.summary["units"], self.summary
        if s["command"] == "invariances sample":
            head = [f"natural invariances of {s['model']}: {len(self.rows)} image(s) × {s['config']['samples']} "
                    "samples"]
            keys = ("mean_abs_change", "output_mean_abs_change", "change_ratio", "sample_std", "critic_real",
                    "critic_samples", "critic_noise")
        else:
            cfg = s["config"]
            head = [f"invariances of {s['model']} ({s['modality']}, distance {cfg['distance']}, alpha "
                    f"{cfg['alpha']:g}): {len(self.rows)} invariance(s) of {s['images']} image(s)"]
            keys = ("mean_abs_change", "output_mean_abs_change", "change_ratio", "distance", "fidelity",
                    "null_mean_abs", "range_mean_abs", "square_ratio")
        for k in keys:
            if k in agg:
                u = f" {unit}" if "abs_change" in k or k.endswith("_mean_abs") or k == "sample_std" else ""
                head.append(f"  {k:24s} {agg[k]['mean']:.4g} ± {agg[k]['std']:.2g}{u}")
        return head + [f"records: {self.out / 'records.csv'}", f"report: {self.out / 'report.html'}"]


def _finish(folder: RunFolder, rows: list[dict[str, Any]], summary: dict[str, Any], n_figures: int) -> InvarianceRun:
    """Summary, CSV, section and report of a finished (or resumed-and-finished) run."""
    summary["aggregate"] = aggregate(rows, AGGREGATE_KEYS)
    summary["images"] = len({r["key"] for r in rows})
    summary["rows"] = len(rows)
    if rows:
        summary["converged_fraction"] = sum(bool(r.get("converged")) for r in rows) / len(rows) \
            if "converged" in rows[0] else None
        write_csv(folder.file("records.csv"), rows)
    write_json(folder.file("summary.json"), summary)
    figs = sorted(folder.file("figures").glob("*.png"))[: max(n_figures, 0)] if folder.file("figures").is_dir() else []
    title = "Natural invariances" if summary.get("command") == "invariances sample" else "Invariances"
    section = invariance_section_html(summary, rows, [(f.stem, f) for f in figs], title=title)
    write_invariance_report(folder.path, section, title=f"blindspot {title.lower()}: {summary.get('model', '')}")
    return InvarianceRun(folder.path, rows, summary)


# ----------------------------------------------------------------------------------------------------------------
# Image-domain invariances
# ----------------------------------------------------------------------------------------------------------------
def run_invariances(
    model: "LoadedModel | Network | nn.Module",
    out: PathLike,
    images: "DataOptions | CTImageSet | MRIImageSet" = DataOptions(),
    config: InvarianceConfig = InvarianceConfig(),
    distance: "str | Distance" = "mse",
    fidelity: "str | Distance | None" = None,
    *,
    region: "str | Tensor | None" = None,
    bounds_hu: tuple[float, float] | None = CT_BOUNDS_HU,
    vgg_weights: PathLike | None = None,
    batch_size: int = 4,
    figures: int = 8,
    device: torch.device | str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
) -> InvarianceRun:
    """Image-domain invariances of every image, recorded in the run folder ``out`` (resumable).

    Args:
        model: the network (CT: an image-to-image denoiser; MRI: any convention).
        out: the run folder.
        images: :class:`DataOptions`, or an image set.
        config: the optimisation (``config.bounds`` is set from ``bounds_hu`` for CT).
        distance, fidelity: ``D`` and ``‖·‖`` — names (``mse``, ``ssim``, ``vgg``, ``rms``) or distances;
            ``fidelity=None`` uses ``D`` (the source document's choice).
        region: where ``x`` may change (see :func:`parse_region`).
        bounds_hu: CT only: keep ``x_inv`` within ``(low, high)`` HU (``None``: no bounds).
        vgg_weights: VGG16 weights for the ``vgg`` distance.
        batch_size: images per optimisation batch (× ``config.restarts`` rows).
        figures: figures for the first ``figures`` images.
        device: where a parameter-free model runs (a model with weights runs where they are).
        resume, overwrite: continue the folder's records, or replace them.

    Returns:
        The records and summary (CT changes in HU; MRI changes in the clean input's normalised units).
    """
    loaded, net = _resolve(model, images)
    source = as_image_set(images, loaded)
    dev = model_device(net.module, device)
    dname, dist = _distance(distance, vgg_weights, dev)
    fname, fid = (dname, None) if fidelity is None or fidelity == dname else _distance(fidelity, vgg_weights, dev)
    if bounds_hu is not None and not bounds_hu[0] < bounds_hu[1]:
        raise BlindspotError(None, f"HU bounds {bounds_hu}: LOW must be below HIGH")
    settings = {"model": loaded.name, "model_source": loaded.source, "architecture": loaded.architecture,
                "modality": loaded.modality, **source.settings, "distance": dname, "fidelity": fname,
                **{k: v for k, v in config.to_dict().items() if k not in ("bounds", "progress")},
                "region": _region_setting(region), "bounds_hu": None if bounds_hu is None else list(bounds_hu)}
    # under torchrun each rank optimises its share of the batches (blindspot.runs.ranks); rank 0 merges and reports
    with joined(dev) as ranks:
        folder = open_folder(ranks, lambda writer: RunFolder(out, "invariances", settings, resume, overwrite,
                                                             inputs=_inputs(images), writer=writer))
        log = RankRecords(folder, ranks)
        rows = log.rows()
        done: dict[str, int] = {}
        for r in rows:
            done[r["key"]] = done.get(r["key"], 0) + 1
        position = _positions(source)  # skip other ranks' images without loading them, where keys are known
        todo = lambda key: done.get(key, 0) < config.restarts and (  # noqa: E731
            key not in position or log.mine(position[key] // batch_size))
        common = dict(folder=folder, log=log, rows=rows, todo=todo, region=region, batch_size=batch_size,
                      figures=figures, device=dev, distance_name=dname)
        if source.modality == "ct":
            summary = _ct_invariances(loaded, net, source, config, dist, fid, bounds_hu, **common)
        else:
            summary = _mri_invariances(loaded, net, source, config, dist, fid, **common)
        summary["config"] = dict(config.to_dict(), distance=dname, fidelity=fname)
        for d in (dist, fid):
            if getattr(d, "weights_info", None):
                summary["distance_weights"] = d.weights_info  # which VGG16 weights (ImageNet or not)
        if log.sharded:
            rows = log.merge()
        if not ranks.is_main:
            ranks.barrier()  # rank 0 writes the summary and the report
            return InvarianceRun(folder.path, rows, read_json(folder.file("summary.json")))
        run = _finish(folder, rows, summary, figures)
        ranks.barrier()
    return run


def _positions(source: "CTImageSet | MRIImageSet") -> dict[str, int]:
    """Key → position in the image set, where known before loading (CT items, MRI tensors)."""
    keys = [item.key for item in source.items] if isinstance(source, CTImageSet) else (source.keys or [])
    return {k: i for i, k in enumerate(keys)}


def _ct_invariances(loaded: LoadedModel, net: Network, source: CTImageSet, config: InvarianceConfig,
                    dist: Distance, fid: Distance | None, bounds_hu: tuple[float, float] | None, *,
                    folder: RunFolder, log: RankRecords, rows: list, todo, region, batch_size: int, figures: int,
                    device: torch.device, distance_name: str) -> dict[str, Any]:
    norm = source.normalization_for(loaded)
    bounds = None if bounds_hu is None else (float(norm.to_network(torch.tensor(bounds_hu[0]))),
                                             float(norm.to_network(torch.tensor(bounds_hu[1]))))
    config = dataclasses.replace(config, bounds=bounds)
    attack = InvarianceAttack(dist, fid, config)
    target = DenoiserTarget(net)
    square = getattr(net.module, "square", None)
    figures_made = _figures_made(folder)
    for batch in source.batches(batch_size, todo):
        if not log.mine(batch.index[0] // batch_size):
            continue
        x = norm.to_network(batch.images.to(device))
        field = None if batch.field is None else batch.field.to(device)  # CT field of view: out-of-field is no image
        res = attack(target, x, region=parse_region(region, x.shape[-2], x.shape[-1]), item_ids=batch.index,
                     field=field)
        m = res.metrics(scale=norm.std)
        contrast = square_contrast(res.delta[:, :, 0], square=int(square), field=res.field) \
            if isinstance(square, int) and square <= min(x.shape[-2:]) else None
        new = []
        for b, (idx, key) in enumerate(zip(batch.index, batch.keys)):
            x_hu, xi_hu = norm.to_hu(res.x[b, 0]), norm.to_hu(res.x_inv[b, :, 0])
            fx_hu, fi_hu = norm.to_hu(res.f_x[b, 0]), norm.to_hu(res.f_x_inv[b, :, 0])
            name = safe_name(key)
            save_npz(folder.file("arrays", f"{name}.npz"), x=x_hu, x_inv=xi_hu, f_x=fx_hu, f_x_inv=fi_hu,
                     units="HU", normalization_mean=norm.mean, normalization_std=norm.std)
            if (idx < figures) if log.sharded else (figures_made < figures):  # ranks: the first images' figures
                ct_invariance_figure(x_hu, xi_hu, fx_hu, fi_hu, folder.file("figures", f"{name}.png"),
                                     title=f"{loaded.name}: {key} (D = {distance_name}, α = {config.alpha:g})",
                                     zoom=_zoom_box(square, x.shape[-2], x.shape[-1]))
                figures_made += 1
            for r in range(res.x_inv.shape[1]):
                row = {"key": key, "index": idx, "restart": r, "model": loaded.name, "modality": "ct",
                       "distance_name": distance_name, "alpha": config.alpha, "units": "HU"}
                row.update({k: float(m[k][b, r]) for k in METRIC_KEYS})
                row["iterations"] = int(res.iterations[b, r])
                row["converged"] = bool(res.converged[b, r])
                if contrast is not None:
                    row["square_inside"] = float(contrast["inside"][b, r]) * norm.std
                    row["square_outside"] = float(contrast["outside"][b, r]) * norm.std
                    row["square_ratio"] = float(contrast["ratio"][b, r])
                new.append(row)
        _append(folder, rows, new, log)
    return {"command": "invariances", "model": loaded.name, "architecture": loaded.architecture, "modality": "ct",
            "units": "HU", "dose": source.dose, "normalization": {"mean": norm.mean, "std": norm.std}}


def _append(folder: RunFolder, rows: list[dict[str, Any]], new: list[dict[str, Any]],
            log: RankRecords | None = None) -> None:
    """Log a batch's records durably, then refresh the CSV (a ``torchrun`` rank: into its own file, ordered by
    image and restart; rank 0 writes the CSV after the merge)."""
    if log is None:
        folder.append(new)
    else:
        log.append(new, [(r["index"], r["restart"]) for r in new])
    rows.extend(new)
    if log is None or not log.sharded:
        write_csv(folder.file("records.csv"), rows)


def _mri_invariances(loaded: LoadedModel, net: Network, source: MRIImageSet, config: InvarianceConfig,
                     dist: Distance, fid: Distance | None, *, folder: RunFolder, log: RankRecords, rows: list, todo,
                     region, batch_size: int, figures: int, device: torch.device,
                     distance_name: str) -> dict[str, Any]:
    attack = InvarianceAttack(dist, fid, config)
    figures_made = _figures_made(folder)
    for batch in source.batches(batch_size, todo):
        if not log.mine(batch.index[0] // batch_size):  # (MRI data sets: keys are only known once read)
            continue
        target = MRITarget(net, batch.images.to(device), batch.acquisition)
        x = target.x
        res = attack(target, x, region=parse_region(region, x.shape[-2], x.shape[-1]), item_ids=batch.index)
        m = res.metrics()
        dec = mri_decomposition(target, res)
        null_abs, range_abs = null_range_images(target, res)
        accelerations = target.acquisition.accelerations
        new = []
        for b, (idx, key) in enumerate(zip(batch.index, batch.keys)):
            acc = float(accelerations[b])
            name = safe_name(key)
            save_npz(folder.file("arrays", f"{name}.npz"), x=res.x[b, 0], x_inv=res.x_inv[b, :, 0], f_x=res.f_x[b, 0],
                     f_x_inv=res.f_x_inv[b, :, 0], null_abs=null_abs[b, :, 0], range_abs=range_abs[b, :, 0],
                     mask=_saved_mask(target.mask[b, 0]).cpu(), units="normalised",
                     norm_mean=target.mean[b].reshape(()).cpu(), norm_std=target.std[b].reshape(()).cpu())
            if (idx < figures) if log.sharded else (figures_made < figures):  # ranks: the first images' figures
                mri_invariance_figure(res.x[b, 0], res.x_inv[b, 0, 0], res.f_x[b, 0], res.f_x_inv[b, 0, 0],
                                      null_abs[b, 0, 0], range_abs[b, 0, 0], folder.file("figures", f"{name}.png"),
                                      std=res.restart_std()[b, 0] if res.x_inv.shape[1] > 1 else None,
                                      title=f"{loaded.name}: {key} ({acc:g}x, D = {distance_name}, "
                                            f"α = {config.alpha:g})")
                figures_made += 1
            for r in range(res.x_inv.shape[1]):
                row = {"key": key, "index": idx, "restart": r, "model": loaded.name, "modality": "mri",
                       "acceleration": acc, "distance_name": distance_name, "alpha": config.alpha,
                       "units": "normalised"}
                row.update({k: float(m[k][b, r]) for k in METRIC_KEYS})
                row.update({k: float(v[b, r]) for k, v in dec.items()})
                row["iterations"] = int(res.iterations[b, r])
                row["converged"] = bool(res.converged[b, r])
                new.append(row)
        _append(folder, rows, new, log)
    return {"command": "invariances", "model": loaded.name, "architecture": loaded.architecture, "modality": "mri",
            "units": "normalised", "convention": net.convention, **source.info}


# ----------------------------------------------------------------------------------------------------------------
# Natural invariances
# ----------------------------------------------------------------------------------------------------------------
def natural_target(net: Network, batch: ImageBatch, norm: HUNormalization | None,
                   device: torch.device) -> NaturalTarget:
    """The network and the conditions of natural invariances for a batch (see the module docs): CT and
    image-convention MRI networks on (patches of) their normalised inputs; mask and k-space MRI networks on whole
    images, through the acquisition."""
    if batch.acquisition is None:  # CT: the field of view (if any) keeps patches and scores inside it
        return ImageTarget(net, norm.to_network(batch.images.to(device)),
                           None if batch.field is None else batch.field.to(device))
    acq, truth = batch.acquisition.to(device), batch.images.to(device)
    if net.convention != "image":
        return AcquisitionTarget(net, acq, truth)
    with torch.no_grad():
        meas = acq.measure(truth)
        return ImageTarget(net, acq.normalization(meas).apply(meas.image))


@dataclass
class GeneratorTraining:
    """What :func:`run_train_generator` did.

    Attributes:
        checkpoint, log: ``generator.pt`` and ``train_log.jsonl``.
        start_step, step, steps: the step training started from (0, or a resumed checkpoint's), reached, asked for.
        logged: the loss rows logged by this call.
        target: what the checkpoint records about the network, its normalisation or acquisition, and the data.
    """

    checkpoint: Path
    log: Path
    start_step: int
    step: int
    steps: int
    logged: list[dict[str, float]] = field(default_factory=list)
    target: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        if self.start_step >= self.steps:
            return [f"generator already trained for {self.start_step} steps (asked for {self.steps}); nothing to do"]
        out = [f"resuming from step {self.start_step}"] if self.start_step else []
        if self.logged:
            last = self.logged[-1]
            out.append(f"step {last['step']}: fidelity {last['fidelity']:.4g}, distance {last['distance']:.4g}, "
                       f"critic Wasserstein estimate {last['wasserstein']:.4g}")
        return out + [f"generator: {self.checkpoint}", f"log: {self.log}"]


def run_train_generator(
    model: "LoadedModel | Network | nn.Module",
    out: PathLike,
    images: "DataOptions | CTImageSet | MRIImageSet" = DataOptions(),
    config: NaturalConfig = NaturalConfig(),
    steps: int = 2000,
    *,
    checkpoint_every: int = 200,
    log_every: int = 10,
    vgg_weights: PathLike | None = None,
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: bool = True,
) -> GeneratorTraining:
    """Train (or continue training) the generator of natural invariances in folder ``out``.

    Args:
        model: the network (CT: a denoiser; MRI: any convention, see the module docs).
        out: the folder of ``generator.pt`` and ``train_log.jsonl``.
        images: the training images (:class:`DataOptions` or an image set); all are held on the model's device.
        config: the generator, critic and loss settings.
        steps: generator steps in total (a resumed run continues up to it).
        checkpoint_every, log_every: steps between checkpoints and between log rows.
        vgg_weights: VGG16 weights for the ``vgg`` distance.
        device: where a parameter-free model runs.
        resume: continue ``out/generator.pt`` (its settings must match ``config``).
        progress: show a progress bar.
    """
    loaded, net = _resolve(model, images)
    options = images if isinstance(images, DataOptions) else None
    source = as_image_set(images, loaded)
    ckpt = Path(out) / "generator.pt"
    if ckpt.exists() and not resume:
        raise BlindspotError(ckpt, "already exists; pass --resume to continue training or choose another --out")
    if resume and not ckpt.exists():
        raise BlindspotError(ckpt, "nothing to resume: no generator checkpoint here")
    dev = model_device(net.module, device)
    batch = source.load_all()
    norm = source.normalization_for(loaded) if isinstance(source, CTImageSet) else None
    target = natural_target(net, batch, norm, dev)
    info: dict[str, Any] = {
        "model": _model_spec(loaded), "arch": loaded.architecture, "name": loaded.name, "modality": loaded.modality,
        "convention": net.convention, "whole_images": target.whole_images, "images": len(batch),
        "data": options.describe() if options is not None else "tensor",
        "data_options": options.settings() if options is not None else None,
    }
    if source.settings.get("skipped"):  # --skip-bad: what was left out of the training data
        info["skipped"] = source.settings["skipped"]
    if norm is not None:
        info.update(normalization=norm.as_dict(), dose=source.dose)
    else:
        info.update(source.info)
    weights = batch.weights if batch.weights is not None and bool((batch.weights != batch.weights[0]).any()) else None
    trainer = NaturalInvarianceTrainer(target, None, config, checkpoint=ckpt, target_info=info, weights=weights,
                                       vgg_weights=vgg_weights)
    start = trainer.step
    logged = trainer.train(steps, checkpoint_every=checkpoint_every, log_every=log_every, progress=progress) \
        if start < steps else []
    return GeneratorTraining(ckpt, ckpt.with_name("train_log.jsonl"), start, trainer.step, steps, logged, info)


def _sample_options(options: DataOptions, tinfo: Mapping[str, Any]) -> DataOptions:
    """Data options for sampling: what the caller left unset comes from the generator's training data (its size,
    the CT dose when sampling phantoms, the MRI sampling and crop)."""
    trained = dict(tinfo.get("data_options") or {})
    trained.update({k: tinfo[k] for k in ("dose", "mask_type", "acceleration") if tinfo.get(k) is not None})
    fill = {k: trained.get(k) for k in ("size", "mask_type", "acceleration", "center_fraction", "crop")
            if getattr(options, k) is None and trained.get(k) is not None}
    if options.data is None and options.dose is None and trained.get("dose") is not None:
        fill["dose"] = trained["dose"]
    if "crop" in fill:
        fill["crop"] = tuple(fill["crop"])
    return dataclasses.replace(options, **fill)


def run_sample(
    generator: PathLike,
    out: PathLike,
    model: "LoadedModel | Network | nn.Module | None" = None,
    images: "DataOptions | CTImageSet | MRIImageSet | None" = None,
    samples: int = 8,
    seed: int = 0,
    *,
    batch_size: int = 4,
    figures: int = 8,
    device: torch.device | str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
) -> InvarianceRun:
    """Draw ``samples`` natural invariances per image from a trained generator and score them (no optimisation).

    Args:
        generator: ``generator.pt``, or the folder holding it.
        out: the run folder.
        model: the network; ``None`` loads the one the generator was trained against (onto ``device``).
        images: :class:`DataOptions` (unset fields follow the generator's training data) or an image set.
        samples: invariances per image.
        seed: seeds the noise ``z`` of image ``i`` with ``seed·1000003 + i`` (the same samples whatever the batch).
        batch_size, figures, device, resume, overwrite: as :func:`run_invariances`.

    Returns:
        Per image: how far the samples move the network input and its output (CT in HU; MRI in normalised units),
        their diversity, and the critic's scores against real inputs and white noise of equal size.
    """
    gpath = Path(generator)
    gpath = gpath / "generator.pt" if gpath.is_dir() else gpath
    gen, critic, meta = load_generator(gpath, map_location="cpu")
    tinfo = meta["target"]
    if model is None:
        if not tinfo.get("model"):
            raise BlindspotError(gpath, "does not name the model it was trained against; give the model")
        model = load_model(tinfo["model"], device, architecture=tinfo.get("arch"), modality=tinfo.get("modality"))
    loaded, net = _resolve(model, images)
    if tinfo.get("modality") and tinfo["modality"] != loaded.modality:
        raise BlindspotError(gpath, f"was trained against a {tinfo['modality'].upper()} network, not "
                                    f"{loaded.name!r} ({loaded.modality.upper()})")
    if loaded.modality == "ct" and not loaded.normalization and tinfo.get("normalization"):
        loaded = dataclasses.replace(loaded, normalization=dict(tinfo["normalization"]))
    if images is None or isinstance(images, DataOptions):
        images = _sample_options(images or DataOptions(seed=seed), tinfo)
    source = as_image_set(images, loaded)
    dev = model_device(net.module, device)
    gen, critic = gen.to(dev), critic.to(dev)
    settings = {"generator": str(gpath), "model": loaded.name, "architecture": loaded.architecture,
                **source.settings, "samples": samples, "seed": seed}
    folder = RunFolder(out, "invariances sample", settings, resume, overwrite, inputs=_inputs(images))
    rows = folder.records()
    done = {r["key"] for r in rows}
    norm = source.normalization_for(loaded) if isinstance(source, CTImageSet) else None
    whole = net.convention != "image" and loaded.modality == "mri"  # as natural_target decides
    patch = None if whole else int(meta["config"].get("patch", 80))
    scale, units = (norm.std, "HU") if norm is not None else (1.0, "normalised")
    show = norm.to_hu if norm is not None else (lambda t: t)
    figures_made = _figures_made(folder)
    for batch in source.batches(batch_size, lambda key: key not in done):
        target = natural_target(net, batch, norm, dev)
        x, items = target.images, torch.arange(len(batch), device=dev)
        g = sample_invariances(gen, x, samples, seed=[seed * 1_000_003 + i for i in batch.index])
        realised = realise_samples(target, x, g, items)
        m = evaluate_samples(target, x, g, critic, patch=patch, scale=scale, seed=seed, items=items,
                             realised=realised)
        inputs, f_s, f_x = (t.cpu() for t in realised)
        new = []
        for b, (idx, key) in enumerate(zip(batch.index, batch.keys)):
            arrays = dict(x=show(x[b, 0].cpu()), samples=show(inputs[b, :, 0]), f_x=show(f_x[b, 0]),
                          f_samples=show(f_s[b, :, 0]))
            name = safe_name(key)
            save_npz(folder.file("arrays", f"{name}.npz"), **arrays, units=units)
            if figures_made < figures:
                natural_samples_figure(arrays["x"], arrays["samples"], arrays["f_x"], arrays["f_samples"],
                                       folder.file("figures", f"{name}.png"), units=units,
                                       title=f"{loaded.name}: natural invariances of {key}")
                figures_made += 1
            row = {"key": key, "index": idx, "model": loaded.name, "samples": samples, "units": units}
            row.update({k: float(v[b]) for k, v in m.items()})
            new.append(row)
        _append(folder, rows, new)
    summary = {"command": "invariances sample", "model": loaded.name, "modality": loaded.modality, "units": units,
               "convention": net.convention, "whole_images": whole, "generator": str(gpath),
               "generator_step": meta["step"], "generator_config": meta["config"],
               "config": {"samples": samples, "seed": seed, "distance": "generator"}}
    summary.update({"dose": source.dose} if norm is not None else source.info)
    return _finish(folder, rows, summary, figures)


def _saved_mask(mask: Tensor) -> Tensor:
    """One image's sampling mask as saved with its invariances: columns ``(w,)``, a 2-D mask ``(h, w)``."""
    return mask.reshape(-1) if mask.shape[0] == 1 else mask
