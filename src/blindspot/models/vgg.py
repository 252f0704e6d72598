"""VGG16 convolutional features with torchvision's layer layout, loading torchvision-format weight files offline.

``VGG16Features.features`` is an ``nn.Sequential`` numbered exactly like ``torchvision.models.vgg16().features``
(convolutions at indices 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28; ReLUs after each; max-pooling at 4, 9, 16,
23, 30), so the parameter names are ``features.{i}.weight`` / ``features.{i}.bias`` and a torchvision state dict
(e.g. ``vgg16-397923af.pth``, the ImageNet weights) loads directly; its ``classifier.*`` entries are ignored.

Nothing is ever downloaded. :func:`load_vgg16` takes a file, or finds torchvision's file in the standard torch hub
cache (``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``, by default ``~/.cache/torch/hub/…``); asking for VGG
weights that are not there is a :class:`~blindspot.errors.BlindspotError`. A file whose SHA-256 starts with the
hash in torchvision's file name is reported as the ImageNet weights; any other file is reported as "not ImageNet",
so a perceptual loss computed with it is never passed off as the ImageNet one.

:func:`write_seeded_vgg16` writes a randomly initialised (torchvision's initialisation, seeded) VGG16 in the same
format: for tests and for offline runs that need *some* fixed feature extractor, always labelled as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import file_sha256

#: torchvision's ImageNet VGG16 weights file name (its hash prefix is that of the file's SHA-256).
TORCHVISION_VGG16_FILE = "vgg16-397923af.pth"
TORCHVISION_VGG16_SHA256_PREFIX = "397923af"
#: VGG16 configuration: channels per conv, "M" for max-pooling (torchvision's "D").
_CFG: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _layer_names() -> list[str]:
    names, block, conv = [], 1, 1
    for v in _CFG:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return names


#: Layer names in ``features`` order: ``conv1_1, relu1_1, conv1_2, relu1_2, pool1, conv2_1, …, pool5``.
LAYER_NAMES: tuple[str, ...] = tuple(_layer_names())
LAYER_INDEX: dict[str, int] = {n: i for i, n in enumerate(LAYER_NAMES)}


class VGG16Features(nn.Module):
    """The convolutional part of VGG16 (torchvision layout); returns the activations of named layers.

    ``forward(x, layers)``: ``x`` is ``(B, 3, H, W)`` ImageNet-normalised RGB (see :func:`imagenet_input`); returns
    a list of feature maps, one per name in ``layers`` (default ``("relu5_3",)``), computing only as deep as needed.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """torchvision's initialisation: Kaiming-normal (fan-out, ReLU) conv weights, zero biases."""
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                std = (2.0 / fan_out) ** 0.5
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
                    m.bias.zero_()

    def forward(self, x: Tensor, layers: Sequence[str] = ("relu5_3",)) -> list[Tensor]:
        unknown = [n for n in layers if n not in LAYER_INDEX]
        if unknown:
            raise BlindspotError(None, f"unknown VGG16 layer(s) {unknown}; known: {', '.join(LAYER_NAMES)}")
        wanted = {LAYER_INDEX[n]: n for n in layers}
        last = max(wanted)
        out: dict[str, Tensor] = {}
        for i, module in enumerate(self.features):
            x = module(x)
            if i in wanted:
                out[wanted[i]] = x
            if i == last:
                break
        return [out[n] for n in layers]


def imagenet_input(gray01: Tensor) -> Tensor:
    """Grey images in [0, 1] ``(B, 1, H, W)`` → ImageNet-normalised RGB ``(B, 3, H, W)`` (the channel repeated)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=gray01.dtype, device=gray01.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=gray01.dtype, device=gray01.device).view(1, 3, 1, 1)
    return (gray01.expand(-1, 3, -1, -1) - mean) / std


@dataclass
class VGGWeightsInfo:
    """Where a VGG16's weights came from: the file, its SHA-256 and whether it is torchvision's ImageNet file."""

    path: str
    sha256: str
    imagenet: bool

    def as_dict(self) -> dict[str, object]:
        return {"vgg_weights": Path(self.path).name, "vgg_sha256": self.sha256, "vgg_imagenet": self.imagenet}


def default_vgg16_path() -> Path:
    """torchvision's cache location of the ImageNet VGG16 weights (may not exist)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_VGG16_FILE


