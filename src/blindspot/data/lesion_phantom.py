"""Lesions planted in the synthetic knee phantoms, with their bounding boxes, so lesion evaluation runs without data.

Three kinds, each placed inside the tissue it belongs to (found by re-rendering the volume's anatomy with only that
tissue lit, so the lesion follows the phantom's own cartilage, menisci and marrow, occlusions included):

* ``cartilage`` — a focal cartilage defect: a disc of radius 1.5–3 mm through the articular cartilage, filled with
  joint fluid; its signal is ``max(fluid, 1.6 × cartilage)`` (proton-density images barely separate fluid from
  cartilage, so the defect is kept at least 60% brighter than the cartilage around it).
* ``meniscus`` — a meniscal tear: a fluid-signal line (0.5 mm half-thickness, at least half a pixel) through the
  meniscus, horizontal to oblique (within ±35°), across the whole meniscus.
* ``bone marrow`` — a subchondral bone-marrow lesion (oedema-like): a smooth ellipse of 2–7 mm radii in the marrow
  within 25 mm of the joint line; dark in proton density (0.45 × marrow signal), bright with fat suppression
  (0.8 × fluid signal).

A lesion changes the anatomy (the noise-free, unshaded magnitude) by ``Δ = m · a · (v − t)``, with ``m`` the lesion's
shape (0–1), ``a`` the tissue's visible fraction, ``v`` the lesion signal and ``t`` the tissue's signal; the image
gains ``Δ`` times the volume's receive field (single-coil shading and phase, or each coil's sensitivity), so the
lesion is shaded and phased like the tissue around it and the noise is untouched. Its box is the bounding box, in
the reconstruction crop (``recon_size``, rows from the top), of the pixels where ``|Δ|`` exceeds a quarter of its
peak. Lesions keep at least 10 mm (plus two pixels) between their centres on one slice, so boxes do not overlap.

Randomness: ``seed`` (with the volume's seed) fixes the kinds' slices, places, sizes and angles.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from blindspot.data import knee_phantom as kp
from blindspot.data.knee_files import challenge_coils, write_volume_file
from blindspot.data.lesions import LesionBox, write_annotations
from blindspot.errors import BlindspotError

#: Lesion kinds (also their labels in the boxes file), in the order they are cycled through.
LESION_KINDS: tuple[str, ...] = ("cartilage", "meniscus", "bone marrow")


@dataclass
class PlantedLesion:
    """One planted lesion: its box and how it was made (``centre`` is ``(row, column)`` in the full image)."""

    box: LesionBox
    kind: str
    slice: int
    centre: tuple[int, int]
    signal: float  # lesion signal v (relative units)
    tissue_signal: float  # the tissue's signal t
    pixels: int  # pixels inside the box threshold


def _one_hot_contrast(c: kp.Contrast, tissue: str) -> kp.Contrast:
    """``c`` with every tissue's signal 0 except ``tissue`` (1) and no red-marrow modulation; noise unchanged."""
    zero = {f.name: 0.0 for f in dataclasses.fields(c) if f.name not in ("acquisition", "noise")}
    zero["red_marrow"] = 1.0
    zero[tissue] = 1.0
    return dataclasses.replace(c, **zero)


def tissue_maps(volume: kp.KneeVolume, tissues: Sequence[str], chunk_pixels: int = 1 << 18) -> Tensor:
    """Visible fraction of each tissue in every pixel, ``(T, S, H, W)`` float32 in about [0, 1].

    The volume's anatomy is rendered again with only that tissue lit (signal 1, the rest 0), from the same
    parameters and texture generators, so the map follows the exact surfaces and occlusions of ``volume``
    (values carry the tissue's ±5–10% texture).

    Args:
        volume: a generated :class:`~blindspot.data.knee_phantom.KneeVolume`.
        tissues: field names of :class:`~blindspot.data.knee_phantom.Contrast` (``"cartilage"``, ``"meniscus"``,
            ``"marrow"``, …).
    """
    renderer = kp.KneeRenderer.for_volume(volume)
    contrasts = [_one_hot_contrast(volume.params.contrast, t) for t in tissues]
    H, W = volume.image.shape[-2:]
    out = torch.empty((len(tissues), renderer.num_slices, H, W), dtype=torch.float32, device=renderer.device)
    for start, stop in renderer.chunks(chunk_pixels):
        textures = renderer.textures(renderer.slice_generators(start, stop))
        for t, contrast in enumerate(contrasts):
            out[t, start:stop] = renderer.anatomy(start, stop, textures, contrast)
    return out


