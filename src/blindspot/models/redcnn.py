"""RED-CNN: residual encoder–decoder CNN (Chen et al., "Low-dose CT with a residual encoder-decoder convolutional
neural network", IEEE TMI 2017).

Five unpadded 5×5 convolutions (each shrinks the image by 4 pixels) and five 5×5 transposed convolutions (each
grows it back), ``chans`` (96) filters each, ReLU activations, and three shortcuts: the input is added to the
last decoder output, the second encoder output to the fourth decoder output, the fourth encoder output to the
second decoder output. The paper ends with a ReLU because its images were scaled to [0, 1]; networks here see
mean/std-normalised images that are negative in air, so the final ReLU is off by default (``final_relu``).

Input ``(B, 1, H, W)`` with ``H, W >= 21``; the output has the same size.
"""

from __future__ import annotations

from torch import Tensor, nn

from blindspot.models.registry import register_model


@register_model("redcnn", modality="ct")
class REDCNN(nn.Module):
    """RED-CNN denoiser: ``(B, in_chans, H, W)`` → ``(B, in_chans, H, W)``.

    Args:
        in_chans: image channels (1 for CT).
        chans: filters per layer (96 in the paper).
        kernel: kernel size of every layer (5 in the paper).
        final_relu: apply ReLU to the output (the paper's [0, 1] images); off for normalised images.
    """

    #: :func:`blindspot.models.loading.load_model` gives it channels-last weights on the CPU (oneDNN's layout for this
    #: plain stack of convolutions: ``benchmarks/cpu_layout.py``).
    channels_last_on_cpu = True

    def __init__(self, in_chans: int = 1, chans: int = 96, kernel: int = 5, final_relu: bool = False) -> None:
        super().__init__()
        self.kernel = int(kernel)
        self.encoder = nn.ModuleList(
            [nn.Conv2d(in_chans if i == 0 else chans, chans, self.kernel) for i in range(5)]
        )
        self.decoder = nn.ModuleList(
            [nn.ConvTranspose2d(chans, in_chans if i == 4 else chans, self.kernel) for i in range(5)]
        )
        self.relu = nn.ReLU()
        self.final_relu = bool(final_relu)

    def forward(self, x: Tensor) -> Tensor:
        min_size = 5 * (self.kernel - 1) + 1
        if min(x.shape[-2:]) < min_size:
            raise ValueError(f"RED-CNN needs images of at least {min_size}x{min_size}, got {tuple(x.shape[-2:])}")
        skip1 = x
        out = self.relu(self.encoder[0](x))
        out = self.relu(self.encoder[1](out))
        skip2 = out
        out = self.relu(self.encoder[2](out))
        out = self.relu(self.encoder[3](out))
        skip3 = out
        out = self.relu(self.encoder[4](out))
        out = self.relu(self.decoder[0](out) + skip3)
        out = self.relu(self.decoder[1](out))
        out = self.relu(self.decoder[2](out) + skip2)
        out = self.relu(self.decoder[3](out))
        out = self.decoder[4](out) + skip1
        return self.relu(out) if self.final_relu else out
