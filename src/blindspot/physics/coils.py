"""Coil sensitivity maps for multi-coil MRI: from fully sampled coil images, or from the auto-calibration region alone.

A receive array sees the object ``y`` through complex sensitivities ``S_c``: coil image ``x_c = S_c · y`` (+ noise).
blindspot's acquisition (:class:`~blindspot.physics.acquisition.CartesianMRI`) takes maps normalised so that
``Σ_c |S_c|² = 1`` where the object is; then the root-sum-of-squares (RSS) of the coil images of a real, non-negative
truth is the truth itself, and a feature ``δ'`` enters every coil as ``S_c · δ'``. Maps are only defined up to one
phase per pixel (it can be moved between the maps and the object); every estimator below says which phase it keeps.

==========================  ===========================================================================================
estimator                   what it needs, what it returns
==========================  ===========================================================================================
:func:`maps_from_coil_images` fully sampled coil images ``x_c``: ``S_c = x_c / max(RSS(x), ε)`` — exact where the
                            RSS is above the floor ``ε``; the maps carry the object's phase
:func:`lowres_maps`         the auto-calibration (ACS) columns only: the fully sampled central columns, windowed
                            (Hann, optional) and zero-filled, transformed to coil images and divided by their RSS —
                            the low-resolution estimate that fastMRI's VarNet ``SensitivityModel`` starts from
                            (fastMRI masks the centre without a window and lets a U-Net refine it)
:func:`espirit_maps`        the ACS columns only: an ESPIRiT eigenvector estimate (Uecker et al., MRM 2014)
==========================  ===========================================================================================

**ESPIRiT as implemented here.** (1) The calibration region is the ACS block ``(calib_rows, n)`` at the centre of
k-space; its ``k × k`` patches of all coils form the rows of the calibration matrix ``A`` (``P × C·k²``). (2) The
right singular vectors of ``A`` whose singular values reach ``threshold · σ_max`` span the signal subspace (the
patches themselves lie in the span of their conjugates, ``A = U Σ Vᴴ``); ``Π`` is the projector onto it (from the
eigen-decomposition of ``AᴴA`` in double precision). (3) Every patch of consistent k-space is left unchanged by
``Π``, so k-space is a fixed point of the shift-invariant operator ``W = k⁻² Σ_p R_pᴴ Π R_p``: a ``C × C`` matrix of
``(2k − 1)²`` convolution kernels ``w_{cc'}(Δ) = k⁻² Σ_{δ₁ − δ₂ = Δ} Π[(c, δ₁), (c', δ₂)]``. (4) In the image domain
``W`` is a pointwise Hermitian matrix ``G(x) = Σ_Δ w(Δ) e^{2πiΔ·x/N} = √(HW) F⁻¹(w)(x)`` (evaluated as two small
separable DFTs) with eigenvalues in ``[0, 1]``; the sensitivities at ``x`` are its eigenvector of eigenvalue 1
(``torch.linalg.eigh`` per pixel, in chunks of rows). (5) Each eigenvector has unit norm (``Σ_c |S_c|² = 1``); its
phase is set so that it agrees with the low-resolution estimate (``⟨ŝ_lowres, s⟩`` real and positive), so for a real
object the maps approach the true maps including their phase; pixels whose largest eigenvalue is below ``crop`` get
zero maps (outside the object's support).

Measured (``tests/test_coils.py`` and the knee phantom; error = ``‖ŝ(x) − s(x)‖₂`` over coils, unit-norm maps, mean
over the object): on noise-free smooth synthetic coils with 20 ACS columns of 128, low-resolution ≈ 0.02 (windowed)
/ 0.001 (unwindowed), ESPIRiT ≈ 0.017 (≈ 0.003 once the arbitrary per-pixel phase is factored out); on the noisy
knee phantom (320×184, 15 coils, 15 ACS columns) low-resolution ≈ 0.040 (windowed) / 0.066 (unwindowed), ESPIRiT
≈ 0.029 (0.010 up to phase), the maps of the fully sampled noisy coil images themselves ≈ 0.058. Noise favours the
window, which is therefore the default.

Known limitations: one set of maps (no soft-SENSE second set, so a field of view that folds over itself is not
modelled); the low-resolution estimator is biased where the object has structure finer than the ACS resolution
(edges, small holes) and where the object vanishes (the maps there are noise divided by noise, unit norm); ESPIRiT's
phase is only as good as the low-resolution estimate it is aligned to; ESPIRiT needs at least ``kernel_size + 1`` ACS
columns, zeroes the maps outside the support it detects (a feature placed there reaches no coil), and its per-pixel
eigen-decomposition costs ``H·W`` small ``C × C`` problems (about 2.5 s per 320×184 slice of 15 coils on one CPU
core); the singular-value ``threshold`` and eigenvalue ``crop`` are ESPIRiT's usual defaults (SigPy: 0.02 and 0.95),
not tuned on scanner data.

All functions are batched torch code on the tensors' device; k-space is centred (:func:`~blindspot.physics.mri.fft2c`),
complex ``(B, C, H, W)`` with the phase-encode columns on the last axis. Masks are 0/1 column masks ``(B, 1, 1, W)``
(``(W,)``, ``(1, W)`` and fastMRI's boolean ``(B, 1, 1, W, 1)`` are accepted too); :func:`lowres_maps` and
:func:`calibration_box` also take 2-D masks ``(B, 1, H, W)``, whose calibration data is a fully sampled central box
(ESPIRiT calibrates on that box).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from blindspot.errors import BlindspotError
from blindspot.physics.mri import fft2c, ifft2c, rss

#: Names accepted by :func:`estimate_maps`.
MAP_ESTIMATORS: tuple[str, ...] = ("full", "lowres", "espirit")
#: Relative floor of the RSS below which :func:`maps_from_coil_images` stops dividing (see there).
RSS_FLOOR = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Auto-calibration region
# ----------------------------------------------------------------------------------------------------------------
def column_mask(mask: Tensor) -> Tensor:
    """A column mask of any accepted shape as a boolean ``(B, W)`` (``B = 1`` for one mask for all items)."""
    m = mask[..., 0] if mask.ndim == 5 else mask
    if m.ndim == 0 or any(int(s) != 1 for s in m.shape[1:-1]):
        raise BlindspotError(None, f"a column mask must be (W,), (1, W), (B, 1, 1, W) or (B, 1, 1, W, 1), got "
                                   f"{tuple(mask.shape)}")
    return m.reshape(-1 if m.ndim > 1 else 1, m.shape[-1]) != 0


def low_frequency_columns(mask: Tensor, num_low_frequencies: "int | Tensor | None" = None,
                          fastmri_argmin: bool = False) -> tuple[Tensor, Tensor]:
    """The fully sampled central columns of each mask, by fastMRI's rule.

    Counting from the centre column ``W // 2``, ``right`` is the number of consecutive sampled columns from the centre
    rightwards and ``left`` the number leftwards from ``W // 2 − 1``; the block is the symmetric part,
    ``n = max(2 · min(left, right), 1)`` columns starting at ``(W − n + 1) // 2`` (where blindspot's and fastMRI's mask
    functions put the centre block, so an extra random column next to it on one side does not count).

    Args:
        mask: column masks (see the module docs).
        num_low_frequencies: the block width when known (fastMRI's argument): an int for every item or an int64
            ``(B,)`` per item; ``None`` or 0 (for an item: 0): detect it.
        fastmri_argmin: reproduce fastMRI's ``argmin`` detail: a half-mask that is sampled throughout counts as 0
            columns, so a fully sampled mask gives ``n = 1`` (VarNet's sensitivity network depends on it; the map
            estimators use the true count, ``n = W``).
    Returns:
        ``(start, n)``: int64 ``(B,)`` each, the first column of the block and its width.
    """
    m = column_mask(mask)
    B, W = m.shape
    given = None
    if isinstance(num_low_frequencies, Tensor):
        given = num_low_frequencies.to(device=m.device, dtype=torch.long).reshape(-1)
        if B == 1 and given.numel() > 1:  # one mask for every item
            B = int(given.numel())
            m = m.expand(B, W)
        elif given.numel() == 1:
            given = given.expand(B)
        elif given.numel() != B:
            raise BlindspotError(None, f"{given.numel()} num_low_frequencies values for {B} masks")
    elif num_low_frequencies:
        given = torch.full((B,), int(num_low_frequencies), dtype=torch.long, device=m.device)
    if given is None or bool((given <= 0).any()):
        cent = W // 2
        left_half, right_half = m[:, :cent].flip(1).long(), m[:, cent:].long()
        left, right = left_half.cumprod(1).sum(1), right_half.cumprod(1).sum(1)  # run lengths of sampled columns
        if fastmri_argmin:
            left = torch.where(left == cent, torch.zeros_like(left), left)
            right = torch.where(right == W - cent, torch.zeros_like(right), right)
        n = torch.clamp_min(2 * torch.minimum(left, right), 1)
        if not fastmri_argmin:
            n = torch.where(m.all(1), torch.full_like(n, W), n)
        n = n if given is None else torch.where(given > 0, given, n)
    else:
        n = given
    start = torch.div(W - n + 1, 2, rounding_mode="floor")
    return start, n


def calibration_box(mask: Tensor, num_low_frequencies: "int | Tensor | None" = None,
                    fastmri_argmin: bool = False) -> Tensor:
    """The fully sampled central box of 2-D masks ``(B, 1, H, W)`` (or ``(H, W)``), as a boolean ``(B, 1, H, W)``.

    Its columns are :func:`low_frequency_columns` of the mask's centre row (``num_low_frequencies``, when known, is
    their number, as for column masks), its rows those of the centre column (the same rule along the other axis).
    """
    m = mask != 0
    m = m.reshape(-1, *m.shape[-2:])  # (B, H, W)
    H, W = m.shape[-2:]
    c0, nc = low_frequency_columns(m[:, H // 2, :], num_low_frequencies, fastmri_argmin)
    r0, nr = low_frequency_columns(m[:, :, W // 2], None, fastmri_argmin)
    cols = torch.arange(W, device=m.device)
    rows = torch.arange(H, device=m.device)
    in_cols = (cols >= c0[:, None]) & (cols < (c0 + nc)[:, None])  # (B, W)
    in_rows = (rows >= r0[:, None]) & (rows < (r0 + nr)[:, None])  # (B, H)
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def keep_columns(kspace: Tensor, start: Tensor, n: Tensor) -> Tensor:
    """``kspace`` with every column outside ``[start, start + n)`` set to zero, per item.

    Args:
        kspace: ``(B, ..., W)`` (any dtype; columns on the last axis).
        start, n: int64 ``(B,)`` or ``(1,)`` (see :func:`low_frequency_columns`).
    """
    cols = torch.arange(kspace.shape[-1], device=kspace.device)
    shape = (-1,) + (1,) * (kspace.ndim - 1)
    lo, hi = start.to(kspace.device).reshape(shape), (start + n).to(kspace.device).reshape(shape)
    return kspace * ((cols >= lo) & (cols < hi)).to(kspace.real.dtype)


def _check_kspace(kspace: Tensor) -> None:
    if kspace.ndim != 4 or not kspace.is_complex():
        raise BlindspotError(None, f"multi-coil k-space must be complex (B, C, H, W), got {tuple(kspace.shape)} "
                                   f"{kspace.dtype}")
    if not bool(torch.isfinite(torch.view_as_real(kspace)).all()):
        raise BlindspotError(None, "multi-coil k-space holds NaN or Inf values")


def acs_columns(kspace: Tensor, mask: Tensor | None, num_low_frequencies: int | None,
                minimum: int, estimator: str) -> tuple[Tensor, Tensor]:
    """``(start, n)`` of the ACS block of ``kspace`` ``(B, C, H, W)``, checked to hold at least ``minimum`` columns.

    ``mask`` ``None`` means fully sampled k-space (every column is calibration data).
    """
    _check_kspace(kspace)
    B, W = kspace.shape[0], kspace.shape[-1]
    if mask is None:
        mask = torch.ones(1, W, device=kspace.device)
    m = column_mask(mask)
    if m.shape[-1] != W:
        raise BlindspotError(None, f"the mask has {m.shape[-1]} columns but the k-space is {W} wide")
    if m.shape[0] not in (1, B):
        raise BlindspotError(None, f"{m.shape[0]} masks for {B} k-space items")
    start, n = low_frequency_columns(m, num_low_frequencies)
    if int(n.min()) < minimum:
        raise BlindspotError(None, f"only {int(n.min())} auto-calibration columns; the {estimator} coil-map estimator "
                                   f"needs at least {minimum}")
    if int((start + n).max()) > W:
        raise BlindspotError(None, f"{int(n.max())} auto-calibration columns do not fit in {W}")
    return start.expand(B).to(kspace.device), n.expand(B).to(kspace.device)


# ----------------------------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------------------------
def maps_from_coil_images(coil_images: Tensor, floor: float = RSS_FLOOR) -> Tensor:
    """Sensitivity maps from fully sampled coil images: ``S_c = x_c / max(RSS(x), floor · max RSS)``.

    Args:
        coil_images: complex ``(B, C, H, W)`` (e.g. ``ifft2c`` of fully sampled multi-coil k-space).
        floor: relative RSS floor, 1e-6 of the brightest pixel of each item by default. Below it (where every coil
            is essentially zero) the maps shrink towards zero instead of amplifying round-off; an all-zero item gives
            zero maps.
    Returns:
        complex ``(B, C, H, W)`` maps, ``Σ_c |S_c|² = 1`` wherever the RSS is above the floor. With them,
        ``S_c · RSS(x) = x_c`` there: the acquisition of the magnitude truth ``RSS(x)`` reproduces the coil images
        (the maps carry the object's phase).
    """
    if coil_images.ndim != 4 or not coil_images.is_complex():
        raise BlindspotError(None, f"coil images must be complex (B, C, H, W), got {tuple(coil_images.shape)} "
                                   f"{coil_images.dtype}")
    if not 0.0 <= floor < 1.0:
        raise BlindspotError(None, f"the RSS floor must lie in [0, 1), got {floor}")
    r = rss(coil_images, dim=1)  # (B, 1, H, W)
    eps = (r.amax(dim=(1, 2, 3), keepdim=True) * floor).clamp_min(torch.finfo(r.dtype).tiny)
    return coil_images / torch.maximum(r, eps)


def hann_columns(kspace: Tensor, start: Tensor, n: Tensor) -> Tensor:
    """``kspace`` ``(B, ..., W)`` times a Hann window over each item's columns ``[start, start + n)``, zero elsewhere.

    The window ``sin²(π (j − start + ½) / n)`` is positive on every ACS column and falls smoothly to the block's
    edges, which suppresses the ringing of a hard truncation.
    """
    cols = torch.arange(kspace.shape[-1], device=kspace.device, dtype=torch.float64)
    shape = (-1,) + (1,) * (kspace.ndim - 1)
    s = start.to(kspace.device, torch.float64).reshape(shape)
    w = n.to(kspace.device, torch.float64).reshape(shape)
    t = (cols - s + 0.5) / w
    window = torch.where((t > 0) & (t < 1), torch.sin(math.pi * t) ** 2, torch.zeros_like(t))
    return kspace * window.to(kspace.real.dtype)


def lowres_maps(kspace: Tensor, mask: Tensor | None = None, num_low_frequencies: int | None = None,
                window: bool = True, floor: float = RSS_FLOOR) -> Tensor:
    """Low-resolution sensitivity maps from the auto-calibration columns alone.

    The ACS block (:func:`low_frequency_columns`) is kept, Hann-windowed along the columns (``window``; fastMRI's
    SensitivityModel keeps it unwindowed), the rest of k-space is zeroed, the coil images ``x̂_c = F⁻¹(…)`` are
    formed and divided by their RSS (:func:`maps_from_coil_images`). Rows (the read-out) stay at full resolution.

    Args:
        kspace: masked (or fully sampled) multi-coil k-space, complex ``(B, C, H, W)``.
        mask: its column masks (``None``: fully sampled), or 2-D masks ``(B, 1, H, W)``: then the fully sampled
            central box (:func:`calibration_box`) is kept instead of the ACS columns, windowed along both axes.
        num_low_frequencies: the ACS width when known, else detected from ``mask``.
        window: apply the Hann window.
        floor: relative RSS floor.
    Returns:
        complex ``(B, C, H, W)`` maps with ``Σ_c |S_c|² = 1`` above the floor; their phase is that of the
        low-resolution coil images (for a real, non-negative object, the true maps' phase).
    """
    m = None if mask is None else (mask[..., 0] if mask.ndim == 5 else mask)
    if m is not None and m.ndim >= 2 and m.shape[-2] > 1:  # a 2-D mask: its central box, windowed both ways
        _check_kspace(kspace)
        H, W = kspace.shape[-2:]
        if tuple(m.shape[-2:]) != (H, W):
            raise BlindspotError(None, f"the 2-D mask is {m.shape[-2]}x{m.shape[-1]} but the k-space is {H}x{W}")
        flat = (m != 0).reshape(-1, H, W)
        c0, nc = low_frequency_columns(flat[:, H // 2, :], num_low_frequencies)
        r0, nr = low_frequency_columns(flat[:, :, W // 2])
        if int(torch.minimum(nc, nr).min()) < 2:
            raise BlindspotError(None, f"the calibration box is only {int(nr.min())}x{int(nc.min())}; the "
                                       "low-resolution coil-map estimator needs at least 2x2")
        acs = kspace * calibration_box(m, num_low_frequencies).to(kspace.real.dtype)
        if window:
            acs = hann_columns(hann_columns(acs, c0, nc).transpose(-2, -1), r0, nr).transpose(-2, -1)
        return maps_from_coil_images(ifft2c(acs), floor)
    start, n = acs_columns(kspace, mask, num_low_frequencies, 2, "low-resolution")
    acs = keep_columns(kspace, start, n)
    if window:
        acs = hann_columns(acs, start, n)
    return maps_from_coil_images(ifft2c(acs), floor)


def _calibration_kernels(acs: Tensor, kernel_size: int, threshold: float) -> Tensor:
    """ESPIRiT steps (1)–(3) for one item: ACS block ``(C, r, n)`` → the convolution kernels ``w`` of ``W``,
    complex128 ``(C, C, 2k − 1, 2k − 1)`` with ``Δ = 0`` at index ``k − 1``."""
    C, k = acs.shape[0], kernel_size
    patches = acs.to(torch.complex128).unfold(1, k, 1).unfold(2, k, 1)  # (C, r-k+1, n-k+1, k, k)
    a = patches.permute(1, 2, 0, 3, 4).reshape(-1, C * k * k)  # calibration matrix (P, C·k²)
    evals, evecs = torch.linalg.eigh(a.conj().T @ a)  # σ² ascending
    sigma = evals.clamp_min(0).sqrt()
    keep = sigma >= threshold * sigma[-1]
    v = evecs[:, keep]  # A = U Σ Vᴴ: the patches (rows of A, unconjugated) lie in the span of conj(V)
    proj = (v @ v.conj().T).conj().reshape(C, k, k, C, k, k)  # Π[(c, δ1), (c', δ2)]
    w = torch.zeros(C, C, 2 * k - 1, 2 * k - 1, dtype=torch.complex128, device=acs.device)
    for a2 in range(k):  # Δ = δ1 − δ2: each δ2 adds Π[:, ·, ·, :, δ2] at offset (k − 1 − δ2)
        for b2 in range(k):
            block = proj[:, :, :, :, a2, b2].permute(0, 3, 1, 2)  # (C, C', k, k) over δ1
            w[:, :, k - 1 - a2: 2 * k - 1 - a2, k - 1 - b2: 2 * k - 1 - b2] += block
    return w / (k * k)


def _fourier_phases(n: int, k: int, device: torch.device) -> Tensor:
    """``exp(2πi Δ (i − n//2) / n)`` for positions ``i < n`` and kernel offsets ``Δ = −(k−1) … k−1``:
    complex64 ``(n, 2k − 1)``."""
    pos = (torch.arange(n, dtype=torch.float64, device=device) - n // 2).reshape(-1, 1)
    delta = torch.arange(-(k - 1), k, dtype=torch.float64, device=device).reshape(1, -1)
    return torch.polar(torch.ones_like(pos * delta), 2 * math.pi * pos * delta / n).to(torch.complex64)


def espirit_maps(kspace: Tensor, mask: Tensor | None = None, num_low_frequencies: int | None = None,
                 kernel_size: int = 6, calib_rows: int | None = None, threshold: float = 0.02, crop: float = 0.95,
                 chunk_pixels: int = 1 << 16) -> Tensor:
    """ESPIRiT sensitivity maps from the auto-calibration columns alone (see the module docs for the method).

    Args:
        kspace: masked (or fully sampled) multi-coil k-space, complex ``(B, C, H, W)``.
        mask: its column masks (``None``: fully sampled), or 2-D masks ``(B, 1, H, W)``: then the calibration region
            is their fully sampled central box (:func:`calibration_box`; ``calib_rows`` defaults to its height).
        num_low_frequencies: the ACS width when known, else detected from ``mask``.
        kernel_size: ESPIRiT kernel width ``k`` (k-space samples); the ACS block needs at least ``k + 1`` columns.
        calib_rows: rows of the calibration region, centred (``None``: as many as ACS columns, a square region).
        threshold: singular values below ``threshold · σ_max`` are discarded (noise).
        crop: pixels whose largest eigenvalue is below ``crop`` get zero maps (0 keeps every pixel).
        chunk_pixels: pixels per batched eigen-decomposition (bounds memory, not results).
    Returns:
        complex ``(B, C, H, W)`` maps, unit norm over coils where kept, phase aligned with :func:`lowres_maps`.
    """
    if not (isinstance(kernel_size, int) and kernel_size >= 2):
        raise BlindspotError(None, f"the ESPIRiT kernel size must be an integer >= 2, got {kernel_size}")
    if not 0.0 <= threshold < 1.0 or not 0.0 <= crop < 1.0:
        raise BlindspotError(None, f"ESPIRiT threshold and crop must lie in [0, 1), got {threshold} and {crop}")
    m = None if mask is None else (mask[..., 0] if mask.ndim == 5 else mask)
    if m is not None and m.ndim >= 2 and m.shape[-2] > 1:  # a 2-D mask: calibrate on its central box only
        _check_kspace(kspace)
        if tuple(m.shape[-2:]) != tuple(kspace.shape[-2:]):
            raise BlindspotError(None, f"the 2-D mask is {m.shape[-2]}x{m.shape[-1]} but the k-space is "
                                       f"{kspace.shape[-2]}x{kspace.shape[-1]}")
        box = calibration_box(m, num_low_frequencies)[:, 0]  # (B|1, H, W)
        box_rows, box_cols = box.any(2).sum(1), box.any(1).sum(1)
        if int(torch.minimum(box_rows, box_cols).min()) < kernel_size + 1:
            raise BlindspotError(None, f"the calibration box is only {int(box_rows.min())}x{int(box_cols.min())}; the "
                                       f"ESPIRiT coil-map estimator needs at least {kernel_size + 1}x{kernel_size + 1}")
        kspace = kspace * box.unsqueeze(1).to(kspace.real.dtype)
        mask, num_low_frequencies = None, box_cols
        calib_rows = int(box_rows.min()) if calib_rows is None else min(int(calib_rows), int(box_rows.min()))
    start, n = acs_columns(kspace, mask, num_low_frequencies, kernel_size + 1, "ESPIRiT")
    B, C, H, W = kspace.shape
    k = kernel_size
    if min(H, W) < 2 * k - 1:
        raise BlindspotError(None, f"k-space {H}x{W} is smaller than the ESPIRiT kernels ({2 * k - 1} samples)")
    kernels = []
    for b in range(B):  # calibration per item (ACS widths may differ); small problems, not a hot path
        rows = int(n[b]) if calib_rows is None else int(calib_rows)
        rows = max(k + 1, min(H, rows))
        top = (H - rows + 1) // 2
        acs = kspace[b, :, top: top + rows, int(start[b]): int(start[b] + n[b])]
        kernels.append(_calibration_kernels(acs, k, threshold))
    w = torch.stack(kernels).to(torch.complex64)  # (B, C, C, K, K), K = 2k - 1
    # G(x) = Σ_Δ w(Δ) exp(2πi Δ·x / N) (= √(HW) F⁻¹(w) with centred indices), separable: rows, then columns.
    e_rows, e_cols = _fourier_phases(H, k, kspace.device), _fourier_phases(W, k, kspace.device)
    half = torch.einsum("hK,bcdKL->bhLcd", e_rows, w)  # (B, H, K, C, C)
    vecs = torch.empty(B, H, W, C, dtype=torch.complex64, device=kspace.device)
    vals = torch.empty(B, H, W, dtype=torch.float32, device=kspace.device)
    rows_per_chunk = max(1, int(chunk_pixels) // W)
    for b in range(B):
        for r in range(0, H, rows_per_chunk):
            g = torch.einsum("wL,hLcd->hwcd", e_cols, half[b, r: r + rows_per_chunk])  # (rows, W, C, C)
            g = 0.5 * (g + g.conj().transpose(-1, -2))  # exactly Hermitian for eigh
            lam, v = torch.linalg.eigh(g)
            vals[b, r: r + rows_per_chunk], vecs[b, r: r + rows_per_chunk] = lam[..., -1], v[..., -1]
    maps = vecs.permute(0, 3, 1, 2)
    ref = lowres_maps(kspace, mask, num_low_frequencies)
    inner = (ref.conj() * maps).sum(1, keepdim=True)  # ⟨ŝ_lowres, s⟩ per pixel
    phase = torch.where(inner.abs() > 0, inner.conj() / inner.abs().clamp_min(1e-30), torch.ones_like(inner))
    keep = (vals.reshape(B, 1, H, W) >= crop).to(maps.real.dtype)
    return (maps * phase * keep).contiguous()


def estimate_maps(kspace: Tensor, mask: Tensor | None = None, method: str = "espirit",
                  num_low_frequencies: int | None = None, **options) -> Tensor:
    """Sensitivity maps by name: ``"full"`` (:func:`maps_from_coil_images` of ``ifft2c(kspace)``, for fully
    sampled k-space; ``mask`` must then be ``None``), ``"lowres"`` (:func:`lowres_maps`) or ``"espirit"``
    (:func:`espirit_maps`); ``options`` go to the estimator. Returns complex ``(B, C, H, W)``."""
    if method not in MAP_ESTIMATORS:
        raise BlindspotError(None, f"unknown coil-map estimator {method!r}; choose from {', '.join(MAP_ESTIMATORS)}")
    if method == "full":
        _check_kspace(kspace)
        if mask is not None and not bool(column_mask(mask).all()):
            raise BlindspotError(None, "the 'full' coil-map estimator needs fully sampled k-space")
        return maps_from_coil_images(ifft2c(kspace), **options)
    if method == "lowres":
        return lowres_maps(kspace, mask, num_low_frequencies, **options)
    return espirit_maps(kspace, mask, num_low_frequencies, **options)


def coil_kspace(truth: Tensor, maps: Tensor) -> Tensor:
    """Fully sampled multi-coil k-space ``F(S_c · y)`` of truths ``(B, 1, H, W)`` (real or complex) through maps
    ``(B, C, H, W)``: complex ``(B, C, H, W)``."""
    return fft2c(maps * truth)


__all__ = ["MAP_ESTIMATORS", "RSS_FLOOR", "acs_columns", "calibration_box", "coil_kspace", "column_mask",
           "espirit_maps",
           "estimate_maps", "hann_columns", "keep_columns", "low_frequency_columns", "lowres_maps",
           "maps_from_coil_images"]