def receive_field(volume: kp.KneeVolume) -> Tensor:
    """The volume's receive field: complex64 ``(S, H, W)`` single-coil shading × phase, or ``(S, C, H, W)``
    coil sensitivities (the image is ``anatomy × field + noise``), computed as the generator computes it."""
    renderer = kp.KneeRenderer.for_volume(volume)
    return renderer.receive_field(0, renderer.num_slices, None if volume.image.ndim == 3 else volume.num_coils)


def _lesion_signal(kind: str, c: kp.Contrast) -> tuple[str, float, float]:
    """``(tissue, tissue signal t, lesion signal v)`` of a lesion kind under contrast ``c`` (module docs)."""
    if kind == "cartilage":
        return "cartilage", c.cartilage, max(c.fluid, 1.6 * c.cartilage)
    if kind == "meniscus":
        return "meniscus", c.meniscus, c.fluid
    if kind == "bone marrow":
        fat_sat = c.acquisition == "CORPDFS_FBK"
        return "marrow", c.marrow, (0.8 * c.fluid if fat_sat else 0.45 * c.marrow)
    raise BlindspotError(None, f"unknown lesion kind {kind!r}; choose from {list(LESION_KINDS)}")


def _lesion_shape(kind: str, ry: Tensor, rx: Tensor, dy: float, dx: float, u) -> Tensor:
    """The lesion's shape ``(H, W)`` in [0, 1] around its centre; ``ry``, ``rx``: mm from it; ``u`` draws sizes."""
    if kind == "cartilage":  # a disc through the cartilage
        radius = max(u(1.5, 3.0), 0.75 * max(dy, dx))
        return ((radius - torch.sqrt(ry * ry + rx * rx)) / (0.5 * min(dy, dx)) + 0.5).clamp(0.0, 1.0)
    if kind == "meniscus":  # a thin line, horizontal to oblique
        ang = math.radians(u(-35.0, 35.0))
        dist = (-math.sin(ang) * rx + math.cos(ang) * ry).abs()  # mm from the tear's line
        half = max(0.5, 0.5 * max(dy, dx))
        along = (math.cos(ang) * rx + math.sin(ang) * ry).abs()
        return ((half - dist) / (0.5 * min(dy, dx)) + 0.5).clamp(0.0, 1.0) * (along < 12.0)
    ang = math.radians(u(0.0, 180.0))  # bone marrow: a smooth-edged ellipse
    ra, rb = max(u(3.0, 7.0), 1.5 * dx), max(u(2.0, 4.5), 1.5 * dy)
    pa = (math.cos(ang) * rx + math.sin(ang) * ry) / ra
    pb = (-math.sin(ang) * rx + math.cos(ang) * ry) / rb
    return (1.0 - (pa * pa + pb * pb)).clamp_min(0.0).sqrt()


def _magnitude(image: Tensor) -> Tensor:
    """Magnitude ``(H, W)`` of a single-coil ``(H, W)`` or root-sum-of-squares of a multi-coil ``(C, H, W)`` image."""
    return image.abs() if image.ndim == 2 else image.abs().square().sum(0).sqrt()


def _conspicuous(without: Tensor, with_: Tensor, box: tuple[int, int, int, int], margin: int,
                 level: float) -> bool:
    """Whether a lesion stands out in its box ``(x, y, width, height)`` (``with_``/``without``: ``(h, w)``
    magnitudes with and without it): an image without the lesion would score a kept contrast fraction
    (``blindspot.runs.lesions``) of at most ``level`` against the truth with it, and the box's contrast pattern against its
    ring holds at least half of the lesion's own energy in the box (a lesion that merely fills a dark structure up to
    the level of its surroundings does not count)."""
    x, y, bw, bh = box
    h, w = with_.shape
    region = (slice(max(0, y - margin), min(h, y + bh + margin)), slice(max(0, x - margin), min(w, x + bw + margin)))
    inner = torch.zeros(h, w, dtype=torch.bool, device=with_.device)
    inner[y: y + bh, x: x + bw] = True
    ring = torch.zeros_like(inner)
    ring[region] = True
    ring &= ~inner
    dt = with_[inner] - with_[ring].mean()
    dn = without[inner] - without[ring].mean()
    change = float(((dn - dt) ** 2).sum())
    pattern = float((dt * dt).sum())
    return pattern > 0 and 1.0 - change / pattern <= level and pattern >= 0.5 * change


