"""Supervised MRI reconstruction training on (zero-filled input, target) pairs, built on the generic engine.

* :func:`reconstruct_batch` — any MRI network's normalised reconstruction of an :class:`MRIBatch`: image-domain
  networks (U-Net, I-RIM) on the normalised zero-filled input, k-space networks (fastMRI's VarNet) on the batch's
  masked multi-coil k-space and boolean mask, their output centre-cropped to the target and normalised like it.
* :func:`mri_loss` — L1 (default, as the fastMRI U-Net baseline), MSE or SSIM loss between the model's output and the
  target. L1 and MSE compare normalised images (``N(target)``, clamped ±6 as fastMRI does); SSIM compares images in
  the data's own units with the volume's maximum as data range, i.e. exactly the evaluation metric.
* :class:`MRIValidator` — per-volume SSIM / NMSE / PSNR (fastMRI's definitions, :mod:`blindspot.metrics`) on a
  validation set, sharded over processes and gathered, so every rank returns the same numbers.
* :class:`EpochMasks` — training masks that change every epoch but are a pure function of
  ``(seed, epoch, volume)``: the augmentation of fastMRI's random training masks, yet deterministic for any number of
  processes or workers and exact on resume.
* :func:`split_volumes` — a seeded train/validation split by volume (never by slice, so no volume is in both).
* :func:`train_mri` — puts it together and writes a run folder (``last.pt``, ``best.pt``, ``log.jsonl``,
  ``summary.json``).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from blindspot.data.sample import MRIBatch, collate_mri
from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import write_json
from blindspot.metrics import VolumeMetrics, ssim
from blindspot.models.adapters import kspace_forward, network_convention, reconstruct
from blindspot.physics.mri import Mask, MaskFunc, Seed, draw_mask
from blindspot.training.distributed import DistContext
from blindspot.training.engine import CheckpointInfo, FitResult, StepContext, TrainConfig, Trainer

LOSSES = ("l1", "mse", "ssim")

#: The normalisation every MRI model here is trained with (DESIGN.md §1.1), stored in checkpoints.
NORMALIZATION = {"kind": "instance", "stats": "zero-filled input", "clamp": 6.0, "eps": 1e-11}


# ----------------------------------------------------------------------------------------------------------------
# Calling a network on a batch
# ----------------------------------------------------------------------------------------------------------------
def reconstruct_batch(model: nn.Module, batch: MRIBatch) -> Tensor:
    """The normalised reconstruction ``(B, 1, h, w)`` of a batch by any MRI network, in its calling convention.

    * ``image`` / ``image+mask`` networks: :func:`~blindspot.models.adapters.reconstruct` of ``N(input)`` (and the
      column mask);
    * ``kspace`` networks (fastMRI's VarNet): ``model(view_as_real(batch.kspace), batch.mask.bool().unsqueeze(-1),
      num_low_frequencies)`` — masked multi-coil k-space ``(B, C, H, W, 2)``, mask ``(B, 1, 1, W, 1)`` (2-D masks
      ``(B, 1, H, W, 1)``) and, when the forward takes a third argument, the mask function's centre columns per
      item (``batch.num_low_frequencies``, as the attacks pass their acquisition's;
      :func:`~blindspot.models.adapters.kspace_forward`) — whose image ``(B, H, W)`` in the data's units is
      centre-cropped to the target's ``(h, w)`` and normalised with the input's statistics (unclamped), so every
      network's output compares with ``N(target)`` alike.

    Raises:
        BlindspotError: a k-space network and a batch without multi-coil k-space (single-coil data, or a data set
        opened without ``kspace=True``), or an output of the wrong shape.
    """
    if network_convention(model) != "kspace":
        return reconstruct(model, batch.stats.apply(batch.input), batch.mask)
    name = type(getattr(model, "module", model)).__name__
    return kspace_forward(model, batch.multicoil_kspace(name), batch.mask, tuple(batch.target.shape[-2:]), batch.stats,
                          name, num_low_frequencies=batch.num_low_frequencies)


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------
def mri_loss(kind: str = "l1"):
    """Loss function for :class:`~blindspot.training.engine.Trainer` over :class:`MRIBatch` batches.

    Args:
        kind: ``"l1"`` or ``"mse"`` on normalised images, or ``"ssim"`` (``1 − SSIM`` in data units, data range =
            the volume maximum).
    Returns:
        ``loss(model, batch, ctx) -> (loss, {"l1": …})``; the extra is the normalised L1 error, logged for every
        kind so runs with different losses compare.
    """
    kind = kind.lower()
    if kind not in LOSSES:
        raise BlindspotError(None, f"unknown loss {kind!r}; choose from {', '.join(LOSSES)}")

    def loss_fn(model: nn.Module, batch: MRIBatch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        y = batch.stats.apply(batch.target)
        out = reconstruct_batch(model, batch)
        l1 = F.l1_loss(out, y)
        if kind == "l1":
            loss = l1
        elif kind == "mse":
            loss = F.mse_loss(out, y)
        else:
            loss = 1.0 - ssim(batch.stats.invert(out), batch.target, batch.max_value).mean()
        return loss, {"l1": l1.detach()}

    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
class MRIValidator:
    """Validation callback: per-volume SSIM / NMSE / PSNR means (and standard deviations) over a data set.

    Args:
        dataset: a dataset of :class:`~blindspot.data.sample.MRISample` (fixed masks, e.g. ``use_seed=True``).
        batch_size: per-process batch size.
        num_workers: loader workers.

    ``validator(model, dist)`` returns ``{"ssim", "nmse", "psnr", "ssim_std", "nmse_std", "psnr_std", "volumes",
    "slices"}``, identical on every rank.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 4, num_workers: int = 0) -> None:
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers

    def evaluate(self, model: nn.Module, dist: DistContext) -> VolumeMetrics:
        """Run ``model`` on this rank's shard and gather every rank's per-slice rows."""
        model = getattr(model, "module", model)  # no DDP collectives in evaluation: shards may differ in length
        was_training = model.training
        model.eval()
        loader = dist.loader(self.dataset, self.batch_size, shuffle=False, collate_fn=collate_mri,
                             num_workers=self.num_workers)
        metrics = VolumeMetrics()
        with torch.no_grad():
            for batch in loader:
                batch = batch.to(dist.device)
                pred = batch.stats.invert(reconstruct_batch(model, batch))
                metrics.update(pred, batch.target, batch.fname, batch.slice_num, batch.max_value)
        model.train(was_training)
        rows = dist.all_gather_objects(metrics.slice_rows)
        return VolumeMetrics.from_rows(itertools.chain.from_iterable(rows))

    def __call__(self, model: nn.Module, dist: DistContext) -> dict[str, float]:
        summary = self.evaluate(model, dist).summary()
        out: dict[str, float] = {}
        for key in ("ssim", "nmse", "psnr"):
            out[key] = summary[key]["mean"]
            out[f"{key}_std"] = summary[key]["std"]
        out["volumes"] = summary["ssim"]["n"]
        out["slices"] = summary["ssim_slice"]["n"]
        return out


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
class EpochMasks:
    """A mask function whose draw depends on ``(seed, epoch, the volume's name)`` only.

    Wraps any mask function (``inner(width, seed=...)``); the data set calls it with the volume's file name as seed
    (``use_seed=True``), and :meth:`set_epoch` changes the epoch. So each volume gets a fresh mask every epoch, the same
    whatever process, worker or order loads it, and a resumed run draws exactly the masks an uninterrupted one would.
    """

    def __init__(self, inner: MaskFunc, seed: int = 0) -> None:
        self.inner, self.seed, self.epoch = inner, int(seed), 0
        #: 2-D mask functions are called with the k-space height too (:func:`~blindspot.physics.mri.draw_mask`)
        self.two_dimensional = bool(getattr(inner, "two_dimensional", False))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, width: int, seed: Seed = None, height: int | None = None) -> Mask:
        return draw_mask(self.inner, width, height, f"{seed}|{self.seed}|{self.epoch}")

    def __repr__(self) -> str:
        return f"EpochMasks({self.inner!r}, seed={self.seed})"


