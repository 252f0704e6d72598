"""CT denoiser training on the generic engine: patch-based L2 (CNN-10, RED-CNN) and WGAN-GP with a VGG perceptual
loss (WGAN-VGG), evaluated in HU.

* Data: :func:`blindspot.data.ldct.find_ldct` pairs full- and low-dose slices (the public LDCT layout or the
  built-in phantoms), :func:`~blindspot.data.ldct.split_patients` splits by patient with a seed, and
  :class:`~blindspot.data.ldct.PatchDataset` draws random patches with equal probability per patient, as a pure
  function of ``(seed, epoch, index)`` (exact resume, any number of processes).
* Normalisation: ``(HU − mean) / std`` with the training set's low-dose statistics, for input and target; stored in
  every checkpoint's ``"normalization"`` field (:class:`blindspot.physics.ct.HUNormalization`).
* :func:`l2_loss` — mean squared error in normalised units.
* :class:`WGANVGGLoss` — per step: ``n_critic`` critic updates (Wasserstein loss + gradient penalty, its own Adam
  optimiser), then the generator loss ``λ_adv · (−C(G(x))) + λ_vgg · VGG-MSE + λ_mse · MSE``; the VGG features see
  the images in HU through a display window mapped to [0, 1] and ImageNet-normalised RGB. The critic and its optimiser
  are saved next to ``last.pt`` each epoch (``critic-epoch{N}.pt``) and restored on resume.
* :class:`CTValidator` — RMSE in HU, PSNR and SSIM (:func:`blindspot.metrics.ssim`) of windowed images (data range
  1) for the model and for the low-dose input itself, so the gain is in every record.
* :func:`train_ct` — puts it together; writes ``last.pt``, ``best.pt``, ``log.jsonl`` and ``summary.json`` (with
  the split, the normalisation and the held-out test metrics of ``best.pt``).
"""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn

from blindspot.data.ldct import (LDCTDataset, PatchDataset, collate_ct, find_ldct, report_skipped,
                                 split_patients)
from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import atomic_write_bytes, read_json, write_json
from blindspot.losses import gradient_penalty
from blindspot.metrics import ct_slice_metrics
from blindspot.models.checkpoint import load_checkpoint, read_checkpoint_dict
from blindspot.models.registry import build_model
from blindspot.models.vgg import PerceptualLoss, VGG16Features, VGGWeightsInfo
from blindspot.models.wganvgg import WGANCritic
from blindspot.physics.ct import HUNormalization, Window, parse_window
from blindspot.training.distributed import DistContext
from blindspot.training.engine import CheckpointInfo, FitResult, StepContext, TrainConfig, Trainer, seed_everything

