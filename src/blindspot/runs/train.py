"""The MRI training run behind ``blindspot train mri``: hyper-parameters, data, physics record, then
:func:`blindspot.training.mri.train_mri`.

Python API::

    from blindspot.runs.train import MRITrainData, run_train_mri
    from blindspot.training.engine import TrainConfig
    result = run_train_mri("varnet", "runs/varnet", MRITrainData(phantom={"num_coils": 8}),
                           TrainConfig(epochs=2, batch_size=2), hparams={"num_cascades": 4})

Image-domain networks (U-Net, I-RIM) train on the normalised zero-filled input; k-space networks (fastMRI's VarNet)
on the masked multi-coil k-space (the data sets are opened with ``kspace=True``), their output cropped to the
target (:func:`blindspot.training.mri.reconstruct_batch`). Without ``data`` the built-in knee phantoms are used:
single-coil for image-domain networks and multi-coil (8 coils unless ``phantom["num_coils"]`` says otherwise) for
k-space networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn
from torch.utils.data import Dataset

from blindspot.data.mri import open_mri_dataset
from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import file_sha256
from blindspot.models.adapters import network_convention
from blindspot.models.checkpoint import load_checkpoint
from blindspot.models.loading import bundled_checkpoint
from blindspot.models.irim import PRESETS as IRIM_PRESETS
from blindspot.models.registry import build_model
from blindspot.physics.mri import create_mask_func
from blindspot.training.distributed import DistContext
from blindspot.training.engine import FitResult, TrainConfig, seed_everything
from blindspot.training.lesion_weighted import box_weighted_setup
from blindspot.training.mri import (EpochDataset, EpochMasks, mri_loss, mri_physics, split_volumes,
                                    train_mri)
from blindspot.training.robust import RobustConfig, fnaf_robust_loss

#: Phantom seeds: training volumes start at 1000; validation (and every command's default phantoms) start at 0.
PHANTOM_TRAIN_SEED = 1000
PHANTOM_VAL_SEED = 0
#: Coils of the multi-coil phantoms a k-space network trains on when none are asked for.
KSPACE_PHANTOM_COILS = 8


@dataclass
class MRITrainData:
    """Where the training and validation slices come from, and how they are under-sampled.

    Attributes:
        data: fastMRI HDF5 / DICOM / PNG / NumPy file or folder, or ``None`` for the built-in phantoms.
        val_data: validation data (``None``: ``val_fraction`` of ``data``'s volumes, or validation phantoms).
        val_fraction: held-out share of volumes without ``val_data``.
        accelerations, center_fractions, mask_type: the masks (``center_fractions`` ``None``: the standard ones).
        crop: ``(h, w)`` of inputs and targets (``None``: the data's).
        phantom_volumes, phantom_val_volumes, phantom_seed, phantom_val_seed: the phantoms' volumes and first seeds.
        phantom: more phantom options: ``shape``, ``recon_size``, ``slices`` and ``num_coils`` (multi-coil phantoms
            with that many coils; ``None``/absent: single-coil, or :data:`KSPACE_PHANTOM_COILS` for k-space networks).
    """

    data: PathLike | None = None
    val_data: PathLike | None = None
    val_fraction: float = 0.2
    accelerations: Sequence[float] = (4.0, 8.0)
    center_fractions: Sequence[float] | None = None
    mask_type: str = "random"
    crop: tuple[int, int] | None = None
    phantom_volumes: int = 16
    phantom_val_volumes: int = 4
    phantom_seed: int = PHANTOM_TRAIN_SEED
    phantom_val_seed: int = PHANTOM_VAL_SEED
    phantom: dict[str, Any] = field(default_factory=dict)


def model_hparams(architecture: str, preset: str | None = None, hparams: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """A network's hyper-parameters: a named ``preset`` (I-RIM: ``small`` or ``paper``), then ``hparams`` (later
    wins)."""
    out: dict[str, Any] = {}
    if preset:
        if architecture != "irim":
            raise BlindspotError(None, f"--preset applies to irim, not {architecture!r}")
        if preset not in IRIM_PRESETS:
            raise BlindspotError(None, f"unknown irim preset {preset!r}; choose from {', '.join(IRIM_PRESETS)}")
        out.update(IRIM_PRESETS[preset])
    out.update(hparams or {})
    return out


def initial_model(architecture: str, hparams: dict[str, Any], init: PathLike | None
                  ) -> tuple[nn.Module, dict[str, Any], dict[str, Any] | None]:
    """The network a run starts from: ``architecture(**hparams)`` freshly initialised, or with the weights of
    ``init`` — a checkpoint file in blindspot's format, a bundled name such as ``mri_unet``, or a bare state dict
    whose hyper-parameters are ``hparams`` and what the weights say (fine-tuning, e.g. the seed's FNAF-robust
    training from a pre-trained U-Net).

    Returns ``(model, hparams, record)``; ``record`` (``None`` without ``init``) names the file and its SHA-256 for
    ``summary.json``. Raises :class:`BlindspotError` naming ``init`` when it is another architecture, when given
    hyper-parameters contradict its own, or when its weights do not fit.
    """
    if init is None:
        return build_model(architecture, **hparams), hparams, None
    if not Path(init).exists():
        init = bundled_checkpoint(str(init)) or init
    ck = load_checkpoint(init, architecture=architecture, hparams=hparams or None)
    clash = {k: v for k, v in hparams.items() if k in ck.hparams and ck.hparams[k] != v}
    if clash:
        key = next(iter(clash))
        raise BlindspotError(init, f"has {key}={ck.hparams[key]!r}, but the run asks for {key}={clash[key]!r}")
    record = {"path": str(init), "sha256": file_sha256(init), "architecture": ck.architecture,
              "epochs": (ck.training or {}).get("epochs")}
    return ck.model, dict(ck.hparams), record


def phantom_options(phantom: dict[str, Any], kspace_network: bool) -> dict[str, Any]:
    """:class:`~blindspot.data.phantom_dataset.PhantomDataset` options from ``MRITrainData.phantom``: the geometry,
    and ``challenge`` / ``num_coils`` (multi-coil when ``num_coils`` is given or the network takes k-space)."""
    opts = {k: phantom[k] for k in ("shape", "recon_size", "slices") if phantom.get(k) is not None}
    coils = phantom.get("num_coils")
    if coils is None and kspace_network:
        coils = KSPACE_PHANTOM_COILS
    if coils is not None:
        opts.update(challenge="multicoil", num_coils=int(coils))
    return opts


def require_multicoil(dataset: Dataset, architecture: str) -> None:
    """A one-line error naming the file when the first slice of ``dataset`` is not multi-coil k-space (a k-space
    network such as VarNet estimates coil sensitivities and needs several coils)."""
    sample = dataset[0]
    coils = 0 if sample.kspace is None else int(sample.kspace.shape[0])
    if coils < 2:
        source = sample.attrs.get("path", sample.fname)
        raise BlindspotError(source, f"is single-coil data; {architecture} takes multi-coil k-space (give multi-coil "
                                     "fastMRI files or multi-coil phantoms)")


def open_training_data(spec: MRITrainData, masks: EpochMasks, val_masks: Any, kspace_network: bool,
                       seed: int) -> tuple[Dataset, Dataset, str, dict[str, Any]]:
    """``(train_set, val_set, description, phantom record)`` of ``spec``; ``kspace_network`` keeps the masked k-space
    in every sample. The phantom record (``{}`` for files) goes into the checkpoints' ``physics["phantom"]``."""
    crop = spec.crop
    extra = {"kspace": True} if kspace_network else {}
    if spec.data is None:
        if spec.val_data is not None:
            raise BlindspotError(None, "--val-data needs --data (the phantoms bring their own validation volumes)")
        geometry = phantom_options(spec.phantom, kspace_network)
        train_set = open_mri_dataset(None, masks, crop, volumes=spec.phantom_volumes, seed=spec.phantom_seed,
                                     **geometry, **extra)
        val_set = open_mri_dataset(None, val_masks, crop, volumes=spec.phantom_val_volumes,
                                   seed=spec.phantom_val_seed, **geometry, **extra)
        coils = f", {train_set.num_coils} coils" if train_set.num_coils else ""
        description = (f"built-in knee phantoms {train_set.shape[0]}x{train_set.shape[1]}{coils} (crop "
                       f"{train_set.crop[0]}x{train_set.crop[1]}): {spec.phantom_volumes} training volumes from seed "
                       f"{spec.phantom_seed}, {spec.phantom_val_volumes} validation volumes from seed "
                       f"{spec.phantom_val_seed}, {train_set.slices} slices each")
        record = {"shape": list(train_set.shape), "recon_size": list(train_set.recon_size),
                  "crop": list(train_set.crop)}
        if train_set.num_coils:
            record.update(challenge=train_set.challenge, num_coils=train_set.num_coils)
        return train_set, val_set, description, record
    train_set = open_mri_dataset(spec.data, masks, crop, **extra)
    if spec.val_data is not None:
        val_set = open_mri_dataset(spec.val_data, val_masks, crop, **extra)
        description = f"{spec.data} ({len(train_set)} slices); validation {spec.val_data} ({len(val_set)} slices)"
    else:
        val_full = open_mri_dataset(spec.data, val_masks, crop, **extra)
        train_set, _ = split_volumes(train_set, spec.val_fraction, seed=seed)
        _, val_set = split_volumes(val_full, spec.val_fraction, seed=seed)
        description = (f"{spec.data}: {len(train_set)} training slices, {len(val_set)} validation slices "
                       f"({spec.val_fraction:g} of the volumes held out, seed {seed})")
    return train_set, val_set, description, {}


def run_train_mri(
    architecture: str,
    out: PathLike,
    spec: MRITrainData,
    config: TrainConfig,
    *,
    preset: str | None = None,
    hparams: dict[str, Any] | None = None,
    loss: str = "l1",
    robust: RobustConfig | None = None,
    boxes: PathLike | None = None,
    box_weight: float = 10.0,
    resume: bool = False,
    init: PathLike | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train an MRI reconstruction network and write its run folder (``last.pt``, ``best.pt``, ``log.jsonl``,
    ``summary.json``; see :func:`blindspot.training.mri.train_mri`).

    Args:
        architecture: registered network (``unet``, ``irim``, ``varnet``, …).
        out: the run folder.
        spec: the data (:class:`MRITrainData`).
        config: optimisation settings (checked here).
        preset, hparams: the network's hyper-parameters (:func:`model_hparams`).
        loss: ``l1``, ``mse`` or ``ssim``.
        robust: FNAF-robust training settings (image-domain networks only), or ``None``.
        boxes, box_weight: lesion-weighted training on the boxes of ``spec.data`` (image-domain networks only).
        resume: continue from ``out/last.pt`` (its weights replace those of ``init``).
        init: start from this checkpoint's weights (:func:`initial_model`) instead of a fresh initialisation; the
            optimiser, epochs and learning-rate schedule start fresh.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (torchrun: the local GPU).
        log: where the main process's progress lines go.
    Raises:
        BlindspotError: bad settings, data that do not fit the network (single-coil data for a k-space network,
        image files), robust or box-weighted training of a k-space network.
    """
    config.check()
    hp = model_hparams(architecture, preset, hparams)
    cfs = list(create_mask_func(spec.mask_type, spec.accelerations, spec.center_fractions).center_fractions)
    dist = DistContext.from_env(device=device)
    try:
        seed_everything(config.seed)
        model, hp, init_record = initial_model(architecture, hp, init)
        kspace_network = network_convention(model) == "kspace"
        if kspace_network and (robust is not None or boxes is not None):
            raise BlindspotError(None, f"{architecture} takes k-space: FNAF-robust (--robust) and box-weighted "
                                       "(--boxes) training are for image-domain networks")
        if robust is not None and boxes is not None:
            raise BlindspotError(None, "give --boxes or --robust, not both")
        masks = EpochMasks(create_mask_func(spec.mask_type, spec.accelerations, cfs), seed=config.seed)
        val_masks = create_mask_func(spec.mask_type, spec.accelerations, cfs)
        train_set, val_set, description, phantom = open_training_data(spec, masks, val_masks, kspace_network,
                                                                      config.seed)
        if kspace_network:
            require_multicoil(train_set, architecture)
        physics = mri_physics(spec.mask_type, spec.accelerations, cfs, spec.crop)
        if phantom:
            physics["crop"] = phantom.pop("crop")
            physics["phantom"] = phantom
        train_set = EpochDataset(train_set, masks)
        if dist.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            log(f"training {architecture} ({n_params:,} parameters) on {dist.device} x {dist.world_size} "
                f"process(es): {len(train_set)} training slices, {len(val_set)} validation slices -> {out}")
            if init_record is not None and not (resume and (Path(out) / "last.pt").is_file()):
                log(f"starting from the weights of {init_record['path']}")
        loss_fn, extra = None, None
        if robust is not None:
            loss_fn, extra = fnaf_robust_loss(mri_loss(loss), robust), {"robust": robust.as_dict()}
        if boxes is not None:
            loss_fn, extra = box_weighted_setup(boxes, spec.data, loss, box_weight)
        if init_record is not None:
            extra = {**(extra or {}), "init": init_record}
        result = train_mri(model, architecture, hp, train_set, val_set, config, out, loss=loss, physics=physics,
                           data=description, resume=resume, dist=dist, loss_fn=loss_fn, extra_summary=extra)
        if dist.is_main:
            report_result(result, out, log)
    finally:
        dist.shutdown()
    return result


def report_result(result: FitResult, out: PathLike, log: Callable[[str], None]) -> None:
    """The closing lines of a training run: the best epoch's validation metrics and the checkpoints."""
    best = next((r for r in result.history if r["epoch"] == result.best_epoch), None)
    if result.epochs_run == 0:
        log(f"{out}: already trained for {len(result.history)} epochs; nothing to do")
    if best is not None and best.get("val"):
        v = best["val"]
        log(f"best epoch {best['epoch'] + 1}/{len(result.history)}: validation SSIM {v['ssim']:.4f}, "
            f"NMSE {v['nmse']:.5f}, PSNR {v['psnr']:.2f} dB")
    log(f"checkpoints: {result.best_path} (best), {result.last_path} (last); log: {Path(out) / 'log.jsonl'}")
