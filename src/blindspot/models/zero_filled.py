"""The zero-filled baseline: the reconstruction *is* the under-sampled input, so every table has a floor."""

from __future__ import annotations

from torch import Tensor, nn

from blindspot.models.registry import register_model


@register_model("zero-filled", modality="mri")
class ZeroFilled(nn.Module):
    """Identity on the normalised zero-filled input: ``(B, C, H, W)`` → the same tensor.

    It has no parameters (an empty ``state_dict``), needs no training and no checkpoint file; the evaluation adds it
    as the floor of every table.
    """

    uses_mask = False

    def forward(self, x: Tensor) -> Tensor:
        return x
