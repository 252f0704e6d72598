"""Model registry: architecture name → constructor.

Model modules register their classes with ``@register_model("name")``; :func:`build_model` builds one from its name
and hyper-parameters (the same pair a checkpoint stores). Modules listed in ``_MODEL_MODULES`` are imported on first
use so the registry is complete without importing every model up front.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from torch import nn

from blindspot.errors import BlindspotError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_MODALITY: dict[str, str] = {}
_MODEL_MODULES: tuple[str, ...] = (
    # MRI reconstruction
    "blindspot.models.unet",
    "blindspot.models.irim",
    "blindspot.models.varnet",
    "blindspot.models.zero_filled",
    # CT denoising
    "blindspot.models.cnn10",
    "blindspot.models.redcnn",
    "blindspot.models.wganvgg",
    "blindspot.models.gaussian_ri",
)
_loaded = False


def register_model(name: str, modality: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class decorator: make ``build_model(name, **hparams)`` construct this class, a network for ``modality``
    (``"mri"`` reconstruction or ``"ct"`` denoising)."""

    def wrap(cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = cls
        _MODALITY[name] = modality
        return cls

    return wrap


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    for module in _MODEL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real import error inside an existing module
                raise
    _loaded = True


def model_names() -> list[str]:
    """Registered architecture names, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def model_modality(name: str) -> str | None:
    """The modality a registered architecture is made for (``None`` for an unknown name)."""
    _load_builtin()
    return _MODALITY.get(name)


def model_defaults(name: str) -> dict[str, Any] | None:
    """The hyper-parameters a registered architecture's constructor takes, with their defaults (``None`` for a
    parameter without one); ``None`` for an unknown name or a constructor that takes ``**kwargs``."""
    _load_builtin()
    if name not in _REGISTRY:
        return None
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name: None if p.default is p.empty else p.default for p in params if p.kind is not p.VAR_POSITIONAL}


def build_model(name: str, **hparams: Any) -> nn.Module:
    """Construct a registered architecture; unknown names and bad hyper-parameters are :class:`BlindspotError`."""
    _load_builtin()
    if name not in _REGISTRY:
        raise BlindspotError(None, f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**hparams)
    except TypeError as err:
        raise BlindspotError(None, f"bad hyper-parameters for model {name!r}: {err}") from None