def plant_lesions(
    volume: kp.KneeVolume,
    count: int,
    seed: int = 0,
    kinds: Sequence[str] = LESION_KINDS,
    fname: str | None = None,
    margin: int = 4,
    tries: int = 40,
    conspicuity: float = 0.25,
) -> tuple[Tensor, list[PlantedLesion]]:
    """Plant ``count`` lesions in ``volume``; returns the new image stack and the lesions with their boxes.

    Lesion ``i`` is of kind ``kinds[i % len(kinds)]``, on a slice (and at a place) drawn among those where its tissue
    shows inside the reconstruction crop. A placement is kept only if the lesion is *conspicuous*: an image without
    it would score a kept contrast fraction ≤ ``conspicuity`` on its box (ring ``margin`` px; see
    :mod:`blindspot.runs.lesions`), and the box's contrast against its ring is mostly the lesion's, so that losing the
    lesion is what the evaluation measures, not the anatomy in the box. After ``tries`` draws
    without such a place the next kind is tried; a lesion no kind can place is left out, so fewer than ``count``
    lesions may come back (small images, where one pixel spans several millimetres). Boxes are in pixels of the
    ``recon_size`` crop, rows from the top, labelled with the kind, on file ``fname`` (default: the volume's).

    Args:
        volume: a generated :class:`~blindspot.data.knee_phantom.KneeVolume` (single- or multi-coil).
        count: number of lesions (≥ 0).
        seed: lesion seed (combined with the volume's seed).
        kinds: kinds to cycle through (from :data:`LESION_KINDS`).
        margin: ring width of the conspicuity check, pixels (the evaluation's default).
        tries: placements drawn per kind before moving on.
        conspicuity: the kept fraction an image without the lesion may score at most (default: half of the default
            preservation threshold, so removing the lesion fails the default rule clearly).
    Returns:
        ``(image, lesions)``: complex64 image of ``volume.image``'s shape, and the :class:`PlantedLesion` list.
    """
    if int(count) < 0:
        raise BlindspotError(None, f"lesion count must be >= 0, got {count}")
    for k in kinds:
        _lesion_signal(k, volume.params.contrast)
    image = volume.image.clone()
    if int(count) == 0:
        return image, []
    fname = fname or volume.fname
    c = volume.params.contrast
    tissues = sorted({_lesion_signal(k, c)[0] for k in kinds})
    maps = dict(zip(tissues, tissue_maps(volume, tissues)))
    field = receive_field(volume)
    S, H, W = maps[tissues[0]].shape
    h, w = volume.recon_size
    top, left = (H - h) // 2, (W - w) // 2  # the crop's corner, as blindspot.physics.mri.center_crop takes it
    dy, dx = volume.pixel_spacing_mm
    device = image.device
    g = torch.Generator().manual_seed(kp.derive_seed("lesions", volume.seed, int(seed)))
    rows = torch.arange(H, dtype=torch.float32, device=device).reshape(H, 1)
    cols = torch.arange(W, dtype=torch.float32, device=device).reshape(1, W)
    knee_y = kp.KneeRenderer.for_volume(volume).knee_y[0]  # (H, W) mm: bone-marrow lesions stay subchondral
    inside = torch.zeros(H, W, dtype=torch.bool, device=device)
    edge = 3  # keep centres 3 px inside the crop so the box stays in it
    inside[top + edge: top + h - edge, left + edge: left + w - edge] = True

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    taken = torch.zeros(S, H, W, dtype=torch.bool, device=device)  # near an earlier lesion: lesions do not overlap
    lesions: list[PlantedLesion] = []
    for i in range(int(count)):
        placed = None
        for attempt in range(len(kinds) * tries):
            kind = kinds[(i + attempt // tries) % len(kinds)]
            tissue, t_sig, v_sig = _lesion_signal(kind, c)
            amap = maps[tissue]
            cand = (amap > 0.5) & inside & ~taken
            if kind == "bone marrow":
                cand &= knee_y.abs() < 25.0
            weights = cand.reshape(-1).to(torch.float32)
            if float(weights.sum()) == 0:
                continue
            flat = int(torch.multinomial(weights.cpu(), 1, generator=g))
            s, rem = divmod(flat, H * W)
            r0, c0 = divmod(rem, W)
            ry, rx = (rows - r0) * dy, (cols - c0) * dx  # mm from the centre
            delta = _lesion_shape(kind, ry, rx, dy, dx, u) * maps[tissue][s].clamp(0.0, 1.2) * (v_sig - t_sig)
            strong = delta.abs() > 0.25 * float(delta.abs().max())
            crop_strong = strong[top: top + h, left: left + w]
            rr = torch.nonzero(crop_strong.any(dim=1)).flatten()
            cc = torch.nonzero(crop_strong.any(dim=0)).flatten()
            if rr.numel() == 0:
                continue
            f = field[s]
            new = image[s] + (delta.to(f.dtype) * f if f.ndim == 2 else delta.to(f.dtype).unsqueeze(0) * f)
            y0, y1, x0, x1 = int(rr[0]), int(rr[-1]) + 1, int(cc[0]), int(cc[-1]) + 1
            crop = (slice(top, top + h), slice(left, left + w))
            if not _conspicuous(_magnitude(image[s])[crop], _magnitude(new)[crop], (x0, y0, x1 - x0, y1 - y0),
                                margin, conspicuity):
                continue
            placed = (kind, s, r0, c0, new, (x0, y0, x1 - x0, y1 - y0), v_sig, t_sig, int(crop_strong.sum()))
            taken[s] |= torch.sqrt(ry * ry + rx * rx) < 10.0 + 2.0 * max(dy, dx)
            break
        if placed is None:
            continue  # reported: fewer lesions than asked (callers compare len(lesions) with count)
        kind, s, r0, c0, new, (x0, y0, bw, bh), v_sig, t_sig, npix = placed
        image[s] = new
        box = LesionBox(fname, int(s), x0, y0, bw, bh, kind, f"lesion {len(lesions) + 1}")
        lesions.append(PlantedLesion(box, kind, int(s), (r0, c0), float(v_sig), float(t_sig), npix))
    return image, lesions


def write_lesion_phantoms(
    out_dir: str | os.PathLike[str],
    boxes_path: str | os.PathLike[str],
    volumes: int,
    slices: int,
    lesions_per_volume: int,
    seed: int = 0,
    lesion_seed: int = 0,
    shape: Sequence[int] = kp.FASTMRI_KNEE_SHAPE,
    recon_size: Sequence[int] = kp.FASTMRI_RECON_SIZE,
    challenge: str = "singlecoil",
    num_coils: int = 8,
    kinds: Sequence[str] = LESION_KINDS,
    progress: bool = True,
) -> tuple[list[Path], list[LesionBox]]:
    """Write phantom volumes with planted lesions as fastMRI HDF5 files, and their boxes (CSV or JSON).

    Volume ``v`` has seed ``seed + v`` and file name ``file_phantom_{seed:06d}.h5`` (as
    :func:`~blindspot.data.knee_files.write_phantom_volumes`; the files also carry ``lesions`` and
    ``lesion_seed`` attributes). The boxes file must lie outside ``out_dir`` (a fastMRI folder holds only ``.h5``).

    Returns:
        ``(paths, boxes)``.
    """
    coils = challenge_coils(challenge, num_coils)
    out_dir, boxes_path = Path(out_dir), Path(boxes_path)
    if boxes_path.resolve().parent == out_dir.resolve() or out_dir.resolve() in boxes_path.resolve().parents:
        raise BlindspotError(boxes_path, "the boxes file must lie outside the data folder (it holds only .h5 files)")
    if out_dir.exists() and not out_dir.is_dir():
        raise BlindspotError(out_dir, "exists and is not a folder")
    geo = kp.phantom_geometry(shape, recon_size)
    paths, boxes = [], []
    for vseed in tqdm(kp.volume_seeds(seed, volumes), desc="lesion phantoms", unit="vol", disable=not progress):
        vol = kp.generate_knee_volume(vseed, int(slices), geo.shape, geo.recon_size, num_coils=coils)
        image, planted = plant_lesions(vol, lesions_per_volume, lesion_seed, kinds, fname=vol.fname)
        vol = dataclasses.replace(vol, image=image)
        extra = {"lesions": len(planted), "lesion_seed": int(lesion_seed)}
        paths.append(write_volume_file(out_dir / vol.fname, vol, extra))
        boxes.extend(p.box for p in planted)
    write_annotations(boxes_path, boxes)
    return paths, boxes
