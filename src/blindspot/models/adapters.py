"""Network adapters: every network is called through one of three conventions, so attacks work on any ``nn.Module``.

=============  ======================================================================================================
convention     call and units
=============  ======================================================================================================
``image``      ``model(x)``: the normalised image ``x`` ``(B, 1, h, w)`` → normalised image (U-Net, CT denoisers)
``image+mask`` ``model(x, mask)``: also the column mask ``(B, 1, 1, W)`` (I-RIM's data consistency; the mask is
               mapped onto the image's ``w`` columns by spatial frequency when the acquisition crops)
``kspace``     ``model(masked_kspace, mask)``: fastMRI VarNet's convention — masked multi-coil k-space as real views
               ``(B, C, H, W, 2)`` and a boolean mask ``(B, 1, 1, W, 1)`` → image in the data's units ``(B, H, W)``
               (or ``(B, 1, H, W)``), centre-cropped to the acquisition's crop and normalised here like the others
=============  ======================================================================================================

:func:`as_network` picks the convention from the module (``network_input`` attribute ``"image"``, ``"image+mask"`` or
``"kspace"``; the older ``uses_mask = True`` means ``image+mask``) unless it is given, so a user's own module plugs in
without registering an architecture::

    net = as_network(my_varnet, convention="kspace")
    result = RandomSearch()(net, batch, acquisition)

Every adapter maps (acquisition, measurement, normalised input, statistics) → normalised output ``(B, 1, h, w)``.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
from torch import Tensor, nn

from blindspot.errors import BlindspotError
from blindspot.physics.acquisition import Acquisition, Measurement
from blindspot.physics.mri import NormStats, center_crop, resample_mask

CONVENTIONS: tuple[str, ...] = ("image", "image+mask", "kspace")


def network_convention(model: nn.Module) -> str:
    """The calling convention a module declares (looks through DDP wrappers); ``image`` when it declares none."""
    inner = getattr(model, "module", model)
    declared = getattr(inner, "network_input", None)
    if isinstance(declared, str):
        if declared not in CONVENTIONS:
            raise BlindspotError(type(inner).__name__, f"declares network_input {declared!r}; choose from "
                                                       f"{', '.join(CONVENTIONS)}")
        return declared
    return "image+mask" if getattr(inner, "uses_mask", False) else "image"


def reconstruct(model: nn.Module, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Run an image-domain MRI network on normalised input ``x`` ``(B, 1, h, w)`` (with the column mask for
    ``image+mask`` networks): the training loops' shortcut when the batch already holds the normalised input."""
    conv = network_convention(model)
    if conv == "kspace":
        raise BlindspotError(type(model).__name__, "takes k-space; call it through a Network and an acquisition")
    if conv == "image+mask":
        if mask is None:
            raise BlindspotError(type(model).__name__, "needs the sampling mask")
        return model(x, mask)
    return model(x)


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of the model's first parameter or buffer (``default`` for a parameter-free model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device(default)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model in eval mode (dropout, batch-norm statistics fixed), restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Network:
    """A module with its calling convention, its name and (where known) its modality.

    Args:
        module: any ``nn.Module``.
        convention: one of :data:`CONVENTIONS` (``None``: what the module declares, see :func:`network_convention`).
        name: label for errors, records and tables.
        modality: ``"mri"`` / ``"ct"`` when known (a checkpoint's physics); checked against the acquisition.
    """

    def __init__(self, module: nn.Module, convention: str | None = None, name: str | None = None,
                 modality: str | None = None) -> None:
        if isinstance(module, Network):
            raise TypeError("already a Network")
        self.module = module
        self.convention = network_convention(module) if convention is None else convention
        if self.convention not in CONVENTIONS:
            raise BlindspotError(name, f"unknown network convention {self.convention!r}; choose from "
                                       f"{', '.join(CONVENTIONS)}")
        self.name = name or type(module).__name__
        self.modality = modality
        #: a k-space network that needs several coils (declared by the module, e.g. VarNet's sensitivity model)
        self.multicoil_only = bool(getattr(getattr(module, "module", module), "multicoil_only", False))
        if self.convention != "image" and modality == "ct":
            raise BlindspotError(self.name, f"a CT network cannot take the {self.convention} convention")

    def __repr__(self) -> str:
        return f"Network({self.name!r}, convention={self.convention!r}, modality={self.modality!r})"

    @property
    def device(self) -> torch.device:
        return model_device(self.module)

    @property
    def needs_measurements(self) -> bool:
        """Whether the network reads the measurements themselves (k-space) rather than the normalised image."""
        return self.convention == "kspace"

    def check(self, acquisition: Acquisition) -> None:
        """A one-line error when this network cannot take ``acquisition``'s input."""
        if self.modality and self.modality != acquisition.modality:
            raise BlindspotError(self.name, f"is a {self.modality.upper()} network; it cannot be given a "
                                            f"{acquisition.modality.upper()} acquisition")
        if self.convention != "image" and acquisition.modality != "mri":
            raise BlindspotError(self.name, f"takes the {self.convention} convention, which needs an MRI "
                                            f"acquisition, not {acquisition.modality.upper()}")
        if self.convention == "kspace" and getattr(acquisition, "coils", 1) < 2 and self.multicoil_only:
            raise BlindspotError(self.name, "takes multi-coil k-space; this acquisition is single-coil")

    def __call__(self, acquisition: Acquisition, measurement: Measurement, x: Tensor, stats: NormStats) -> Tensor:
        """The normalised output ``(B, 1, h, w)`` for normalised input ``x`` ``(B, 1, h, w)`` (image conventions) or
        the measurement's k-space (``kspace``), whose output is normalised with ``stats``."""
        if self.convention == "image":
            return self.module(x)
        if self.convention == "image+mask":
            return self.module(x, resample_mask(measurement.mask, x.shape[-1], x.shape[-2]))
        low = getattr(acquisition, "num_low_frequencies", None)  # the mask function's centre lines, when known
        if low is not None and low.numel() not in (1, len(measurement)):
            low = None  # not this batch's (detected from the mask instead)
        return kspace_forward(self.module, measurement.kspace, measurement.mask, tuple(x.shape[-2:]), stats,
                              self.name, num_low_frequencies=low)


