"""Figures of the MRI acquisition: ground truths, their masks and zero-filled inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from blindspot.fileio import atomic_write_bytes  # noqa: E402


def save_figure(fig: "plt.Figure", path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def undersampling_panel(
    truths: Tensor,
    masks: Mapping[str, Tensor],
    zero_filled: Mapping[str, Tensor],
    titles: Sequence[str],
    path: str | Path,
) -> Path:
    """One row per slice: truth, then (mask, zero-filled) per setting.

    Args:
        truths: ``(N, 1, h, w)`` magnitudes.
        masks: setting label → ``(N, 1, 1, W)`` column masks (drawn as ``h × W`` images).
        zero_filled: setting label → ``(N, 1, h, w)`` zero-filled magnitudes (same grey scale as the truth).
        titles: one row title per slice.
    """
    n = truths.shape[0]
    labels = list(masks)
    cols = 1 + 2 * len(labels)
    fig, axes = plt.subplots(n, cols, figsize=(2.3 * cols, 2.4 * n), squeeze=False)
    for i in range(n):
        vmax = float(truths[i].max())
        axes[i, 0].imshow(truths[i, 0].cpu(), cmap="gray", vmin=0, vmax=vmax)
        axes[i, 0].set_ylabel(titles[i], fontsize=8)
        for j, label in enumerate(labels):
            m = masks[label][i].reshape(1, -1).expand(truths.shape[-2], -1)
            axes[i, 1 + 2 * j].imshow(m.cpu(), cmap="gray", vmin=0, vmax=1, aspect="auto")
            axes[i, 2 + 2 * j].imshow(zero_filled[label][i, 0].cpu(), cmap="gray", vmin=0, vmax=vmax)
    axes[0, 0].set_title("ground truth", fontsize=9)
    for j, label in enumerate(labels):
        axes[0, 1 + 2 * j].set_title(f"mask {label}", fontsize=9)
        axes[0, 2 + 2 * j].set_title(f"zero-filled {label}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, path)
