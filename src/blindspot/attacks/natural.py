"""Natural invariances (DESIGN.md §1.3): a conditional generator ``g(z | x)`` trained against a WGAN-GP critic.

Image-domain invariances (:mod:`blindspot.attacks.invariance`) leave the data manifold and need a fresh
optimisation for every new one. Here a generator learns, once, to turn a network input ``x`` (a normalised
low-dose CT image, or a normalised zero-filled MR image) and noise ``z ~ N(0, I)`` into an input the network ``f``
cannot tell from ``x``, while a critic ``C`` keeps the result looking like real inputs. The generator minimises

    ‖f(x) − f(x̃)‖  −  α · D(x, x̃)  −  β · C(x̃),      x̃ = the network input that g(z|x) becomes (below)

where ``C`` is a Wasserstein critic (high = real), i.e. the source document's ``+β·C`` with its critic's sign
convention (low = real) flipped. ``‖·‖`` and ``D`` are the bounded distances of :mod:`blindspot.attacks.distances`.
The critic minimises ``C(fake) − C(real) + λ·GP`` (WGAN-GP, :func:`blindspot.losses.gradient_penalty`).

**What the generator's output becomes** (a :class:`NaturalTarget`):

* :class:`ImageTarget` — image-convention networks (CT denoisers, image-domain MRI networks such as the U-Net):
  ``x̃ = g(z|x)`` is the network input itself, and training runs on random patches (the source document's 80×80),
  which a fully convolutional network accepts. For MRI ``x`` is the normalised zero-filled image, so the generator
  learns natural-looking changes of the under-sampled input (aliasing included: the critic sees real zero-filled
  patches), exactly as it learns changes of the noisy low-dose input for CT.
* :class:`AcquisitionTarget` — networks that need the sampling mask or the k-space (I-RIM, a VarNet-like k-space
  network): a patch has no mask columns and no k-space, so these train on **whole images**, and the generator's
  change is made *realisable*: ``σ·(g − x)`` (``σ`` the clean input's normalisation scale) is taken as a change of
  the true image, and the acquisition turns it into measurements, ``x̃ = N(A(y + σ(g − x)))`` (exact for MRI,
  whose k-space is linear in the image). The network then gets those measurements in its own convention, the
  distance and the critic judge ``x̃`` (what the network actually receives), so a change that the mask hides
  counts for nothing and every sample is an input a scanner could produce. At ``g = x``, ``x̃ = x`` exactly.

Generator (:class:`ConditionalGenerator`): ``S`` stages from coarse (``1/2^(S−1)`` of the patch) to full resolution.
Stage ``i`` receives the previous stage's features up-sampled ×2, the condition ``x`` down-sampled to its
resolution (average pooling), and ``z`` down-sampled the same way and rescaled to unit variance; the last stage's
features map to a residual added to ``x`` (its last layer starts at zero, so training starts from ``g = x``).
It is fully convolutional: trained on patches, it samples whole images. ``z`` is one map
``(B, z_channels, H, W)``, so a new ``z`` changes every scale.

**Field of view** (CT: the reconstructed circle of a real scanner's slice, ``field`` bool ``(N, 1, H, W)``, ``True``
= image): pixels outside it are not image (air in the conditions, where the data were read). Training patches are
drawn only where the whole patch lies inside the field (:class:`PatchSampler`), so no loss and no critic score ever
sees them; on whole images the generator's change is cut to the field (:meth:`ImageTarget.realise`: out-of-field
pixels keep their value) and :func:`evaluate_samples` measures every change, and the critic's tiles, inside it (an
image smaller than a tile is scored whole: outside the field it is the same air in the condition and every sample).

Critic (:class:`PatchCritic`): strided convolutions with leaky ReLUs, no normalisation layers (as WGAN-GP asks),
and a spatial mean at the end, so it scores a patch (or a whole image) of any size ≥ 8 px with one number.

Checkpoint (one file, written atomically; loaded with ``torch.load(..., weights_only=True)``)::

    {"format": "blindspot-invariance-generator", "version": 1,
     "generator": {"hparams": {...}, "state_dict": {...}},
     "critic":    {"hparams": {...}, "state_dict": {...}},
     "optimizers": {"generator": <Adam state_dict>, "critic": <Adam state_dict>},
     "step": int, "config": {... NaturalConfig ...}, "target": {... what f is, its normalisation / acquisition ...},
     "rng": <generator state ByteTensor>}

Training resumes from the checkpoint bit for bit on the CPU: the one random generator (patches, ``z``,
interpolation weights) is stored with it.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from blindspot.attacks.distances import Distance, build_distance
from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import append_jsonl, atomic_write_bytes
from blindspot.losses import gradient_penalty
from blindspot.models.adapters import Network, as_network
from blindspot.physics.acquisition import Acquisition, Measurement
from blindspot.physics.mri import NormStats

FORMAT = "blindspot-invariance-generator"
VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------
def _down(t: Tensor, factor: int) -> Tensor:
    return t if factor == 1 else F.avg_pool2d(t, factor)


class ConditionalGenerator(nn.Module):
    """``g(z | x)``: multi-scale conditional generator of invariances.

    Args:
        scales: number of stages ``S`` (resolutions ``1/2^(S−1) … 1``).
        channels: feature channels of every stage.
        z_channels: channels of the noise map ``z``.
        blocks: 3×3 convolutions (each followed by a leaky ReLU) per stage.

    ``forward(x, z)``: ``x`` ``(B, 1, H, W)`` normalised images, ``z`` ``(B, z_channels, H, W)`` standard normal →
    ``(B, 1, H, W)``. Any ``H, W``: inputs are edge-padded to a multiple of ``2^(S−1)`` and the output cropped back.
    """

    def __init__(self, scales: int = 3, channels: int = 32, z_channels: int = 4, blocks: int = 2) -> None:
        super().__init__()
        if scales < 1 or channels < 1 or z_channels < 1 or blocks < 1:
            raise BlindspotError(None, "generator scales, channels, z_channels and blocks must be at least 1")
        self.scales, self.channels, self.z_channels, self.blocks = int(scales), int(channels), int(z_channels), int(blocks)
        self.stages = nn.ModuleList()
        for i in range(self.scales):
            in_ch = (channels if i > 0 else 0) + 1 + z_channels
            layers: list[nn.Module] = []
            for b in range(blocks):
                layers += [nn.Conv2d(in_ch if b == 0 else channels, channels, 3, padding=1, padding_mode="replicate"),
                           nn.LeakyReLU(0.2)]
            self.stages.append(nn.Sequential(*layers))
        self.to_residual = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.to_residual.weight)
        nn.init.zeros_(self.to_residual.bias)

    @property
    def hparams(self) -> dict[str, int]:
        return {"scales": self.scales, "channels": self.channels, "z_channels": self.z_channels, "blocks": self.blocks}

    @property
    def multiple(self) -> int:
        return 2 ** (self.scales - 1)

    def sample_z(self, n: int, height: int, width: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal noise ``(n, z_channels, height, width)``."""
        return torch.randn(n, self.z_channels, height, width, generator=generator, device=device, dtype=dtype)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or z.shape[0] != x.shape[0] or z.shape[1] != self.z_channels \
                or z.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"generator takes x (B, 1, H, W) and z (B, {self.z_channels}, H, W), "
                             f"got {tuple(x.shape)} and {tuple(z.shape)}")
        H, W = x.shape[-2:]
        m = self.multiple
        ph, pw = (-H) % m, (-W) % m
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
        zp = F.pad(z, (0, pw, 0, ph), mode="replicate") if ph or pw else z
        h: Tensor | None = None
        for i, stage in enumerate(self.stages):
            k = 2 ** (self.scales - 1 - i)
            parts = [_down(xp, k), _down(zp, k) * k]  # k: average of k² unit normals has std 1/k
            if h is not None:
                parts.insert(0, F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False))
            h = stage(torch.cat(parts, dim=1))
        out = xp + self.to_residual(h)
        return out[..., :H, :W]


