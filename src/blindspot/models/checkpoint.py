"""The one checkpoint format, loaded with ``torch.load(..., weights_only=True)`` so a checkpoint never runs code.

A checkpoint is a plain dict::

    {
      "format": "blindspot-checkpoint", "version": 1,
      "architecture": "unet",              # registry name
      "hparams": {...},                    # constructor keyword arguments
      "state_dict": {...},                 # model weights
      "physics": {...},                    # e.g. {"modality": "mri", "mask_type": "random", "accelerations": [4, 8],
                                           #        "center_fractions": [0.08, 0.04], "crop": [320, 320]}
                                           #   or  {"modality": "ct", "dose": 0.25, ...}
      "normalization": {...},              # e.g. {"kind": "instance", "clamp": 6.0} or {"kind": "fixed", "mean":…}
      "data": "…",                         # description of the training data
      "metrics": {...},                    # validation metrics at save time
      "training": {...},                   # optional: epoch, step, optimizer/scheduler state, RNG state (resume)
    }

A bare state dict (e.g. one trained with fastMRI's ``Unet`` or ``VarNet``) also loads when the caller names the
architecture. Its hyper-parameters are read off the weights' keys and shapes where the architecture allows
(:data:`HPARAM_READERS`: U-Net ``in_chans``, ``out_chans``, ``chans``, ``num_pool_layers``; VarNet
``num_cascades``, ``sens_chans``, ``sens_pools``, ``chans``, ``pools``); hyper-parameters the caller gives win over
the inferred ones. Weights that do not fit are a one-line error listing the mismatched keys (and naming the
architecture they do fit, when one of the readers recognises them).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import atomic_write_bytes
from blindspot.models.registry import build_model
from blindspot.models.unet import unet_hparams
from blindspot.models.varnet import varnet_hparams

FORMAT = "blindspot-checkpoint"
VERSION = 1

#: Architectures whose hyper-parameters can be read off a bare state dict's keys and shapes.
HPARAM_READERS: dict[str, Callable[[Mapping[str, Tensor]], dict[str, Any]]] = {
    "unet": unet_hparams,
    "varnet": varnet_hparams,
}


@dataclass
class Checkpoint:
    """A loaded checkpoint: the built model plus everything stored beside its weights."""

    model: nn.Module
    architecture: str
    hparams: dict[str, Any]
    physics: dict[str, Any] = field(default_factory=dict)
    normalization: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    architecture: str,
    hparams: dict[str, Any],
    *,
    physics: dict[str, Any] | None = None,
    normalization: dict[str, Any] | None = None,
    data: str = "",
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (a crash never leaves a half-written file in place of a good one)."""
    module = model.module if hasattr(model, "module") else model  # unwrap DistributedDataParallel
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": architecture,
        "hparams": dict(hparams),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "physics": dict(physics or {}),
        "normalization": dict(normalization or {}),
        "data": str(data),
        "metrics": dict(metrics or {}),
        "training": dict(training or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def read_checkpoint_dict(path: PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with every failure turned into a one-line :class:`BlindspotError`."""
    path = Path(path)
    if not path.is_file():
        raise BlindspotError(path, "checkpoint file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BlindspotError(path, f"not a loadable checkpoint ({first[:200]})") from None
    if not isinstance(obj, dict):
        raise BlindspotError(path, f"checkpoint holds a {type(obj).__name__}, expected a dict")
    return obj


def infer_hparams(architecture: str, state_dict: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """The hyper-parameters of ``architecture`` read off ``state_dict`` (:data:`HPARAM_READERS`), or ``None`` when the
    architecture has no reader or the keys are not that architecture's."""
    reader = HPARAM_READERS.get(architecture)
    if reader is None:
        return None
    try:
        return reader(state_dict)
    except BlindspotError:
        return None


def _check_keys(path: PathLike, model: nn.Module, state_dict: dict[str, Any], architecture: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(state_dict)
        if hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {show(wrong)}")
        fits = [a for a in HPARAM_READERS if a != architecture and infer_hparams(a, state_dict) is not None]
        hint = f" (the keys are a {fits[0]!r} state dict's: try --arch {fits[0]})" if fits and not wrong else ""
        raise BlindspotError(path, f"weights do not fit architecture {architecture!r} — " + "; ".join(parts) + hint)


def load_checkpoint(
    path: PathLike,
    map_location: str | torch.device = "cpu",
    architecture: str | None = None,
    hparams: dict[str, Any] | None = None,
) -> Checkpoint:
    """Load a blindspot checkpoint, or a bare state dict when ``architecture`` is given.

    Args:
        path: the file.
        map_location: where the weights go.
        architecture: the registry name; required for a bare state dict, checked against a blindspot checkpoint's.
        hparams: constructor arguments of a bare state dict; where not given they are read off the weights
            (:func:`infer_hparams`), and given ones win over inferred ones.
    Raises :class:`BlindspotError` naming the file for anything unusable, including weights of another
    architecture (the message lists the mismatched keys).
    """
    obj = read_checkpoint_dict(path, map_location)
    if obj.get("format") == FORMAT:
        arch = obj.get("architecture")
        if architecture is not None and architecture != arch:
            raise BlindspotError(path, f"checkpoint is a {arch!r} model, not {architecture!r}")
        hp = dict(obj.get("hparams") or {})
        state_dict = obj.get("state_dict")
        meta = {k: obj.get(k) or {} for k in ("physics", "normalization", "metrics", "training")}
        data = str(obj.get("data") or "")
    else:
        if architecture is None:
            raise BlindspotError(path, "a bare state dict: name its architecture (e.g. --arch unet)")
        arch, state_dict = architecture, obj.get("state_dict", obj)
        inferred = infer_hparams(arch, state_dict) if isinstance(state_dict, dict) else None
        hp = {**(inferred or {}), **dict(hparams or {})}
        meta, data = {k: {} for k in ("physics", "normalization", "metrics", "training")}, ""
    if not isinstance(state_dict, dict):
        raise BlindspotError(path, "checkpoint has no state dict")
    try:
        model = build_model(arch, **hp)
    except BlindspotError as err:
        raise BlindspotError(path, err.problem) from None
    _check_keys(path, model, state_dict, arch)
    model.load_state_dict(state_dict, strict=True)
    model.to(map_location)
    return Checkpoint(model, arch, hp, data=data, path=str(path), **meta)
