"""WGAN-VGG (Yang et al., "Low-dose CT image denoising using a generative adversarial network with Wasserstein
distance and perceptual loss", IEEE TMI 2018): the generator (the denoiser) and its critic.

* Generator: eight 3×3 convolutions, the first seven with 32 filters and ReLU, the last with one filter. The paper
  ends with a ReLU too because its images were scaled to [0, 1]; here inputs are mean/std-normalised (negative in
  air), so the final ReLU is off by default. Zero padding keeps the image size.
* Critic: six 3×3 convolutions with 64, 64, 128, 128, 256, 256 filters (stride 2 on the second of each pair) and
  LeakyReLU(0.2), then fully connected layers of 1024 and 1 units. The critic scores ``input_size × input_size``
  patches (64 in the paper); it has no sigmoid (a Wasserstein critic).

Training (WGAN-GP with a VGG perceptual loss) lives in :mod:`blindspot.training.ct`.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from blindspot.models.registry import register_model


@register_model("wganvgg", modality="ct")
class WGANVGGGenerator(nn.Module):
    """WGAN-VGG generator: ``(B, in_chans, H, W)`` → ``(B, in_chans, H, W)``.

    Args:
        in_chans: image channels (1 for CT).
        chans: filters of the hidden layers (32 in the paper).
        depth: number of convolutions (8 in the paper).
        final_relu: ReLU on the output (the paper's [0, 1] images); off for normalised images.
    """

    #: :func:`blindspot.models.loading.load_model` gives it channels-last weights on the CPU (oneDNN's layout for this
    #: plain stack of convolutions: ``benchmarks/cpu_layout.py``).
    channels_last_on_cpu = True

    def __init__(self, in_chans: int = 1, chans: int = 32, depth: int = 8, final_relu: bool = False) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"WGAN-VGG generator depth must be >= 2, got {depth}")
        layers: list[nn.Module] = []
        for i in range(depth):
            c_in = in_chans if i == 0 else chans
            c_out = in_chans if i == depth - 1 else chans
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            if i < depth - 1 or final_relu:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class WGANCritic(nn.Module):
    """WGAN-VGG critic: ``(B, in_chans, input_size, input_size)`` → ``(B, 1)`` scores (higher = more real).

    Args:
        in_chans: image channels.
        input_size: patch size it scores (64 in the paper).
        widths: filters of the three conv pairs.
        hidden: units of the first fully connected layer (1024).
    """

    def __init__(self, in_chans: int = 1, input_size: int = 64, widths: tuple[int, int, int] | list[int] = (64, 128, 256),
                 hidden: int = 1024) -> None:
        super().__init__()
        self.input_size = int(input_size)
        layers: list[nn.Module] = []
        c_in, size = in_chans, self.input_size
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
                       nn.Conv2d(w, w, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            c_in, size = w, math.ceil(size / 2)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * size * size, hidden), nn.LeakyReLU(0.2, inplace=True),
                                  nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"the critic scores {self.input_size}x{self.input_size} patches, got {tuple(x.shape[-2:])}")
        return self.head(self.features(x))
