"""Lesion-weighted training: the loss inside annotated lesion boxes counts ``W`` times (the seed code's second mode).

Pixel weights are ``w = W`` inside any box of the slice and ``1`` elsewhere; the loss is the mean over pixels of
``w · ℓ`` with ``ℓ`` the per-pixel L1 or squared error of the normalised images, so slices without boxes train exactly
as with :func:`blindspot.training.mri.mri_loss`. Boxes are read with :mod:`blindspot.data.lesions` and validated
against the training files; they are in pixels of the volumes' reconstruction images, so training must use that
size (no other ``--crop``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blindspot.data.lesions import LesionBox, boxes_tensor, read_annotations, validate_annotations, volume_key
from blindspot.data.sample import MRIBatch
from blindspot.errors import BlindspotError, PathLike
from blindspot.models.adapters import reconstruct
from blindspot.training.engine import StepContext

WEIGHTED_LOSSES = ("l1", "mse")


def box_weight_map(boxes: Tensor, size: tuple[int, int], weight: float) -> Tensor:
    """``(h, w)`` float32 weights: ``weight`` inside any of ``boxes`` (``(n, 4)`` ``x, y, width, height``), else 1."""
    h, w = size
    rows = torch.arange(h, device=boxes.device).reshape(1, h, 1)
    cols = torch.arange(w, device=boxes.device).reshape(1, 1, w)
    x, y, bw, bh = (boxes[:, i].reshape(-1, 1, 1) for i in range(4))
    inside = ((rows >= y) & (rows < y + bh) & (cols >= x) & (cols < x + bw)).any(dim=0)
    return 1.0 + (float(weight) - 1.0) * inside.to(torch.float32)


def box_weighted_loss(kind: str, boxes: list[LesionBox], weight: float):
    """Loss for :class:`~blindspot.training.engine.Trainer`: box-weighted L1 / MSE (see the module docs).

    Args:
        kind: ``"l1"`` or ``"mse"``.
        boxes: validated boxes (rows from the top, pixels of the reconstruction image).
        weight: ``W`` ≥ 1, the weight of a pixel inside a box.
    Returns:
        ``loss(model, batch, ctx) -> (loss, {"l1": …, "l1_boxes": …})``.
    """
    kind = kind.lower()
    if kind not in WEIGHTED_LOSSES:
        raise BlindspotError(None, f"box weighting supports the {' and '.join(WEIGHTED_LOSSES)} losses, not {kind!r}")
    if not weight >= 1.0:
        raise BlindspotError(None, f"--box-weight must be at least 1, got {weight}")
    per_key: dict[str, list[LesionBox]] = {}
    for b in boxes:
        per_key.setdefault(b.key, []).append(b)
    cache: dict[tuple[str, torch.device, tuple[int, int]], Tensor] = {}

    def weights_for(batch: MRIBatch, device: torch.device) -> Tensor:
        size = tuple(batch.target.shape[-2:])
        maps = []
        for fname, s in zip(batch.fname, batch.slice_num):
            key = f"{volume_key(fname)}:{int(s)}"
            if key not in per_key:
                maps.append(None)
                continue
            ck = (key, device, size)
            if ck not in cache:
                cache[ck] = box_weight_map(boxes_tensor(per_key[key], device), size, weight)
            maps.append(cache[ck])
        ones = torch.ones(size, device=device)
        return torch.stack([ones if m is None else m for m in maps]).unsqueeze(1)  # (B, 1, h, w)

    def loss_fn(model: nn.Module, batch: MRIBatch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch.normalized()
        out = reconstruct(model, x, batch.mask)
        err = (out - y).abs() if kind == "l1" else (out - y) ** 2
        w = weights_for(batch, out.device)
        loss = (w * err).mean()
        inside = w > 1.0
        l1_boxes = (out - y).abs()[inside].mean() if bool(inside.any()) else torch.zeros((), device=out.device)
        return loss, {"l1": F.l1_loss(out, y).detach(), "l1_boxes": l1_boxes.detach()}

    return loss_fn


def boxes_for_training(boxes_path: PathLike, data: PathLike) -> list[LesionBox]:
    """Read ``boxes_path`` and validate it against the fastMRI files of ``data`` (their stored target size)."""
    from blindspot.data.fastmri import find_hdf5_files, read_volume_info

    volumes = {}
    for path, fname in find_hdf5_files(data):
        info = read_volume_info(path, fname)
        if info.target_shape is not None and tuple(info.target_shape[-2:]) != tuple(info.crop):
            raise BlindspotError(path, f"boxes are in pixels of the {info.target_shape[-2]}x{info.target_shape[-1]} "
                                       f"reconstruction, but training uses a {info.crop[0]}x{info.crop[1]} crop")
        volumes[fname] = (info.num_slices, info.crop)
    return validate_annotations(read_annotations(boxes_path), volumes)


def box_weighted_setup(boxes_path: PathLike, data: PathLike | None, kind: str, weight: float
                       ) -> tuple[Any, dict[str, Any]]:
    """``(loss_fn, summary)`` for ``train mri --boxes CSV --box-weight W`` (``data``: the training files)."""
    if data is None:
        raise BlindspotError(None, "--boxes needs --data: the fastMRI files the boxes name")
    boxes = boxes_for_training(boxes_path, data)
    summary = {"boxes": str(Path(boxes_path)), "box_weight": float(weight), "lesions": len(boxes),
               "labels": sorted({b.label for b in boxes})}
    return box_weighted_loss(kind, boxes, weight), {"lesion_weighted": summary}
