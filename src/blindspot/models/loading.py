"""The one model loader: a ``--model`` value → a network ready for attacks, with what is known about it.

A model is named by

* a checkpoint file (blindspot's format, or a bare state dict with ``architecture``; its ``hparams`` are read off the
  weights where the architecture allows, :func:`blindspot.models.checkpoint.infer_hparams`, and given ones win);
* a bundled network by name: ``blindspot/weights/<name>.pt``, else ``ct_<name>.pt`` / ``mri_<name>.pt``
  (``cnn10``, ``unet`` → ``mri_unet.pt``, ``mri_unet_robust``);
* a registered architecture without weights (baselines such as ``zero-filled``, the ``gaussian-ri`` validation
  model, or an untrained network).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blindspot.errors import BlindspotError, PathLike
from blindspot.models.adapters import Network
from blindspot.models.checkpoint import check_network_size, load_checkpoint
from blindspot.models.registry import build_model, model_modality, model_names

#: Labels of architectures in tables.
DISPLAY_NAMES = {"zero-filled": "Zero-filled", "unet": "U-Net", "irim": "I-RIM", "varnet": "E2E-VarNet",
                 "cnn10": "CNN-10", "redcnn": "RED-CNN", "wganvgg": "WGAN-VGG", "gaussian-ri": "Gaussian+RI"}


@dataclass
class LoadedModel:
    """A network with what its checkpoint says about it.

    Attributes:
        model: the ``nn.Module`` on its device, in eval mode.
        name: its label in records and tables.
        modality: ``"mri"`` or ``"ct"``.
        architecture: the registry name.
        source: the checkpoint path, ``"registry"`` for a weight-free model, or ``"baseline"``.
        physics, normalization: the checkpoint's fields (empty when unknown).
        hparams: the constructor arguments.
    """

    model: nn.Module
    name: str
    modality: str
    architecture: str
    source: str
    physics: dict[str, Any] = field(default_factory=dict)
    normalization: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def network(self) -> Network:
        """The model in its calling convention, named and with its modality (checked against acquisitions)."""
        return Network(self.model, name=self.name, modality=self.modality)


def weights_dir() -> Path:
    """The folder of the bundled weights inside the installed package."""
    return Path(str(resources.files("blindspot") / "weights"))


def bundled_checkpoint(name: str) -> Path | None:
    """The bundled weights for a name (see the module docs), or ``None``."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return None
    folder = weights_dir()
    for candidate in (f"{name}.pt", f"ct_{name}.pt", f"mri_{name}.pt"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _label(path: Path) -> str:
    generic = path.stem in ("best", "last", "model", "checkpoint")  # name it after its run folder
    return path.parent.name if generic and path.parent.name else path.stem


def _for_inference(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` on ``device`` in eval mode; with channels-last weights on the CPU where its class says
    ``channels_last_on_cpu`` (the CT denoisers: their forward pass 1.3–1.8× faster, ``benchmarks/cpu_layout.py``;
    the U-Net gains nothing). The layout changes which convolution kernels run, so outputs differ in the last bits
    from a contiguous copy of the same network."""
    model = model.to(device).eval()
    if torch.device(device).type == "cpu" and getattr(type(model), "channels_last_on_cpu", False):
        model = model.to(memory_format=torch.channels_last)
    return model


def load_model(
    spec: PathLike,
    device: torch.device | str = "cpu",
    architecture: str | None = None,
    hparams: dict[str, Any] | None = None,
    name: str | None = None,
    modality: str | None = None,
    warn: bool = True,
) -> LoadedModel:
    """Resolve a model (see the module docs) onto ``device``, in eval mode.

    Args:
        spec: checkpoint path, bundled name or registered architecture.
        architecture, hparams: for a bare state dict (e.g. a fastMRI U-Net or VarNet); hyper-parameters that are
            not given are inferred from the weights' shapes where the architecture allows (U-Net, VarNet).
        name: the label (default: the checkpoint's run folder or file stem; the name for a registered model).
        modality: overrides what the checkpoint's physics or the registry say.
        warn: print a note to stderr when a model with parameters has no weights.
    """
    text = str(spec)
    if not text:
        raise BlindspotError(None, "no model given")
    path = Path(text)
    if path.exists() and not path.is_file():
        raise BlindspotError(path, "is a directory, expected a checkpoint file")
    ck_path = path if path.is_file() else bundled_checkpoint(text)
    if ck_path is not None:
        ck = load_checkpoint(ck_path, map_location=device, architecture=architecture, hparams=hparams)
        mod = modality or (ck.physics or {}).get("modality") or model_modality(ck.architecture) or "mri"
        label = name or (_label(ck_path) if ck_path == path else text)
        return LoadedModel(_for_inference(ck.model, device), label, mod, ck.architecture, str(ck_path),
                           dict(ck.physics or {}), dict(ck.normalization or {}), dict(ck.hparams))
    if text in model_names():
        check_network_size(text, dict(hparams or {}))
        model = _for_inference(build_model(text, **dict(hparams or {})), device)
        if warn and any(True for _ in model.parameters()):
            print(f"blindspot: note: {text!r} has no weights here (an untrained network)", file=sys.stderr)
        mod = modality or model_modality(text) or "mri"
        return LoadedModel(model, name or text, mod, text, "registry", hparams=dict(hparams or {}))
    raise BlindspotError(text, f"neither a checkpoint file nor a known model ({', '.join(model_names())})")