class PatchCritic(nn.Module):
    """WGAN-GP critic on patches: ``(B, 1, P, P)`` → ``(B,)`` scores (higher = more like real low-dose data).

    Args:
        channels: channels of the first layer (doubled at each stride-2 layer).
        depth: number of stride-2 layers (patches must be at least ``2^depth`` px).
    """

    def __init__(self, channels: int = 32, depth: int = 3) -> None:
        super().__init__()
        if channels < 1 or depth < 1:
            raise BlindspotError(None, "critic channels and depth must be at least 1")
        self.channels, self.depth = int(channels), int(depth)
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c *= 2
        layers += [nn.Conv2d(c, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    @property
    def hparams(self) -> dict[str, int]:
        return {"channels": self.channels, "depth": self.depth}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
class PatchSampler:
    """Random square patches (or whole images) of a stack of images, drawn as one batched gather on their device.

    Args:
        images: ``(N, 1, H, W)`` normalised network inputs (kept where they are; put them on the model's device).
        patch: patch side in pixels (≤ ``H, W``), or ``None`` for whole images.
        weights: optional ``(N,)`` sampling weights (e.g. equal probability per patient); uniform by default.
        field: optional fields of view, bool ``(N, 1, H, W)`` (``True`` = image): patches are then drawn uniformly
            among the positions where the whole patch lies inside the field (an image without one is an error).
    """

    def __init__(self, images: Tensor, patch: int | None, weights: Tensor | None = None,
                 field: Tensor | None = None) -> None:
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[0] < 1:
            raise BlindspotError(None, f"training images must be (N, 1, H, W), got {tuple(images.shape)}")
        if patch is not None and patch > min(images.shape[-2:]):
            raise BlindspotError(None, f"patch {patch} px is larger than the {tuple(images.shape[-2:])} images")
        if not torch.isfinite(images).all():
            raise BlindspotError(None, "training images contain NaN or Inf")
        self.images, self.patch = images, None if patch is None else int(patch)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=images.device)
        self._ar = None if patch is None else torch.arange(self.patch, device=images.device)
        self.corners: Tensor | None = None  # (N, H−P+1, W−P+1) bool: where a patch's top-left corner may go
        self.row_weights: Tensor | None = None  # (N, H−P+1) float: allowed corners per row
        if field is not None and self.patch is not None:
            if tuple(field.shape) != tuple(images.shape):
                raise BlindspotError(None, f"field of view {tuple(field.shape)} does not fit images "
                                     f"{tuple(images.shape)}")
            self.corners = patch_corners(field.to(images.device), self.patch)
            self.row_weights = self.corners.sum(-1, dtype=torch.float32)
            none = (self.row_weights.sum(1) == 0).nonzero().flatten().tolist()
            if none:
                raise BlindspotError(None, f"no {self.patch}x{self.patch} patch lies wholly inside the field of view "
                                     f"of image {none[0]}; use a smaller patch")

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` patches ``(n, 1, P, P)`` (whole images ``(n, 1, H, W)`` without a patch size) and the index
        ``(n,)`` of the image each came from; ``generator`` lives on the images' device."""
        N, _, H, W = self.images.shape
        dev = self.images.device
        if self.weights is None:
            idx = torch.randint(N, (n,), generator=generator, device=dev)
        else:
            idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        if self.patch is None:
            return self.images[idx], idx
        if self.corners is None:
            top = torch.randint(H - self.patch + 1, (n,), generator=generator, device=dev)
            left = torch.randint(W - self.patch + 1, (n,), generator=generator, device=dev)
        else:  # uniform over the allowed corners: a row by its count of them, then one of the row's
            top = torch.multinomial(self.row_weights[idx], 1, generator=generator).squeeze(1)
            left = torch.multinomial(self.corners[idx, top].to(torch.float32), 1, generator=generator).squeeze(1)
        rows = (top[:, None] + self._ar)[:, :, None]
        cols = (left[:, None] + self._ar)[:, None, :]
        return self.images[idx[:, None, None], 0, rows, cols].unsqueeze(1), idx

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` patches (see :meth:`draw`), without their image index."""
        return self.draw(n, generator)[0]


def patch_corners(field: Tensor, patch: int) -> Tensor:
    """Where a ``patch``×``patch`` patch may start so that it lies wholly inside the field of view: bool
    ``(N, H − patch + 1, W − patch + 1)`` from ``field`` bool ``(N, 1, H, W)`` (an integral image of the pixels
    outside: a window holding none of them)."""
    out = F.pad((~field[:, 0].to(torch.bool)).to(torch.float64), (1, 0, 1, 0)).cumsum(-1).cumsum(-2)
    p = int(patch)
    count = out[:, p:, p:] - out[:, :-p, p:] - out[:, p:, :-p] + out[:, :-p, :-p]
    return count < 0.5


# ----------------------------------------------------------------------------------------------------------------
# Targets: what the generator's output becomes, and what the network makes of it
# ----------------------------------------------------------------------------------------------------------------
class NaturalTarget:
    """The frozen network ``f`` and the conditions of natural invariances (see the module docs).

    Attributes:
        module: the network's ``nn.Module`` (frozen by the trainer).
        images: the conditions ``x`` ``(N, 1, H, W)``: normalised network inputs, on the network's device.
        whole_images: train on whole images rather than patches (the network needs the whole measurement).
        field: the conditions' fields of view, bool ``(N, 1, H, W)`` on their device (``True`` = image), or ``None``
            when every pixel is image (see the module docs).
    """

    module: nn.Module
    images: Tensor
    whole_images: bool = False
    field: Tensor | None = None

    def realise(self, g: Tensor, items: Tensor) -> Tensor:
        """The network input ``(n, 1, H, W)`` that generator outputs ``g`` for images ``items`` ``(n,)`` become."""
        raise NotImplementedError

    def __call__(self, g: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """``(x̃, f(x̃))``: the network input that ``g`` ``(n, 1, H, W)`` becomes and the normalised output."""
        raise NotImplementedError


class ImageTarget(NaturalTarget):
    """An image-convention network: the generator's output is the network input itself (patches or whole images).

    Args:
        model: the network on normalised images ``(n, 1, H, W)`` → ``(n, 1, H, W)`` (an ``nn.Module`` or an
            image-convention :class:`~blindspot.models.adapters.Network`).
        images: the conditions ``(N, 1, H, W)`` (normalised low-dose CT images, or normalised zero-filled MR images).
        field: optional fields of view of the conditions, bool ``(N, 1, H, W)`` (CT).
    """

    def __init__(self, model: "nn.Module | Network", images: Tensor, field: Tensor | None = None) -> None:
        net = as_network(model)
        if net.convention != "image":
            raise BlindspotError(net.name, f"takes the {net.convention} convention; use an AcquisitionTarget")
        if field is not None:
            if tuple(field.shape) != tuple(images.shape):
                raise BlindspotError(None, f"field of view {tuple(field.shape)} does not fit images "
                                     f"{tuple(images.shape)}")
            field = None if bool(field.all()) else field.to(device=images.device, dtype=torch.bool)
        self.module, self.images, self.field = net.module, images, field

    def realise(self, g: Tensor, items: Tensor) -> Tensor:
        """``g`` itself; whole images (the conditions' shape) keep the conditions' values outside their field of
        view. Patches need no cut: :class:`PatchSampler` draws them inside the field."""
        if self.field is None or tuple(g.shape[-2:]) != tuple(self.images.shape[-2:]):
            return g
        return torch.where(self.field[items], g, self.images[items])

    def __call__(self, g: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        x = self.realise(g, items)
        return x, self.module(x)


class AcquisitionTarget(NaturalTarget):
    """A network seen through its acquisition: ``x̃ = N(A(y + σ(g − x)))``, the measurements of the true image
    changed by what the generator proposes, on whole images (see the module docs).

    Args:
        network: any network convention (image, image + mask, k-space; :func:`~blindspot.models.adapters.as_network`).
        acquisition: the acquisition of the ``N`` images (one set of parameters per image, e.g. one MRI mask each).
        truth: the true images ``(N, 1, H, W)`` in the data's units, on the network's device.

    The conditions are the clean normalised inputs ``x = N(A(y))`` ``(N, 1, h, w)``; the normalisation keeps the
    clean statistics. When the acquisition crops (``h, w < H, W``) the change is placed in the centre of the truth.
    """

    whole_images = True

    def __init__(self, network: "nn.Module | Network", acquisition: Acquisition, truth: Tensor) -> None:
        self.network = as_network(network)
        self.network.check(acquisition)
        self.module = self.network.module
        self.acquisition = acquisition
        self.grid = tuple(truth.shape[-2:])
        with torch.no_grad():
            self.measurement = acquisition.measure(truth).detach()
            self.stats = acquisition.normalization(self.measurement)
            self.images = self.stats.apply(self.measurement.image)

    def _measure(self, g: Tensor, items: Tensor) -> tuple[Acquisition, Measurement, NormStats, Tensor]:
        """The acquisition, perturbed measurement, clean statistics and network input of rows ``items``."""
        acq, stats = self.acquisition.select(items), self.stats.index(items)
        delta = (g - self.images[items]) * stats.std  # data units, on the network's grid
        H, W = self.grid
        h, w = delta.shape[-2:]
        if (h, w) != (H, W):  # centred, as center_crop takes it back
            top, left = (H - h) // 2, (W - w) // 2
            delta = F.pad(delta, (left, W - w - left, top, H - h - top))
        meas = acq.perturb(self.measurement.select(items), delta)
        return acq, meas, stats, stats.apply(meas.image)

    def realise(self, g: Tensor, items: Tensor) -> Tensor:
        return self._measure(g, items)[3]

    def __call__(self, g: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        acq, meas, stats, x = self._measure(g, items)
        return x, self.network(acq, meas, x, stats)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NaturalConfig:
    """Settings of generator training.

    Attributes:
        alpha: weight of the distance reward ``α·D(x, g)``.
        beta: weight of the critic term ``β·C(g)``.
        distance, fidelity: names of ``D`` and ``‖·‖`` (``rms``, ``mse``, ``ssim``, ``vgg``). ``D`` defaults to the
            bounded RMS: the generator starts at ``g = x``, where a squared distance has no gradient, so with
            ``D = mse`` the critic term (which favours ``g = x``) would keep it there.
        patch: training patch side (the source document's 80 px); unused by whole-image targets
            (:class:`AcquisitionTarget`).
        batch_size: patches per step.
        n_critic: critic updates per generator update.
        gp_weight: gradient-penalty weight ``λ``.
        lr, beta1, beta2: Adam settings of both networks (WGAN-GP's 1e-4, 0.5, 0.9).
        scales, channels, z_channels, blocks: generator architecture.
        critic_channels, critic_depth: critic architecture.
        seed: seed of the one random generator (patches, ``z``, interpolates) and of the weight initialisation.
    """

    alpha: float = 0.01
    beta: float = 1e-3
    distance: str = "rms"
    fidelity: str = "mse"
    patch: int = 80
    batch_size: int = 16
    n_critic: int = 5
    gp_weight: float = 10.0
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.9
    scales: int = 3
    channels: int = 32
    z_channels: int = 4
    blocks: int = 2
    critic_channels: int = 32
    critic_depth: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.patch < 2 ** self.critic_depth or self.patch % (2 ** (self.scales - 1)):
            raise BlindspotError(
                None, f"patch {self.patch} px must be ≥ {2 ** self.critic_depth} and a multiple of {2 ** (self.scales - 1)}"
            )
        if self.batch_size < 1 or self.n_critic < 1 or not self.lr > 0 or self.alpha < 0 or self.beta < 0:
            raise BlindspotError(None, "batch size and n_critic must be ≥ 1, lr > 0, alpha and beta ≥ 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NaturalConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: Config fields that define the trained networks; a resume must not change them.
_ARCH_FIELDS = ("distance", "fidelity", "patch", "scales", "channels", "z_channels", "blocks", "critic_channels",
                "critic_depth", "seed", "alpha", "beta", "gp_weight", "n_critic")


class NaturalInvarianceTrainer:
    """Trains ``g(z|x)`` and its critic against a frozen network ``f``; checkpoints and resumes.

    Args:
        model: a :class:`NaturalTarget` (the network with its conditions), or an image-convention network on
            normalised images ``(B, 1, H, W)`` → ``(B, 1, H, W)`` (then ``images`` are the conditions). Frozen,
            in eval mode.
        images: ``(N, 1, H, W)`` normalised training inputs on the model's device, for a bare network (``None``
            with a :class:`NaturalTarget`, which holds its own).
        config: training settings.
        checkpoint: path of the checkpoint file (written every ``checkpoint_every`` steps and at the end);
            if it exists, training resumes from it (its config must match).
        target_info: what ``f`` is (model name/path, normalisation, …), stored in the checkpoint.
        weights: optional per-image sampling weights ``(N,)``.
        log_path: JSON-lines file of losses (one row per ``log_every`` steps); default beside the checkpoint.
        vgg_weights: VGG16 weights file for the ``vgg`` distance.
    """

    def __init__(
        self,
        model: "nn.Module | Network | NaturalTarget",
        images: Tensor | None = None,
        config: NaturalConfig | None = None,
        checkpoint: PathLike | None = None,
        target_info: Mapping[str, Any] | None = None,
        weights: Tensor | None = None,
        log_path: PathLike | None = None,
        vgg_weights: PathLike | None = None,
    ) -> None:
        self.config = cfg = config or NaturalConfig()
        self.target = as_natural_target(model, images)
        self.model = self.target.module.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        images = self.target.images
        self.device = images.device
        self.sampler = PatchSampler(images, None if self.target.whole_images else cfg.patch, weights,
                                    self.target.field)
        self.target_info = dict(target_info or {})
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.log_path = Path(log_path) if log_path is not None else (
            self.checkpoint.with_name("train_log.jsonl") if self.checkpoint is not None else None
        )
        torch.manual_seed(cfg.seed)  # weight initialisation
        self.generator = ConditionalGenerator(cfg.scales, cfg.channels, cfg.z_channels, cfg.blocks).to(self.device)
        self.critic = PatchCritic(cfg.critic_channels, cfg.critic_depth).to(self.device)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr, betas=betas)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr, betas=betas)
        self.rng = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.distance: Distance = build_distance(cfg.distance, vgg_weights=vgg_weights, device=self.device)
        self.fidelity: Distance = (
            self.distance if cfg.fidelity == cfg.distance
            else build_distance(cfg.fidelity, vgg_weights=vgg_weights, device=self.device)
        )
        self.step = 0
        if self.checkpoint is not None and self.checkpoint.exists():
            self._resume(self.checkpoint)

    # -- one step ----------------------------------------------------------------------------------------------
    def _fake(self, x: Tensor) -> Tensor:
        z = self.generator.sample_z(x.shape[0], x.shape[-2], x.shape[-1], self.rng, self.device, x.dtype)
        return self.generator(x, z)

    def train_step(self) -> dict[str, float]:
        """``n_critic`` critic updates then one generator update; returns the step's losses (floats)."""
        cfg = self.config
        self.generator.train()
        self.critic.train()
        for _ in range(cfg.n_critic):
            real, idx = self.sampler.draw(cfg.batch_size, self.rng)
            with torch.no_grad():
                fake = self.target.realise(self._fake(real), idx)
            eps = torch.rand(real.shape[0], 1, 1, 1, generator=self.rng, device=self.device, dtype=real.dtype)
            c_real, c_fake = self.critic(real), self.critic(fake)
            gp = gradient_penalty(self.critic, real, fake, eps)
            loss_c = c_fake.mean() - c_real.mean() + cfg.gp_weight * gp
            self.opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
            self.opt_c.step()
        x, idx = self.sampler.draw(cfg.batch_size, self.rng)
        for p in self.critic.parameters():
            p.requires_grad_(False)
        try:
            g = self._fake(x)
            with torch.no_grad():
                f_x = self.target(x, idx)[1]
            fake, f_fake = self.target(g, idx)
            fid = self.fidelity(f_fake, f_x).mean()
            dist = self.distance(fake, x).mean()
            adv = self.critic(fake).mean()
            loss_g = fid - cfg.alpha * dist - cfg.beta * adv
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            self.opt_g.step()
        finally:
            for p in self.critic.parameters():
                p.requires_grad_(True)
        self.step += 1
        return {
            "step": self.step,
            "loss_critic": float(loss_c.detach()),
            "wasserstein": float((c_real.mean() - c_fake.mean()).detach()),
            "gradient_penalty": float(gp.detach()),
            "loss_generator": float(loss_g.detach()),
            "fidelity": float(fid.detach()),
            "distance": float(dist.detach()),
            "critic_fake": float(adv.detach()),
        }

    def train(self, steps: int, checkpoint_every: int = 200, log_every: int = 10, progress: bool = True) -> list[dict[str, float]]:
        """Train until ``self.step == steps`` (continuing from a resumed step); returns the logged rows."""
        logged: list[dict[str, float]] = []
        bar = tqdm(total=steps, initial=min(self.step, steps), desc="generator", unit="step",
                   disable=(not progress) or None)
        try:
            while self.step < steps:
                row = self.train_step()
                bar.update(1)
                if self.step % log_every == 0 or self.step == steps:
                    if not all(math.isfinite(v) for v in row.values()):
                        raise BlindspotError(self.checkpoint, f"training diverged at step {self.step}: {row}")
                    logged.append(row)
                    if self.log_path is not None:
                        append_jsonl(self.log_path, [row])
                    bar.set_postfix(fid=f"{row['fidelity']:.3g}", dist=f"{row['distance']:.3g}",
                                    w=f"{row['wasserstein']:.3g}")
                if self.checkpoint is not None and (self.step % checkpoint_every == 0 or self.step == steps):
                    self.save(self.checkpoint)
        finally:
            bar.close()
        return logged

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "generator": {"hparams": self.generator.hparams, "state_dict": _cpu(self.generator.state_dict())},
            "critic": {"hparams": self.critic.hparams, "state_dict": _cpu(self.critic.state_dict())},
            "optimizers": {"generator": self.opt_g.state_dict(), "critic": self.opt_c.state_dict()},
            "step": int(self.step),
            "config": self.config.to_dict(),
            "target": self.target_info,
            "rng": self.rng.get_state(),
        }

    def save(self, path: PathLike) -> Path:
        buf = io.BytesIO()
        torch.save(self.state(), buf)
        return atomic_write_bytes(path, buf.getvalue())

    def _resume(self, path: Path) -> None:
        obj = read_generator_checkpoint(path, map_location=self.device)
        stored = NaturalConfig.from_dict(obj.get("config") or {})
        changed = [f for f in _ARCH_FIELDS if getattr(stored, f) != getattr(self.config, f)]
        if changed:
            diffs = ", ".join(f"{f} {getattr(stored, f)!r} → {getattr(self.config, f)!r}" for f in changed)
            raise BlindspotError(path, f"cannot resume with different settings ({diffs}); use another --out")
        try:
            self.generator.load_state_dict(obj["generator"]["state_dict"])
            self.critic.load_state_dict(obj["critic"]["state_dict"])
            self.opt_g.load_state_dict(obj["optimizers"]["generator"])
            self.opt_c.load_state_dict(obj["optimizers"]["critic"])
            self.rng.set_state(obj["rng"].cpu())
            for opt in (self.opt_g, self.opt_c):  # a resume may change the learning rate or betas
                for group in opt.param_groups:
                    group["lr"], group["betas"] = self.config.lr, (self.config.beta1, self.config.beta2)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise BlindspotError(path, f"generator checkpoint is incomplete or does not fit ({str(err).splitlines()[0][:160]})") from None
        self.step = int(obj.get("step", 0))


def _cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def read_generator_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a generator checkpoint dict with ``weights_only=True``; anything unusable is a :class:`BlindspotError`."""
    path = Path(path)
    if not path.is_file():
        raise BlindspotError(path, "generator checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BlindspotError(path, f"not a loadable generator checkpoint ({first[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise BlindspotError(path, f"not a blindspot invariance-generator checkpoint (format {FORMAT!r} expected)")
    return obj


def load_generator(path: PathLike, map_location: str | torch.device = "cpu") -> tuple[ConditionalGenerator, PatchCritic, dict[str, Any]]:
    """The trained generator and critic (eval mode) and the checkpoint's metadata (``config``, ``target``, ``step``)."""
    obj = read_generator_checkpoint(path, map_location)
    try:
        gen = ConditionalGenerator(**obj["generator"]["hparams"])
        gen.load_state_dict(obj["generator"]["state_dict"])
        critic = PatchCritic(**obj["critic"]["hparams"])
        critic.load_state_dict(obj["critic"]["state_dict"])
    except (KeyError, RuntimeError, TypeError) as err:
        raise BlindspotError(path, f"generator checkpoint does not fit ({str(err).splitlines()[0][:160]})") from None
    meta = {"config": dict(obj.get("config") or {}), "target": dict(obj.get("target") or {}), "step": int(obj.get("step", 0))}
    return gen.to(map_location).eval(), critic.to(map_location).eval(), meta


# ----------------------------------------------------------------------------------------------------------------
# Sampling and evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_invariances(generator: ConditionalGenerator, x: Tensor, n_samples: int,
                       seed: int | Sequence[int] = 0, chunk: int = 64) -> Tensor:
    """Draw ``n_samples`` invariances per image without optimisation: ``(B, n_samples, 1, H, W)``.

    Args:
        generator: the trained ``g(z|x)`` (put in eval mode).
        x: ``(B, 1, H, W)`` normalised images on the generator's device.
        seed: one seed for the batch, or one per image (then an image's samples do not depend on the batch).
        chunk: most images per generator call (bounds memory).
    """
    generator.eval()
    B, _, H, W = x.shape
    dev = x.device
    if isinstance(seed, int):
        g = torch.Generator(device=dev).manual_seed(int(seed))
        z = generator.sample_z(B * n_samples, H, W, g, dev, x.dtype)
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} images")
        z = torch.cat([generator.sample_z(n_samples, H, W, torch.Generator(device=dev).manual_seed(s), dev, x.dtype)
                       for s in seeds])
    rep = x.repeat_interleave(n_samples, dim=0)
    out = torch.empty_like(rep)
    for s in range(0, rep.shape[0], chunk):
        out[s : s + chunk] = generator(rep[s : s + chunk], z[s : s + chunk])
    return out.reshape(B, n_samples, 1, H, W)


