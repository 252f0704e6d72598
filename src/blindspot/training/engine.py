"""A generic supervised trainer: one loss over a batch, many models (MRI reconstruction, CT denoising, robust training).

Plug in a model, a loss function and a data set::

    from blindspot.training.engine import CheckpointInfo, TrainConfig, Trainer, seed_everything

    seed_everything(0)                      # before building the model: same seed → same initial weights
    model = build_model("unet", chans=8)
    trainer = Trainer(
        model,
        loss_fn=lambda model, batch, ctx: (model(batch.input) - batch.target).abs().mean(),
        train_set=train_set,                # a torch Dataset
        config=TrainConfig(epochs=10, batch_size=8, lr=1e-3),
        out_dir="runs/unet",
        info=CheckpointInfo("unet", {"chans": 8}, physics={...}),
        collate_fn=collate_mri,
        validate=my_validator,              # (model, dist) -> {"ssim": …, …}, run on every rank each epoch
    )
    result = trainer.fit(resume=False)

What it does each epoch: ``train_set.set_epoch(epoch)`` if the data set has it, a sharded, seeded shuffle of the training set (``DistributedSampler``, also for one
process, so each *global* batch is the same for any number of processes), forward + ``loss_fn`` + backward,
optional gradient-norm clipping, an optimiser step (Adam, AdamW, RMSprop or SGD), a step learning-rate schedule per
epoch, validation through the callback, then ``last.pt`` (with optimiser, scheduler and RNG state, so ``fit(resume=
True)`` continues exactly where an uninterrupted run would be) and ``best.pt`` (best value of
``config.select_metric``) written atomically through :func:`blindspot.models.checkpoint.save_checkpoint`. Progress
shows the running loss and throughput; ``log.jsonl`` in the run folder gets one JSON line per ``log_every`` steps
and one per epoch. Under ``torchrun`` pass a :class:`~blindspot.training.distributed.DistContext` from ``from_env``:
the model is wrapped in ``DistributedDataParallel`` (nccl on GPU, gloo on CPU), the per-step loss and epoch metrics
are averaged over ranks, and only rank 0 writes files.

The loss function receives a :class:`StepContext` (epoch, global step, device, a per-step seeded generator, the
distributed context) so losses that draw random things — e.g. FNAF-robust training drawing features on the fly —
stay deterministic and resume exactly. It returns a scalar tensor, or ``(loss, extras)`` where ``extras`` is a dict
of scalar floats/tensors that are averaged per epoch and logged beside the loss.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import append_jsonl, atomic_write_text, read_jsonl
from blindspot.models.checkpoint import check_finite_weights, read_checkpoint_dict, save_checkpoint
from blindspot.training.distributed import DistContext

LossOutput = Union[Tensor, "tuple[Tensor, Mapping[str, float | Tensor]]"]

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")


# ----------------------------------------------------------------------------------------------------------------
# Configuration and call-back types
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Optimisation settings (stored in every checkpoint's ``training`` field).

    Attributes:
        epochs: total number of epochs (a resumed run continues up to this number).
        batch_size: *global* batch size; split evenly across processes (must be divisible by the world size).
        lr: initial learning rate.
        optimizer: ``"adam"``, ``"adamw"``, ``"rmsprop"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: L2 penalty / decoupled weight decay (AdamW).
        lr_step_size: epochs between learning-rate decays (``StepLR``); 0 keeps the rate constant.
        lr_gamma: decay factor.
        grad_clip: maximum global gradient norm; 0 disables clipping.
        seed: seeds the shuffling, the RNGs at the start of a fresh run and the per-step generators.
        num_workers: ``DataLoader`` worker processes per rank.
        select_metric: validation metric that chooses ``best.pt`` (``None``: the lowest training loss).
        select_mode: ``"max"`` or ``"min"`` for ``select_metric``.
        log_every: steps between JSON-lines step records (0: epoch records only).
        progress: show tqdm bars (``None``: only on a terminal).
        unit: what one sample is called in progress and logs (``"slices"``, ``"patches"``, …).
    """

    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_step_size: int = 0
    lr_gamma: float = 0.1
    grad_clip: float = 0.0
    seed: int = 0
    num_workers: int = 0
    select_metric: str | None = None
    select_mode: str = "max"
    log_every: int = 10
    progress: bool | None = None
    unit: str = "samples"

    def check(self, world_size: int = 1) -> None:
        """Raise :class:`BlindspotError` for settings that cannot work."""
        if self.epochs < 1:
            raise BlindspotError(None, f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.batch_size % world_size:
            raise BlindspotError(
                None, f"--batch-size {self.batch_size} must be a positive multiple of the {world_size} processes"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BlindspotError(None, f"--lr must be a positive number, got {self.lr}")
        if self.optimizer.lower() not in OPTIMIZERS:
            raise BlindspotError(None, f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.select_mode not in ("max", "min"):
            raise BlindspotError(None, f"select_mode must be 'max' or 'min', got {self.select_mode!r}")
        if self.lr_step_size < 0 or self.grad_clip < 0:
            raise BlindspotError(None, "--lr-step-size and --grad-clip must be >= 0")


@dataclass
class CheckpointInfo:
    """What a checkpoint stores beside the weights (see :mod:`blindspot.models.checkpoint`)."""

    architecture: str
    hparams: dict[str, Any]
    physics: dict[str, Any] = field(default_factory=dict)
    normalization: dict[str, Any] = field(default_factory=dict)
    data: str = ""


@dataclass
class StepContext:
    """Passed to the loss function at every optimisation step.

    Attributes:
        epoch: 0-based epoch.
        step: 0-based global optimisation step (over all epochs; continues across ``resume``).
        device: the training device.
        dist: the distributed context (rank, world size).
        seed: the run's seed.
    """

    epoch: int
    step: int
    device: torch.device
    dist: DistContext
    seed: int
    _generator: torch.Generator | None = None

    @property
    def generator(self) -> torch.Generator:
        """A generator on ``device`` seeded from (seed, rank, step): deterministic and resume-safe randomness."""
        if self._generator is None:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(_mix_seed(self.seed, self.dist.rank, self.step))
        return self._generator


LossFn = Callable[[nn.Module, Any, StepContext], LossOutput]
ValidateFn = Callable[[nn.Module, DistContext], Mapping[str, float]]


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        history: one record per epoch (all epochs of the run, including those before a resume).
        best_epoch: epoch of ``best.pt`` (``-1`` if none was written).
        best_value: its selection value.
        last_path, best_path: checkpoint files.
        epochs_run: epochs trained by this call (0 when a resumed run was already complete).
    """

    history: list[dict[str, Any]]
    best_epoch: int
    best_value: float
    last_path: Path
    best_path: Path
    epochs_run: int


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style), so nearby (seed, rank, step) give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators; make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain Python (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def build_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """The optimiser named by ``config.optimizer``."""
    name = config.optimizer.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, weight_decay=config.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    raise BlindspotError(None, f"unknown optimizer {config.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    """``StepLR`` stepped once per epoch; a constant rate when ``lr_step_size`` is 0."""
    if config.lr_step_size > 0:
        return torch.optim.lr_scheduler.StepLR(optimizer, config.lr_step_size, config.lr_gamma)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=1.0)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Default batch mover: objects with ``.to`` (tensors, ``MRIBatch``), and lists/tuples/dicts of them."""
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    return batch


def batch_length(batch: Any) -> int:
    """Default batch size: ``len`` of batch objects, the leading dimension of a tensor / first tuple entry."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)):
        return batch_length(batch[0])
    if isinstance(batch, Mapping):
        return batch_length(next(iter(batch.values())))
    return len(batch)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------
class Trainer:
    """Trains ``model`` on ``train_set`` by minimising ``loss_fn``; see the module documentation.

    Args:
        model: the network (built and seeded by the caller; moved to ``dist.device`` here).
        loss_fn: ``(model, batch, ctx) -> loss`` or ``(loss, extras)``; ``model`` may be DDP-wrapped, so call it,
            and reach attributes through ``getattr(model, "module", model)``.
        train_set: a map-style ``Dataset``.
        config: :class:`TrainConfig`.
        out_dir: run folder: ``last.pt``, ``best.pt``, ``log.jsonl``.
        info: architecture name, hyper-parameters and physics/normalisation/data descriptions for the checkpoints.
        collate_fn: ``DataLoader`` collate function.
        validate: ``(model, dist) -> metrics`` run on every rank after each epoch with the model in eval mode (the
            callback chooses its own grad mode, shards its data with ``dist.loader`` and reduces across ranks,
            returning the same dict on every rank).
        to_device: moves a batch to the device (default :func:`move_to_device`).
        batch_size_of: samples in a batch (default :func:`batch_length`).
        dist: distributed context; default: one process on the model's current device.
    """

    LAST = "last.pt"
    BEST = "best.pt"
    LOG = "log.jsonl"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_set: Dataset,
        config: TrainConfig,
        out_dir: PathLike,
        info: CheckpointInfo,
        *,
        collate_fn: Callable[[Sequence[Any]], Any] | None = None,
        validate: ValidateFn | None = None,
        to_device: Callable[[Any, torch.device], Any] = move_to_device,
        batch_size_of: Callable[[Any], int] = batch_length,
        dist: DistContext | None = None,
    ) -> None:
        if dist is None:
            first = next(iter(model.parameters()), None)
            dist = DistContext(device=first.device if first is not None else torch.device("cpu"))
        config.check(dist.world_size)
        if not any(p.requires_grad for p in model.parameters()):
            raise BlindspotError(None, f"model {info.architecture!r} has no trainable parameters")
        self.config, self.info, self.dist = config, info, dist
        self.out_dir = Path(out_dir)
        self.loss_fn, self.validate = loss_fn, validate
        self.to_device, self.batch_size_of = to_device, batch_size_of
        self.train_set, self.collate_fn = train_set, collate_fn
        self.device = dist.device
        self.model = model.to(self.device)
        if dist.distributed:
            self.model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer = build_optimizer(config, self.model.parameters())
        self.scheduler = build_scheduler(config, self.optimizer)
        self.per_rank_batch = config.batch_size // dist.world_size
        self.loader = dist.loader(
            train_set, self.per_rank_batch, shuffle=True, seed=config.seed, collate_fn=collate_fn,
            num_workers=config.num_workers, drop_last=True,
        )
        if len(self.loader) == 0:
            raise BlindspotError(
                None, f"the training set has {len(train_set)} samples, fewer than one batch of {config.batch_size}"
            )

    # -- paths ----------------------------------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.out_dir / self.LAST

    @property
    def best_path(self) -> Path:
        return self.out_dir / self.BEST

    @property
    def log_path(self) -> Path:
        return self.out_dir / self.LOG

    # -- resume ---------------------------------------------------------------------------------------------------
    def _restore(self) -> dict[str, Any]:
        """Load ``last.pt`` into model, optimiser and scheduler; return its ``training`` record."""
        obj = read_checkpoint_dict(self.last_path, map_location="cpu")
        if obj.get("architecture") != self.info.architecture or dict(obj.get("hparams") or {}) != dict(
            self.info.hparams
        ):
            raise BlindspotError(
                self.last_path,
                f"holds a {obj.get('architecture')!r} model with hyper-parameters {obj.get('hparams')}, not "
                f"{self.info.architecture!r} with {self.info.hparams}; use another --out or the same model settings",
            )
        training = obj.get("training") or {}
        if "optimizer" not in training or "epoch" not in training:
            raise BlindspotError(self.last_path, "has no training state to resume from")
        state = obj.get("state_dict")
        if not isinstance(state, dict):
            raise BlindspotError(self.last_path, "has no state dict to resume from")
        check_finite_weights(self.last_path, state)  # a diverged run's weights are not resumed
        try:
            _unwrap(self.model).load_state_dict(state, strict=True)
        except (RuntimeError, KeyError) as err:
            raise BlindspotError(self.last_path, f"weights do not fit the model ({str(err).splitlines()[0][:150]})") \
                from None
        try:
            self.optimizer.load_state_dict(training["optimizer"])
        except (ValueError, KeyError) as err:
            raise BlindspotError(self.last_path, f"optimizer state does not fit --optimizer {self.config.optimizer}"
                                 f" ({err})") from None
        self.scheduler.load_state_dict(training["scheduler"])
        rngs = training.get("rng") or []
        if self.dist.rank < len(rngs) and len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            seed_everything(_mix_seed(self.config.seed, self.dist.rank, int(training["epoch"])) % 2**31)
        return training

    def _trim_log(self, start_epoch: int) -> None:
        """Drop log rows of epochs that will be re-run (a run stopped mid-epoch)."""
        rows = read_jsonl(self.log_path)
        keep = [r for r in rows if int(r.get("epoch", -1)) < start_epoch]
        if len(keep) != len(rows):
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in keep))

    # -- main loop ------------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> FitResult:
        """Train up to ``config.epochs``; with ``resume``, continue from ``out_dir/last.pt`` if it exists.

        A run folder that already holds ``last.pt`` is never overwritten without ``resume``.
        """
        cfg, dist = self.config, self.dist
        start_epoch, step, history = 0, 0, []
        best_value, best_epoch = (-math.inf if cfg.select_mode == "max" else math.inf), -1
        if cfg.select_metric is None:
            best_value = math.inf
        if self.last_path.exists():
            if not resume:
                raise BlindspotError(
                    self.out_dir, "already holds a training run (last.pt); pass --resume to continue it or use "
                    "another --out"
                )
            training = self._restore()
            start_epoch = int(training["epoch"]) + 1
            step = int(training.get("step", 0))
            history = list(training.get("history") or [])
            best_value = float(training.get("best_value", best_value))
            best_epoch = int(training.get("best_epoch", -1))
            if dist.is_main:
                self._trim_log(start_epoch)
        else:
            seed_everything(_mix_seed(cfg.seed, dist.rank) % 2**31)
        dist.barrier()

        epochs_run = 0
        for epoch in range(start_epoch, cfg.epochs):
            record, step = self._train_epoch(epoch, step)
            metrics: dict[str, float] = {}
            if self.validate is not None:
                self.model.eval()
                metrics = {k: float(v) for k, v in self.validate(self.model, dist).items()}
            record["val"] = metrics
            value = record["train_loss"] if cfg.select_metric is None else metrics.get(cfg.select_metric)
            if value is None:
                raise BlindspotError(None, f"validation returned no {cfg.select_metric!r} (got {sorted(metrics)})")
            undefined = sorted(k for k, v in metrics.items() if math.isnan(v))
            if undefined or not math.isfinite(value):
                # degenerate validation data (all-zero or constant images) or a diverged network: such a figure
                # must never choose best.pt (an all-zero slice once read SSIM 1.0 / PSNR 256 dB)
                what = ", ".join(undefined) if undefined else f"{cfg.select_metric or 'train_loss'} = {value}"
                raise BlindspotError(self.out_dir, f"epoch {epoch + 1}: validation gave undefined figures ({what}); "
                                     "check the validation data for all-zero or constant images (the last good "
                                     "checkpoint is kept)")
            better = (value > best_value) if (cfg.select_metric and cfg.select_mode == "max") else (value < best_value)
            if better or best_epoch < 0:
                best_value, best_epoch = float(value), epoch
            record["best"] = best_epoch == epoch
            history.append(record)
            self.scheduler.step()
            self._save(epoch, step, history, best_value, best_epoch, metrics, record["best"])
            epochs_run += 1
        return FitResult(history, best_epoch, best_value, self.last_path, self.best_path, epochs_run)

    def _train_epoch(self, epoch: int, step: int) -> tuple[dict[str, Any], int]:
        cfg, dist = self.config, self.dist
        self.model.train()
        self.loader.sampler.set_epoch(epoch)
        if hasattr(self.train_set, "set_epoch"):  # e.g. per-epoch masks (blindspot.training.mri.EpochMasks)
            self.train_set.set_epoch(epoch)
        sums: dict[str, float] = {}
        count = 0
        lr = self.optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        seen_global = 0
        bar = tqdm(
            self.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
            disable=(not dist.is_main) or (cfg.progress is False) or (None if cfg.progress is None else False),
        )
        for batch in bar:
            batch = self.to_device(batch, self.device)
            n = self.batch_size_of(batch)
            ctx = StepContext(epoch, step, self.device, dist, cfg.seed)
            out = self.loss_fn(self.model, batch, ctx)
            loss, extras = (out if isinstance(out, tuple) else (out, {}))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
            # one small all-reduce: the global mean loss and sample count of this step
            local = torch.tensor([float(loss.detach()) * n, float(n)], dtype=torch.float64)
            glob = dist.all_reduce_sum(local)
            step_loss = float(glob[0] / glob[1])
            if not math.isfinite(step_loss):
                raise BlindspotError(
                    self.out_dir, f"training loss became {step_loss} at epoch {epoch + 1}, step {step}; lower --lr or "
                    f"set --grad-clip (the last good checkpoint is kept)"
                )
            self.optimizer.step()
            seen_global += int(glob[1])
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * n
            for k, v in extras.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            count += n
            elapsed = max(time.perf_counter() - start, 1e-9)
            rate = seen_global / elapsed
            bar.set_postfix(loss=f"{step_loss:.4g}", **{f"{cfg.unit}/s": f"{rate:.1f}"})
            if dist.is_main and cfg.log_every and step % cfg.log_every == 0:
                row = {"event": "step", "epoch": epoch, "step": step, "loss": step_loss, "lr": lr,
                       f"{cfg.unit}_per_s": rate}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                append_jsonl(self.log_path, [row])
            step += 1
        bar.close()
        elapsed = time.perf_counter() - start
        means = dist.reduce_means(sums, count)
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "lr": lr,
            "train_loss": means.pop("loss"),
            "train": means,
            "time_s": elapsed,
            f"{cfg.unit}_per_s": seen_global / max(elapsed, 1e-9),
        }
        return record, step

    def _save(self, epoch: int, step: int, history: list[dict[str, Any]], best_value: float, best_epoch: int,
              metrics: dict[str, float], is_best: bool) -> None:
        rngs = self.dist.all_gather_objects(rng_state())
        if self.dist.is_main:
            info = self.info
            common = dict(physics=info.physics, normalization=info.normalization, data=info.data, metrics=metrics)
            training = {
                "epoch": epoch,
                "step": step,
                "config": asdict(self.config),
                "world_size": self.dist.world_size,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs,
                "history": history,
                "best_value": best_value,
                "best_epoch": best_epoch,
            }
            if is_best:
                save_checkpoint(self.best_path, self.model, info.architecture, info.hparams,
                                training={"epoch": epoch, "step": step}, **common)
            save_checkpoint(self.last_path, self.model, info.architecture, info.hparams, training=training, **common)
            append_jsonl(self.log_path, [{"event": "epoch", **history[-1]}])
        self.dist.barrier()