def vgg16_state_dict(state: dict, source: PathLike | None = None) -> dict[str, Tensor]:
    """The ``features.*`` entries of a torchvision-format VGG16 state dict (also accepted: keys without the
    ``features.`` prefix, or the dict under ``"state_dict"``), checked against the architecture."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BlindspotError(source, f"holds a {type(state).__name__}, expected a VGG16 state dict")
    expected = VGG16Features().state_dict()
    if not any(k.startswith("features.") for k in state) and any(k in state for k in ("0.weight", "0.bias")):
        state = {f"features.{k}": v for k, v in state.items()}
    feats = {k: v for k, v in state.items() if k.startswith("features.")}
    missing = sorted(set(expected) - set(feats), key=lambda k: (len(k), k))
    wrong = sorted(k for k in set(expected) & set(feats)
                   if not isinstance(feats[k], Tensor) or tuple(feats[k].shape) != tuple(expected[k].shape))
    extra = sorted(set(feats) - set(expected))
    if missing or wrong or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}" + (" …" if len(missing) > 4 else ""))
        if wrong:
            parts.append(f"wrong shapes {', '.join(wrong[:4])}" + (" …" if len(wrong) > 4 else ""))
        if extra:
            parts.append(f"unexpected {', '.join(extra[:4])}" + (" …" if len(extra) > 4 else ""))
        raise BlindspotError(source, "not a torchvision VGG16 state dict (" + "; ".join(parts) + ")")
    return feats


def load_vgg16(path: PathLike | None = None, device: torch.device | str = "cpu") -> tuple[VGG16Features, VGGWeightsInfo]:
    """A frozen, eval-mode :class:`VGG16Features` with weights from ``path`` (or torchvision's cache file).

    Raises:
        BlindspotError: no file given and none in the cache (nothing is downloaded), or the file is not a loadable
        torchvision VGG16 state dict.
    """
    import pickle
    import zipfile

    if path is None:
        path = default_vgg16_path()
        if not path.is_file():
            raise BlindspotError(
                None,
                "a perceptual (VGG) loss needs VGG16 weights: pass --vgg-weights FILE (torchvision's ImageNet file "
                f"{TORCHVISION_VGG16_FILE}) or put that file at {path}; nothing is downloaded",
            )
    path = Path(path)
    if not path.is_file():
        raise BlindspotError(path, "VGG16 weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BlindspotError(path, f"not a loadable VGG16 weights file ({first[:160]})") from None
    feats = vgg16_state_dict(state, path)
    model = VGG16Features()
    model.load_state_dict(feats, strict=True)
    model.eval().requires_grad_(False).to(device)
    sha = file_sha256(path)
    return model, VGGWeightsInfo(str(path), sha, sha.startswith(TORCHVISION_VGG16_SHA256_PREFIX))


def load_vgg16_features(path: PathLike | None = None, device: torch.device | str = "cpu") -> nn.Sequential:
    """Just the frozen ``features`` ``nn.Sequential`` (torchvision's ``vgg16().features`` layout) of
    :func:`load_vgg16` — same file rules and errors."""
    return load_vgg16(path, device)[0].features


def write_seeded_vgg16(path: PathLike, seed: int = 0) -> Path:
    """Write a seeded, randomly initialised VGG16 (features only, torchvision layout). NOT ImageNet weights: for
    tests and for offline runs that need a fixed feature extractor; :func:`load_vgg16` reports it as not ImageNet."""
    from blindspot.fileio import atomic_write_bytes
    import io

    model = VGG16Features()
    model.reset_parameters(torch.Generator().manual_seed(int(seed)))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return atomic_write_bytes(path, buf.getvalue())


class PerceptualLoss(nn.Module):
    """Mean squared difference of VGG16 features of two grey images in [0, 1].

    Args:
        vgg: a (frozen) :class:`VGG16Features`.
        layers: feature layers compared (``("relu5_3",)``; WGAN-VGG compares one deep layer).

    ``loss(pred01, target01)`` with ``(B, 1, H, W)`` images in [0, 1] → scalar: the mean over layers of the mean
    squared feature difference (``‖φ(a) − φ(b)‖² / (C·H·W)``, averaged over the batch).
    """

    def __init__(self, vgg: VGG16Features, layers: Iterable[str] = ("relu5_3",)) -> None:
        super().__init__()
        self.vgg = vgg
        self.layers = tuple(layers)

    def forward(self, pred01: Tensor, target01: Tensor) -> Tensor:
        both = imagenet_input(torch.cat([pred01, target01], dim=0))
        feats = self.vgg(both, self.layers)
        n = pred01.shape[0]
        return sum(F.mse_loss(f[:n], f[n:]) for f in feats) / len(feats)