def tiles(x: Tensor, patch: int | None) -> Tensor:
    """Non-overlapping ``patch``×``patch`` tiles of ``(N, 1, H, W)`` images → ``(N·T, 1, patch, patch)``
    (the whole images when they are smaller than ``patch`` or ``patch`` is ``None``)."""
    if patch is None or min(x.shape[-2:]) < patch:
        return x
    t = x.unfold(-2, patch, patch).unfold(-2, patch, patch)  # (N, 1, nh, nw, P, P)
    return t.reshape(-1, 1, patch, patch)


def as_natural_target(model: "nn.Module | Network | NaturalTarget", images: Tensor | None) -> NaturalTarget:
    """``model`` as a :class:`NaturalTarget`: a target as it is, a bare network as an :class:`ImageTarget` on
    ``images`` ``(N, 1, H, W)``."""
    if isinstance(model, NaturalTarget):
        if images is not None and images is not model.images:
            raise ValueError("give the conditions through the NaturalTarget, not beside it")
        return model
    if images is None:
        raise BlindspotError(None, "a bare network needs its conditions (normalised images (N, 1, H, W))")
    return ImageTarget(model, images)


@torch.no_grad()
def realise_samples(
    target: NaturalTarget, x: Tensor, samples: Tensor, items: Tensor, chunk: int = 64
) -> tuple[Tensor, Tensor, Tensor]:
    """The network inputs the samples become and the network's outputs, in chunks of ``chunk`` rows.

    Args:
        target: the network and its conditions.
        x: ``(B, 1, H, W)`` conditions, ``x[b] = target.images[items[b]]``.
        samples: generator outputs ``(B, S, 1, H, W)`` from :func:`sample_invariances`.
        items: ``(B,)`` long, the conditions' rows in ``target.images``.

    Returns:
        ``inputs`` ``(B, S, 1, h, w)`` (normalised network inputs), ``outputs`` ``(B, S, 1, h', w')`` and ``f_x``
        ``(B, 1, h', w')`` (normalised outputs), on the target's device.
    """
    B, S = samples.shape[:2]
    flat = samples.reshape(B * S, *samples.shape[2:])
    rows = items.repeat_interleave(S)
    parts = [target(flat[i : i + chunk], rows[i : i + chunk]) for i in range(0, flat.shape[0], chunk)]
    _, f_x = target(x, items)
    inputs = torch.cat([a for a, _ in parts]).reshape(B, S, *parts[0][0].shape[1:])
    outputs = torch.cat([b for _, b in parts]).reshape(B, S, *f_x.shape[1:])
    return inputs, outputs, f_x