#: Models trained here and their default losses.
CT_MODELS = {"cnn10": "l2", "redcnn": "l2", "wganvgg": "wgan-vgg"}


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
def l2_loss(model: nn.Module, batch: tuple[Tensor, Tensor], ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
    """MSE between ``model(x)`` and ``y`` in normalised units; ``batch = (x, y)``, each ``(B, 1, p, p)``."""
    x, y = batch
    out = model(x)
    loss = F.mse_loss(out, y)
    return loss, {"l1": F.l1_loss(out.detach(), y)}


class WGANVGGLoss:
    """The WGAN-VGG training step as an engine loss function (see the module docs).

    Args:
        critic: the :class:`~blindspot.models.wganvgg.WGANCritic` (on the training device).
        perceptual: a :class:`~blindspot.models.vgg.PerceptualLoss` (frozen VGG), or ``None`` when
            ``lambda_vgg == 0``.
        normalization: HU ↔ network units.
        vgg_window: display window mapping HU to the VGG's [0, 1] input.
        n_critic: critic updates per generator step (WGAN-GP: 5; Yang et al. 4).
        gp_weight: gradient-penalty weight λ (10).
        lambda_adv, lambda_vgg, lambda_mse: generator loss weights (Yang et al.: 1 × adversarial, 0.1 × VGG).
        critic_lr, critic_betas: the critic's Adam settings (Yang et al.: 1e-5, (0.5, 0.9)).
        dist: distributed context; critic gradients are averaged over processes by hand (all-reduce), since
            DistributedDataParallel does not support the double backward of the gradient penalty.
    """

    def __init__(self, critic: WGANCritic, perceptual: PerceptualLoss | None, normalization: HUNormalization,
                 vgg_window: Window, n_critic: int = 4, gp_weight: float = 10.0, lambda_adv: float = 1.0,
                 lambda_vgg: float = 0.1, lambda_mse: float = 0.0, critic_lr: float = 1e-4,
                 critic_betas: tuple[float, float] = (0.5, 0.9), dist: DistContext | None = None) -> None:
        if n_critic < 1:
            raise BlindspotError(None, f"--n-critic must be >= 1, got {n_critic}")
        if lambda_vgg > 0 and perceptual is None:
            raise BlindspotError(None, "a perceptual (VGG) loss was asked for but no VGG16 weights were given")
        self.critic, self.perceptual, self.norm, self.window = critic, perceptual, normalization, vgg_window
        self.n_critic, self.gp_weight = int(n_critic), float(gp_weight)
        self.lambda_adv, self.lambda_vgg, self.lambda_mse = float(lambda_adv), float(lambda_vgg), float(lambda_mse)
        self.optimizer = torch.optim.Adam(critic.parameters(), lr=critic_lr, betas=critic_betas)
        self.dist = dist or DistContext()

    def _to01(self, x: Tensor) -> Tensor:
        return self.window.apply(self.norm.to_hu(x))

    def _sync_critic_grads(self) -> None:
        if not self.dist.distributed:
            return
        for p in self.critic.parameters():
            if p.grad is not None:
                tdist.all_reduce(p.grad, op=tdist.ReduceOp.SUM)
                p.grad /= self.dist.world_size

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor], ctx: StepContext):
        x, y = batch
        gen = ctx.generator
        # 1) critic: maximise C(real) − C(fake) with the gradient penalty
        self.critic.train()
        self.critic.requires_grad_(True)
        with torch.no_grad():
            fake = model(x)
        for _ in range(self.n_critic):
            w_dist = self.critic(y).mean() - self.critic(fake).mean()
            eps = torch.rand(y.shape[0], 1, 1, 1, generator=gen, device=y.device, dtype=y.dtype)
            critic_loss = -w_dist + self.gp_weight * gradient_penalty(self.critic, y, fake, eps)
            self.optimizer.zero_grad(set_to_none=True)
            critic_loss.backward()
            self._sync_critic_grads()
            self.optimizer.step()
        # 2) generator
        self.critic.requires_grad_(False)
        out = model(x)
        adv = -self.critic(out).mean()
        mse = F.mse_loss(out, y)
        loss = self.lambda_adv * adv + self.lambda_mse * mse
        extras: dict[str, Tensor] = {"adv": adv.detach(), "mse": mse.detach(), "critic": critic_loss.detach(),
                                     "w_dist": w_dist.detach()}
        if self.lambda_vgg > 0:
            vgg = self.perceptual(self._to01(out), self._to01(y))
            loss = loss + self.lambda_vgg * vgg
            extras["vgg"] = vgg.detach()
        return loss, extras

    # critic state beside the engine's checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"critic": {k: v.detach().cpu() for k, v in self.critic.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any], source: PathLike) -> None:
        try:
            self.critic.load_state_dict(state["critic"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise BlindspotError(source, f"critic state does not fit this critic ({str(err).splitlines()[0]})") from None


def critic_path(out_dir: PathLike, epoch: int) -> Path:
    return Path(out_dir) / f"critic-epoch{int(epoch)}.pt"


# ----------------------------------------------------------------------------------------------------------------
# Evaluation in HU
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CTMetrics:
    """Per-slice rows and their means. Keys of ``summary``: ``rmse_hu``, ``psnr``, ``ssim`` (model),
    ``input_rmse_hu``, ``input_psnr``, ``input_ssim`` (low-dose input), ``psnr_gain``, ``ssim_gain``, ``slices``."""

    rows: list[dict[str, Any]]

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"slices": float(len(self.rows))}
        if not self.rows:
            return out
        for key in ("rmse_hu", "psnr", "ssim", "input_rmse_hu", "input_psnr", "input_ssim"):
            vals = [float(r[key]) for r in self.rows]
            out[key] = sum(vals) / len(vals)
            out[f"{key}_std"] = math.sqrt(sum((v - out[key]) ** 2 for v in vals) / max(1, len(vals) - 1))
        out["psnr_gain"] = out["psnr"] - out["input_psnr"]
        out["ssim_gain"] = out["ssim"] - out["input_ssim"]
        return out


def slice_metrics(pred_hu: Tensor, full_hu: Tensor, window: Window, field: Tensor | None = None) -> dict[str, Tensor]:
    """RMSE (HU) and windowed PSNR / SSIM (data range 1) per image of ``(B, 1, H, W)`` HU tensors, each ``(B,)``,
    over the field of view ``field`` (bool ``(B, 1, H, W)``) when given: :func:`blindspot.metrics.ct_slice_metrics`."""
    return ct_slice_metrics(pred_hu, full_hu, window, field)


class CTValidator:
    """Evaluate a denoiser on full slices in HU (the engine's ``validate`` callback).

    Args:
        dataset: :class:`LDCTDataset` of held-out patients.
        normalization: HU ↔ network units.
        window: display window of the PSNR/SSIM comparison (default abdomen, C 50 W 400).
        batch_size: slices per forward pass.
    """

    def __init__(self, dataset: LDCTDataset, normalization: HUNormalization, window: Window | str = "abdomen",
                 batch_size: int = 1) -> None:
        self.dataset, self.norm, self.window, self.batch_size = dataset, normalization, parse_window(window), batch_size

    def evaluate(self, model: nn.Module, dist: DistContext | None = None) -> CTMetrics:
        dist = dist or DistContext(device=next(iter(model.parameters()), torch.zeros(())).device)
        model = getattr(model, "module", model)
        was_training = model.training
        model.eval()
        loader = dist.loader(self.dataset, self.batch_size, shuffle=False, collate_fn=collate_ct)
        rows: list[dict[str, Any]] = []
        with torch.no_grad():
            for batch in loader:
                batch = batch.to(dist.device)
                pred = self.norm.to_hu(model(self.norm.to_network(batch.low)))
                m = slice_metrics(pred, batch.full, self.window, batch.field)
                m_in = slice_metrics(batch.low, batch.full, self.window, batch.field)
                for j, key in enumerate(batch.keys):
                    rows.append({"key": key, **{k: float(v[j]) for k, v in m.items()},
                                 **{f"input_{k}": float(v[j]) for k, v in m_in.items()}})
        model.train(was_training)
        gathered = dist.all_gather_objects(rows)
        unique = {r["key"]: r for r in itertools.chain.from_iterable(gathered)}
        return CTMetrics([unique[k] for k in sorted(unique)])

    def __call__(self, model: nn.Module, dist: DistContext) -> dict[str, float]:
        return self.evaluate(model, dist).summary()


# ----------------------------------------------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CTTrainSettings:
    """What :func:`train_ct` needs beyond the optimiser settings.

    Attributes:
        model: ``cnn10``, ``redcnn`` or ``wganvgg``.
        hparams: model constructor arguments.
        dose: low-dose series to use (``None``: a study's only one).
        patch_size: training patch size (pixels).
        samples_per_epoch: patches per epoch.
        val_fraction, test_fraction: patient-level split fractions.
        split_seed: seed of the split (default: the training seed).
        eval_window: window of PSNR/SSIM.
        val_batch_size: slices per validation forward.
        vgg_layers: perceptual-loss layers (WGAN-VGG).
        vgg_window: HU window mapped to the VGG input.
        n_critic, gp_weight, lambda_adv, lambda_vgg, lambda_mse, critic_lr: WGAN-VGG settings.
        critic_widths, critic_hidden: critic size.
        skip_bad: leave out series members that are not readable CT images (and their partner slices), each
            printed on stderr and listed in ``summary.json`` (``skipped``), instead of stopping at the first.
    """

    model: str = "cnn10"
    hparams: dict[str, Any] | None = None
    dose: float | None = None
    patch_size: int = 64
    samples_per_epoch: int = 2048
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int | None = None
    eval_window: str = "abdomen"
    val_batch_size: int = 1
    vgg_layers: tuple[str, ...] = ("relu5_3",)
    vgg_window: str = "0,2000"
    n_critic: int = 4
    gp_weight: float = 10.0
    lambda_adv: float = 1.0
    lambda_vgg: float = 0.1
    lambda_mse: float = 0.0
    critic_lr: float = 1e-4
    critic_widths: tuple[int, int, int] = (64, 128, 256)
    critic_hidden: int = 1024
    skip_bad: bool = False


def find_phantom_physics(data: Path) -> dict[str, Any]:
    """The simulation physics recorded by ``blindspot data ct-phantoms`` (``phantoms.json``) at or above ``data``."""
    for folder in [data, *list(data.parents)[:3]]:
        manifest = folder / "phantoms.json"
        if manifest.is_file():
            try:
                return dict(read_json(manifest).get("physics") or {})
            except BlindspotError:
                return {}
    return {}


def train_ct(
    data: PathLike,
    out_dir: PathLike,
    settings: CTTrainSettings,
    config: TrainConfig,
    *,
    resume: bool = False,
    dist: DistContext | None = None,
    vgg: tuple[VGG16Features, VGGWeightsInfo] | None = None,
    progress: bool = False,
) -> tuple[FitResult, dict[str, Any]]:
    """Train a CT denoiser on the paired slices under ``data``; returns the engine's result and the summary.

    ``vgg`` is the loaded perceptual network (:func:`blindspot.models.vgg.load_vgg16`) — required for WGAN-VGG with
    ``lambda_vgg > 0`` (the caller decides where weights come from; nothing is downloaded).
    """

    if settings.model not in CT_MODELS:
        raise BlindspotError(None, f"unknown CT model {settings.model!r}; choose from {', '.join(CT_MODELS)}")
    dist = dist or DistContext()
    data, out_dir = Path(data), Path(out_dir)
    patients = find_ldct(data, dose=settings.dose, skip_bad=settings.skip_bad)
    skipped = report_skipped(patients)
    split_seed = config.seed if settings.split_seed is None else settings.split_seed
    train_p, val_p, test_p = split_patients(patients, settings.val_fraction, settings.test_fraction, split_seed)
    train_set = LDCTDataset(train_p, progress=progress and dist.is_main)
    norm = train_set.normalization()
    patches = PatchDataset(train_set, settings.patch_size, settings.samples_per_epoch, norm, seed=config.seed)
    val_set = LDCTDataset(val_p) if val_p else None
    doses = {p.dose for p in patients}
    dose = settings.dose if settings.dose is not None else (doses.pop() if len(doses) == 1 else None)
    physics = {"modality": "ct", "dose": dose, "source": str(data)}
    sim = find_phantom_physics(data)
    if sim:
        physics.update({k: v for k, v in sim.items() if k != "modality"})
        physics["simulated"] = True
    hparams = dict(settings.hparams or {})
    seed_everything(config.seed)
    model = build_model(settings.model, **hparams)
    info = CheckpointInfo(settings.model, hparams, physics=physics, normalization=norm.as_dict(),
                          data=f"{data} (dose {dose}; {len(train_p)} train / {len(val_p)} val / {len(test_p)} test "
                               f"patients; {settings.patch_size}px patches)")
    validator = CTValidator(val_set, norm, settings.eval_window, settings.val_batch_size) if val_set else None
    if validator is not None and config.select_metric is None:
        config.select_metric, config.select_mode = "psnr", "max"
    config.unit = "patches"
    loss_name = CT_MODELS[settings.model]
    wgan: WGANVGGLoss | None = None
    if loss_name == "wgan-vgg":
        perceptual = None
        if settings.lambda_vgg > 0:
            if vgg is None:
                raise BlindspotError(None, "WGAN-VGG's perceptual loss needs VGG16 weights: pass --vgg-weights FILE "
                                     "(or --lambda-vgg 0 for a plain WGAN); nothing is downloaded")
            perceptual = PerceptualLoss(vgg[0].to(dist.device), settings.vgg_layers)
            info.data += f"; perceptual loss: VGG16 {list(settings.vgg_layers)} from {Path(vgg[1].path).name}" + (
                " (ImageNet)" if vgg[1].imagenet else " (NOT ImageNet weights)")
            physics["perceptual"] = {**vgg[1].as_dict(), "layers": list(settings.vgg_layers)}
        torch.manual_seed(config.seed + 1)
        critic = WGANCritic(1, settings.patch_size, settings.critic_widths, settings.critic_hidden).to(dist.device)
        wgan = WGANVGGLoss(critic, perceptual, norm, parse_window(settings.vgg_window), settings.n_critic,
                           settings.gp_weight, settings.lambda_adv, settings.lambda_vgg, settings.lambda_mse,
                           settings.critic_lr, dist=dist)
        last = out_dir / Trainer.LAST
        if resume and last.exists():
            epoch = int((read_checkpoint_dict(last).get("training") or {}).get("epoch", -1))
            cpath = critic_path(out_dir, epoch)
            if not cpath.is_file():
                raise BlindspotError(cpath, "the critic of the last epoch is missing: cannot resume WGAN-VGG training")
            wgan.load_state_dict(torch.load(cpath, map_location=dist.device, weights_only=True), cpath)
    loss_fn = wgan if wgan is not None else l2_loss

    class _Validate:
        """Validation plus, for WGAN-VGG, saving the critic of the epoch just finished."""

        def __init__(self) -> None:
            self.epoch = -1

        def __call__(self, model_: nn.Module, dist_: DistContext) -> dict[str, float]:
            metrics = validator(model_, dist_) if validator is not None else {}
            if wgan is not None:
                self.epoch += 1
                if dist_.is_main:
                    buf = io.BytesIO()
                    torch.save(wgan.state_dict(), buf)
                    atomic_write_bytes(critic_path(out_dir, self.epoch), buf.getvalue())
                    old = critic_path(out_dir, self.epoch - 2)
                    old.unlink(missing_ok=True)
            return metrics

    hook = _Validate()
    if resume and (out_dir / Trainer.LAST).exists():
        hook.epoch = int((read_checkpoint_dict(out_dir / Trainer.LAST).get("training") or {}).get("epoch", -1))
    trainer = Trainer(model, loss_fn, patches, config, out_dir, info,
                      validate=hook if (validator is not None or wgan is not None) else None, dist=dist)
    result = trainer.fit(resume=resume)
    summary: dict[str, Any] = {}
    if dist.is_main:
        best = next((r for r in result.history if r["epoch"] == result.best_epoch), {})
        test_metrics: dict[str, float] = {}
        if test_p:
            ckpt = load_checkpoint(result.best_path, map_location=dist.device)
            test_metrics = CTValidator(LDCTDataset(test_p), norm, settings.eval_window,
                                       settings.val_batch_size).evaluate(ckpt.model, DistContext(device=dist.device)
                                                                        ).summary()
        settings_d = asdict(settings)
        summary = {
            "architecture": settings.model,
            "hparams": hparams,
            "loss": loss_name,
            "physics": physics,
            "normalization": norm.as_dict(),
            "data": str(data),
            "split": {"seed": split_seed, "train": [p.patient for p in train_p], "val": [p.patient for p in val_p],
                      "test": [p.patient for p in test_p]},
            "settings": settings_d,
            "config": asdict(config),
            "world_size": dist.world_size,
            "epochs": len(result.history),
            "best_epoch": result.best_epoch,
            "best_val": best.get("val", {}),
            "test": test_metrics,
            "train_loss": [r["train_loss"] for r in result.history],
            "checkpoints": {"best": str(result.best_path), "last": str(result.last_path)},
            "skipped": skipped,
        }
        write_json(out_dir / "summary.json", summary)
    return result, summary