class EpochDataset(Dataset):
    """``dataset`` with a ``set_epoch`` that the engine calls each epoch, forwarded to its :class:`EpochMasks`."""

    def __init__(self, dataset: Dataset, masks: EpochMasks) -> None:
        self.dataset, self.masks = dataset, masks

    def set_epoch(self, epoch: int) -> None:
        self.masks.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]


def _volume_of_items(dataset: Dataset) -> list[Any]:
    """The volume (file) of every item, read from the data set's index without loading data when possible."""
    base, indices = dataset, None
    while isinstance(base, Subset):
        indices = [base.indices[i] for i in (indices if indices is not None else range(len(base)))]
        base = base.dataset
    if hasattr(base, "samples") and isinstance(getattr(base, "samples"), list):
        keys = [s[0] for s in base.samples]
    elif hasattr(base, "seeds") and hasattr(base, "slices"):  # PhantomDataset: item i is in volume i // slices
        keys = [i // int(base.slices) for i in range(len(base))]
    elif hasattr(base, "volume_keys"):
        keys = list(base.volume_keys())
    else:  # load every item (only for small data sets without an index)
        keys = [base[i].fname for i in range(len(base))]
    return keys if indices is None else [keys[i] for i in indices]


def split_volumes(dataset: Dataset, val_fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """Seeded split by volume: ``round(V · val_fraction)`` volumes (at least one) go to validation.

    Raises:
        BlindspotError: fewer than two volumes, or a fraction outside (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise BlindspotError(None, f"--val-fraction must lie in (0, 1), got {val_fraction}")
    keys = _volume_of_items(dataset)
    volumes = sorted(set(keys), key=str)
    if len(volumes) < 2:
        raise BlindspotError(None, f"need at least 2 volumes to split off a validation set, found {len(volumes)}; "
                             "give --val-data")
    ranked = sorted(volumes, key=lambda v: hashlib.sha256(f"{seed}:{v}".encode()).hexdigest())
    n_val = min(len(volumes) - 1, max(1, round(len(volumes) * val_fraction)))
    val = set(ranked[:n_val])
    train_idx = [i for i, k in enumerate(keys) if k not in val]
    val_idx = [i for i, k in enumerate(keys) if k in val]
    return Subset(dataset, train_idx), Subset(dataset, val_idx)


# ----------------------------------------------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------------------------------------------
def train_mri(
    model: nn.Module,
    architecture: str,
    hparams: dict[str, Any],
    train_set: Dataset,
    val_set: Dataset | None,
    config: TrainConfig,
    out_dir: PathLike,
    *,
    loss: str = "l1",
    physics: dict[str, Any] | None = None,
    data: str = "",
    resume: bool = False,
    dist: DistContext | None = None,
    val_batch_size: int | None = None,
    loss_fn: Any = None,
    extra_summary: dict[str, Any] | None = None,
) -> FitResult:
    """Train an MRI reconstruction model and write the run folder.

    Args:
        model: the network (seeded and built by the caller).
        architecture, hparams: its registry name and constructor arguments (stored in checkpoints).
        train_set: :class:`MRISample` data set (give it an :class:`EpochMasks` through :class:`EpochDataset` for
            fresh masks every epoch).
        val_set: validation data set with fixed masks, or ``None`` (then ``best.pt`` follows the training loss).
        config: optimisation settings; ``select_metric`` defaults to ``"ssim"`` (max) when there is a validation set.
        out_dir: run folder.
        loss: ``"l1"``, ``"mse"`` or ``"ssim"``.
        physics: mask type, accelerations, centre fractions, crop — stored in the checkpoints.
        data: description of the training data.
        resume: continue from ``out_dir/last.pt``.
        dist: distributed context (default: one process on the model's device).
        val_batch_size: per-process validation batch (default: the per-process training batch).
        loss_fn: a ready loss function for the trainer (e.g. :func:`blindspot.training.robust.fnaf_robust_loss`)
            used instead of ``mri_loss(loss)``; ``loss`` is then only recorded.
        extra_summary: more entries for ``summary.json`` (e.g. the robust-training settings).
    """
    if val_set is not None and config.select_metric is None:
        config.select_metric, config.select_mode = "ssim", "max"
    config.unit = "slices"
    per_rank = config.batch_size // (dist.world_size if dist else 1)
    validator = MRIValidator(val_set, val_batch_size or max(per_rank, 1), config.num_workers) if val_set else None
    info = CheckpointInfo(architecture, dict(hparams), physics=dict(physics or {}),
                          normalization=dict(NORMALIZATION), data=data)
    trainer = Trainer(model, loss_fn if loss_fn is not None else mri_loss(loss), train_set, config, out_dir, info, collate_fn=collate_mri,
                      validate=validator, dist=dist)
    result = trainer.fit(resume=resume)
    if trainer.dist.is_main:
        last = result.history[-1] if result.history else {}
        best = next((r for r in result.history if r["epoch"] == result.best_epoch), {})
        write_json(Path(out_dir) / "summary.json", {
            "architecture": architecture,
            "hparams": hparams,
            "loss": loss,
            "physics": physics or {},
            "data": data,
            "config": asdict(config),
            "world_size": trainer.dist.world_size,
            "epochs": len(result.history),
            "best_epoch": result.best_epoch,
            "best": best.get("val", {}),
            "last": last.get("val", {}),
            "train_loss": [r["train_loss"] for r in result.history],
            "checkpoints": {"best": str(result.best_path), "last": str(result.last_path)},
            **(extra_summary or {}),
        })
    return result


def mri_physics(mask_type: str, accelerations: Sequence[float], center_fractions: Sequence[float],
                crop: Sequence[int] | None) -> dict[str, Any]:
    """The checkpoint's ``physics`` record for MRI."""
    return {
        "modality": "mri",
        "mask_type": mask_type,
        "accelerations": [float(a) for a in accelerations],
        "center_fractions": [float(c) for c in center_fractions],
        "crop": None if crop is None else [int(c) for c in crop],
    }
