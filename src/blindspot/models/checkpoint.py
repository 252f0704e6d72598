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

A bare state dict (e.g. one trained with fastMRI's ``Unet``) also loads when the caller names the architecture.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import atomic_write_bytes
from blindspot.models.registry import build_model

FORMAT = "blindspot-checkpoint"
VERSION = 1


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
        raise BlindspotError(path, f"weights do not fit architecture {architecture!r} — " + "; ".join(parts))


def load_checkpoint(
    path: PathLike,
    map_location: str | torch.device = "cpu",
    architecture: str | None = None,
    hparams: dict[str, Any] | None = None,
) -> Checkpoint:
    """Load a blindspot checkpoint, or a bare state dict when ``architecture`` (and ``hparams``) are given.

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
        arch, hp, state_dict = architecture, dict(hparams or {}), obj.get("state_dict", obj)
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