@torch.no_grad()
def evaluate_samples(
    model: "nn.Module | Network | NaturalTarget",
    x: Tensor,
    samples: Tensor,
    critic: PatchCritic | None = None,
    patch: int | None = 80,
    scale: float = 1.0,
    seed: int = 0,
    items: Tensor | None = None,
    realised: tuple[Tensor, Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """How far samples move the network input, how little they move ``f``, and how real the critic finds them.

    Args:
        model: a :class:`NaturalTarget`, or an image-convention network on normalised images.
        x: ``(B, 1, H, W)`` normalised conditions; samples ``(B, S, 1, H, W)`` from :func:`sample_invariances`.
        critic: the trained critic (optional) — scores non-overlapping ``patch`` tiles (whole images for ``None``,
            as a whole-image target's critic was trained).
        scale: units per normalised unit for the change magnitudes (HU for CT; 1 for MRI's normalised units).
        seed: seed of the white-noise baseline.
        items: ``(B,)`` rows of ``x`` in the target's conditions (default ``0 … B−1``).
        realised: :func:`realise_samples`' result, when the caller already has it.
    Returns per image ``(B,)``, on the CPU: ``mean_abs_change`` (mean |x̃ − x|, scaled), ``output_mean_abs_change``,
    ``output_rms_change`` (scaled), ``change_ratio`` (RMS output change / RMS input change), ``sample_std``
    (mean pixel-wise std over samples, scaled); with a critic, ``critic_real`` (mean score of ``x``'s tiles),
    ``critic_samples`` (of the samples' tiles), ``critic_noise`` (of ``x`` plus white noise of the samples' RMS
    change: an unstructured change of equal size) and ``critic_gap`` = ``critic_real − critic_samples``.
    ``x̃`` is the network input a sample becomes (the sample itself for an image-convention network). With the
    target's field of view (CT), every mean is over the pixels inside it and the critic scores only the tiles that
    lie wholly inside it, so out-of-field pixels change none of the figures.
    """
    target = as_natural_target(model, None if isinstance(model, NaturalTarget) else x)
    B, S = samples.shape[:2]
    items = torch.arange(B, device=x.device) if items is None else items
    inputs, f_s, f_x = realised if realised is not None else realise_samples(target, x, samples, items)
    flat = inputs.reshape(B * S, *inputs.shape[2:])
    field = target.field
    if field is not None and tuple(field.shape[-2:]) == tuple(x.shape[-2:]) == tuple(f_x.shape[-2:]):
        w = field[items].to(x.dtype).flatten(1).unsqueeze(1)  # (B, 1, H·W): weights of the pixels that are image
    else:
        field, w = None, torch.ones(B, 1, x[0].numel(), device=x.device, dtype=x.dtype)
    n_in = w.sum(-1)  # (B, 1)
    mean = lambda t: (t * w).sum(-1) / n_in  # noqa: E731 — mean over the field, (B, S)
    d = (inputs - x.unsqueeze(1)).flatten(2)
    od = (f_s - f_x.unsqueeze(1)).flatten(2)
    rms_in = mean(d.square()).sqrt()
    out = {
        "mean_abs_change": mean(d.abs()).mean(1) * scale,
        "rms_change": rms_in.mean(1) * scale,
        "output_mean_abs_change": mean(od.abs()).mean(1) * scale,
        "output_rms_change": mean(od.square()).sqrt().mean(1) * scale,
        "change_ratio": (mean(od.square()).sqrt() / rms_in.clamp_min(1e-12)).mean(1),
        "sample_std": (mean(inputs.std(dim=1).flatten(1).unsqueeze(1))[:, 0] * scale) if S > 1
        else torch.zeros(B, device=x.device),
    }
    if critic is not None:
        critic.eval()
        g = torch.Generator(device=x.device).manual_seed(int(seed))
        noise = torch.randn(flat.shape, generator=g, device=x.device, dtype=x.dtype)
        if field is not None:
            noise = noise * field[items].repeat_interleave(S, 0)
        noisy = x.repeat_interleave(S, 0) + noise * rms_in.reshape(-1, 1, 1, 1)
        if field is None:
            score = lambda imgs, n: critic(tiles(imgs, patch)).reshape(n, -1).mean(1)  # noqa: E731
        else:
            keep = tiles(field[items].to(x.dtype), patch).flatten(1).amin(1).reshape(B, -1)  # tiles wholly inside
            # an image without such a tile (smaller than the patch) is scored whole: outside its field the
            # conditions, the samples and the noise baseline all hold the same (air) values
            keep = torch.where(keep.sum(1, keepdim=True) > 0, keep, torch.ones_like(keep))

            def score(imgs: Tensor, n: int) -> Tensor:
                k = keep.repeat_interleave(n // B, 0)
                return (critic(tiles(imgs, patch)).reshape(n, -1) * k).sum(1) / k.sum(1)

        out["critic_real"] = score(x, B)
        out["critic_samples"] = score(flat, B * S).reshape(B, S).mean(1)
        out["critic_noise"] = score(noisy, B * S).reshape(B, S).mean(1)
        out["critic_gap"] = out["critic_real"] - out["critic_samples"]
    return {k: v.detach().cpu() for k, v in out.items()}


def train_generator(
    model: "nn.Module | Network | NaturalTarget",
    images: Tensor | None,
    out: PathLike,
    steps: int,
    config: NaturalConfig | None = None,
    target_info: Mapping[str, Any] | None = None,
    checkpoint_every: int = 200,
    log_every: int = 10,
    progress: bool = True,
    weights: Tensor | None = None,
    vgg_weights: PathLike | None = None,
) -> NaturalInvarianceTrainer:
    """Train (or resume) a generator in folder ``out`` (``generator.pt``, ``train_log.jsonl``) for ``steps`` steps."""
    out = Path(out)
    trainer = NaturalInvarianceTrainer(model, images, config, checkpoint=out / "generator.pt",
                                       target_info=target_info, weights=weights, vgg_weights=vgg_weights)
    trainer.train(steps, checkpoint_every=checkpoint_every, log_every=log_every, progress=progress)
    return trainer
