"""How every part of blindspot calls a network, so attacks work on any user's ``torch.nn.Module``.

* MRI reconstruction: ``model(x)`` or, for models whose ``uses_mask`` attribute is true (I-RIM),
  ``model(x, mask)``; ``x`` is the normalised zero-filled input ``(B, 1, h, w)``, ``mask`` the column mask
  ``(B, 1, 1, W)``; the output is the normalised reconstruction ``(B, 1, h, w)``.
* CT denoising: ``model(x)`` with ``x`` the normalised low-dose image ``(B, 1, H, W)``.
"""

from __future__ import annotations

from torch import Tensor, nn


def uses_mask(model: nn.Module) -> bool:
    """Whether ``model`` takes the sampling mask as a second argument (looks through DDP wrappers)."""
    inner = getattr(model, "module", model)
    return bool(getattr(inner, "uses_mask", False))


def reconstruct(model: nn.Module, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Run an MRI reconstruction model on normalised input ``x`` ``(B, 1, h, w)``; see the module docs."""
    if uses_mask(model):
        if mask is None:
            raise ValueError("this model needs the sampling mask")
        return model(x, mask)
    return model(x)
