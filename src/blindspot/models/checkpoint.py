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
import math
import pickle
import warnings
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
    """``torch.load(path, weights_only=True)`` with every failure turned into a one-line :class:`BlindspotError`.

    The message never repeats PyTorch's advice to retry with ``weights_only=False``: for a file that holds Python
    objects that would run its code.
    """
    path = Path(path)
    if path.is_dir():
        raise BlindspotError(path, "is a directory, expected a checkpoint file")
    if not path.exists():
        raise BlindspotError(path, "checkpoint file not found")
    if not path.is_file():
        raise BlindspotError(path, "is not a regular file, expected a checkpoint file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": stderr stays one line; errors say it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Unsupported global" in text or "not an allowed global" in text:
            what = next((w.strip() for w in text.splitlines() if "Unsupported global" in w), "")
            what = what.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in what else "a Python object"
            raise BlindspotError(path, f"holds {what} beyond tensors and plain containers; blindspot loads weights "
                                 "only, since such objects could run code") from None
        raise BlindspotError(path, f"not a loadable checkpoint ({checkpoint_error_text(err)})") from None
    except Exception as err:  # torch.load raises many types (zip, pickle, struct, unicode, key errors) on bad files
        raise BlindspotError(path, f"not a loadable checkpoint ({checkpoint_error_text(err)})") from None
    if not isinstance(obj, dict):
        raise BlindspotError(path, f"checkpoint holds a {type(obj).__name__}, expected a dict")
    return obj


def checkpoint_error_text(err: BaseException) -> str:
    """What went wrong loading a file (at most 200 characters), without PyTorch's advice to use ``weights_only``.

    For the weights-only unpickler's errors that is the line after ``WeightsUnpickler error:`` (e.g. ``Unsupported
    operand 149``: a corrupt file, or a pickle that is no PyTorch checkpoint); otherwise the first line.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return f"corrupt, or not a PyTorch file: {lines[i + 1]}"[:200]
    first = lines[0]
    if "weights_only" in first or "weights only" in first.lower():
        first = type(err).__name__
    return first[:200]


#: The largest network a checkpoint may ask for (parameters; 2³⁰ float32 weights are 4 GiB). Real ones hold < 10⁸.
MAX_PARAMETERS = 2**30
#: The largest integer hyper-parameter accepted (channel counts, layers, cascades); real ones are ≤ a few hundred.
MAX_HPARAM_INT = 4096


def _check_hparam_value(path: PathLike | None, key: str, value: Any) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_hparam_value(path, key, v)
        return
    if isinstance(value, int):
        if abs(value) > MAX_HPARAM_INT:
            raise BlindspotError(path, f"hyper-parameter {key}={value} is beyond the limit of {MAX_HPARAM_INT}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise BlindspotError(path, f"hyper-parameter {key}={value} is not finite")


def check_network_size(architecture: str, hparams: Mapping[str, Any], path: PathLike | None = None) -> int:
    """The parameter count of ``build_model(architecture, **hparams)``, found without allocating its weights.

    The network is built on PyTorch's ``meta`` device (shapes only). Raises :class:`BlindspotError` naming ``path``
    when an integer hyper-parameter exceeds :data:`MAX_HPARAM_INT`, a float is not finite, the network cannot be
    built, or it would have more than :data:`MAX_PARAMETERS` parameters.
    """
    for key, value in hparams.items():
        _check_hparam_value(path, str(key), value)
    try:
        with torch.device("meta"):
            model = build_model(architecture, **hparams)
    except BlindspotError as err:
        raise BlindspotError(path, err.problem) from None
    except Exception as err:  # e.g. overflowing channel counts, negative sizes, bad types in a constructor
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BlindspotError(path, f"hyper-parameters {dict(hparams)} do not build a {architecture!r} network "
                             f"({type(err).__name__}: {text[:150]})") from None
    count = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    if count > MAX_PARAMETERS:
        raise BlindspotError(path, f"hyper-parameters ask for a {architecture!r} network of {count:.3g} parameters, "
                             f"beyond the limit of {MAX_PARAMETERS:.3g}")
    return int(count)


def check_finite_weights(path: PathLike | None, state_dict: Mapping[str, Any]) -> None:
    """Raise :class:`BlindspotError` naming ``path`` when a floating-point tensor of ``state_dict`` holds NaN or Inf
    (such a network's outputs are meaningless, e.g. an attack rate of 0 %)."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise BlindspotError(path, f"weights contain NaN or Inf in {', '.join(bad[:3])}{more}; the checkpoint is "
                             "damaged or its training diverged")


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
        if not isinstance(arch, str) or not isinstance(obj.get("hparams") or {}, dict):
            raise BlindspotError(path, "checkpoint's 'architecture' or 'hparams' field is malformed")
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
    check_finite_weights(path, state_dict)
    check_network_size(arch, hp, path)
    try:
        model = build_model(arch, **hp)
    except BlindspotError as err:
        raise BlindspotError(path, err.problem) from None
    _check_keys(path, model, state_dict, arch)
    model.load_state_dict(state_dict, strict=True)
    model.to(map_location)
    return Checkpoint(model, arch, hp, data=data, path=str(path), **meta)
