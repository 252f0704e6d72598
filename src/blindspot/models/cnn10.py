"""CNN-10 (Chen et al., "Low-dose CT denoising with convolutional neural network", ISBI 2017).

Three convolutions — 9×9 with 64 filters, 3×3 with 32 filters, 5×5 with 1 filter — with ReLU after the first two,
the super-resolution-CNN design applied to denoising; trained with an L2 loss. The original worked on unpadded
patches; here every convolution is zero-padded ("same"), so the output has the input's size and any image size works.

Input and output are normalised CT images ``(B, 1, H, W)`` (see :class:`blindspot.physics.ct.HUNormalization`).
"""

from __future__ import annotations

from torch import Tensor, nn

from blindspot.models.registry import register_model


@register_model("cnn10", modality="ct")
class CNN10(nn.Module):
    """CNN-10 denoiser: ``(B, in_chans, H, W)`` → ``(B, out_chans, H, W)``.

    Args:
        in_chans, out_chans: image channels (1 for CT).
        chans1, chans2: filters of the first and second convolutions (64 and 32 in the paper).
        kernels: kernel sizes of the three convolutions (9, 3, 5 in the paper).
    """

    #: :func:`blindspot.models.loading.load_model` gives it channels-last weights on the CPU (oneDNN's layout for this
    #: plain stack of convolutions: ``benchmarks/cpu_layout.py``).
    channels_last_on_cpu = True

    def __init__(self, in_chans: int = 1, out_chans: int = 1, chans1: int = 64, chans2: int = 32,
                 kernels: tuple[int, int, int] | list[int] = (9, 3, 5)) -> None:
        super().__init__()
        k1, k2, k3 = (int(k) for k in kernels)
        if any(k < 1 or k % 2 == 0 for k in (k1, k2, k3)):
            raise ValueError(f"CNN-10 kernel sizes must be odd, got {kernels}")
        self.conv1 = nn.Conv2d(in_chans, chans1, k1, padding=k1 // 2)
        self.conv2 = nn.Conv2d(chans1, chans2, k2, padding=k2 // 2)
        self.conv3 = nn.Conv2d(chans2, out_chans, k3, padding=k3 // 2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.relu(self.conv2(self.relu(self.conv1(x)))))