def kspace_forward(module: nn.Module, kspace: Tensor, mask: Tensor, shape: tuple[int, int], stats: NormStats,
                   name: str | None = None, num_low_frequencies: Tensor | None = None) -> Tensor:
    """Call a ``kspace``-convention network (fastMRI's VarNet) and bring its output to the others' units.

    Args:
        module: the network: ``module(view_as_real(kspace), mask.bool().unsqueeze(-1))`` → image ``(B, H, W)`` (or
            ``(B, 1, H, W)``) in the data's units.
        kspace: masked multi-coil k-space, complex ``(B, C, H, W)``.
        mask: column masks ``(B, 1, 1, W)`` or 2-D masks ``(B, 1, H, W)`` (0/1).
        shape: ``(h, w)`` of the other networks' images (the crop); the output is centre-cropped to it.
        stats: the normalisation applied to the output (unclamped).
        name: the network's name for errors.
        num_low_frequencies: int64 ``(B,)`` or ``(1,)``, the mask function's fully sampled centre lines (fastMRI's
            ``num_low_frequencies``), passed on as the module's third argument when its ``forward`` takes one;
            ``None``: not passed (the module detects them from the mask).
    Returns:
        The normalised output ``(B, 1, h, w)``.
    """
    args = (torch.view_as_real(kspace), mask.bool().unsqueeze(-1))
    if num_low_frequencies is not None and takes_third_argument(module):
        args += (num_low_frequencies,)
    out = module(*args)
    out = out.unsqueeze(1) if out.ndim == 3 else out
    if out.ndim != 4 or out.shape[1] != 1 or out.shape[-2] < shape[0] or out.shape[-1] < shape[1]:
        raise BlindspotError(name or type(module).__name__, f"returned {tuple(out.shape)}; a k-space network must "
                                                            f"return (B, H, W) images at least {shape[0]}x{shape[1]}")
    out = center_crop(out, shape) if tuple(out.shape[-2:]) != tuple(shape) else out
    return stats.apply(out, clamp=False)


def takes_third_argument(module: nn.Module) -> bool:
    """Whether ``module.forward`` accepts a third positional argument (fastMRI VarNet's ``num_low_frequencies``)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def check_finite_output(out: Tensor, name: str | None, what: str = "its input") -> None:
    """Raise :class:`BlindspotError` naming the network ``name`` when ``out`` holds NaN or Inf.

    One reduction and one device sync: call it once per batch (e.g. on the clean outputs and on the final ones of
    an attack), never inside an optimisation loop.
    """
    if not bool(torch.isfinite(out).all()):
        raise BlindspotError(name, f"the network's output on {what} contains NaN or Inf (damaged weights, or an input "
                                   "far outside what it was trained on)")


def as_network(model: "nn.Module | Network", convention: str | None = None, name: str | None = None,
               modality: str | None = None) -> Network:
    """``model`` as a :class:`Network` (a Network is returned as it is)."""
    if isinstance(model, Network):
        return model
    return Network(model, convention, name, modality)
