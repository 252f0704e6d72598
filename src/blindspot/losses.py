"""Loss terms shared by training code and attacks (the lowest layer, beside :mod:`blindspot.metrics`).

* :func:`gradient_penalty` — the WGAN-GP critic penalty, used by the WGAN-VGG denoiser training
  (:mod:`blindspot.training.ct`) and by the critic of natural invariances (:mod:`blindspot.attacks.natural`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor, eps: Tensor) -> Tensor:
    """WGAN-GP penalty ``E[(‖∇C(x̂)‖₂ − 1)²]`` at the interpolates ``x̂ = ε·real + (1 − ε)·fake``.

    Args:
        critic: maps images ``(B, C, H, W)`` to scores ``(B,)`` (or any shape whose sum is the batch's score).
        real, fake: images ``(B, C, H, W)`` (``fake`` detached or not: only ``x̂`` is differentiated).
        eps: interpolation weights in ``[0, 1]``, ``(B, 1, 1, 1)`` (drawn by the caller from its own generator,
            so that training stays reproducible).

    Returns:
        The scalar penalty, differentiable with respect to the critic's parameters (``create_graph=True``).
    """
    mix = (eps * real + (1.0 - eps) * fake).requires_grad_(True)
    score = critic(mix)
    (grad,) = torch.autograd.grad(score.sum(), mix, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1.0).square().mean()
