"""Null-space hallucination maps: which part of a reconstruction the measurements constrain, and which part the
network invented (Bhadra et al., IEEE TMI 2021, "On hallucinations in tomographic image reconstruction").

For a truth ``y``, the network's reconstruction ``x̂ = f(N(A(y)))`` in the data's units and its error ``e = x̂ − y``,
the acquisition splits every image ``z`` into a measured part ``P_r z`` and an unmeasured part ``P_n z``
(:meth:`~blindspot.physics.acquisition.Acquisition.measured_split`; single-coil MRI: ``P_r = F⁻¹ M F``, the
range of the adjoint, and ``P_n = F⁻¹ (1 − M) F``, the null space of the acquisition; multi-coil MRI: the same split of
every coil image ``S_c z`` on the coil k-space grid). The two parts are orthogonal, so energies add up:
``‖e‖² = ‖P_r e‖² + ‖P_n e‖²`` (with ``Σ_c |S_c|² = 1`` on the object).

* ``‖P_r e‖²`` — the **measured error**: the reconstruction disagrees with the measurements. A data-consistent network
  has none.
* ``‖P_n e‖²`` — the **null-space error**, Bhadra et al.'s hallucination: structure the measurements cannot confirm
  or refute, which the network added (or failed to add). Its map ``|P_n e|`` (root-sum-of-squares over coils) shows
  where.
* ``‖P_n x̂‖²`` against ``‖P_n y‖²``: how much unmeasured content the network puts in, against what the truth has.

Energies are reported relative to ``‖y‖²`` (dimensionless). CT low-dose acquisitions measure every pixel (no null
space): :func:`hallucination_maps` refuses them with a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from blindspot.attacks.fnaf import Truths, as_truths, attack_acquisition
from blindspot.errors import BlindspotError
from blindspot.models.adapters import Network, as_network, eval_mode, model_device
from blindspot.physics.acquisition import Acquisition

#: Per-image quantities of :class:`HallucinationResult`, in the order of its records.
HALLUCINATION_COLUMNS: tuple[str, ...] = (
    "model", "key", "fname", "slice", "acceleration", "error", "measured_error", "null_error", "null_error_fraction",
    "output_null", "truth_null", "output_measured",
)  # fmt: skip


def energy(parts: Tensor) -> Tensor:
    """``Σ |z|²`` per item ``(B,)`` of real or complex ``(B, ...)``."""
    if parts.is_complex():
        return (parts.real.square() + parts.imag.square()).flatten(1).sum(1)
    return parts.square().flatten(1).sum(1)


def magnitude_map(parts: Tensor) -> Tensor:
    """Root-sum-of-squares over coils of complex ``(B, C, h, w)`` → real ``(B, 1, h, w)``."""
    return (parts.real.square() + parts.imag.square()).sum(1, keepdim=True).sqrt()


def split(acquisition: Acquisition, image: Tensor) -> tuple[Tensor, Tensor]:
    """``(measured, unmeasured)`` parts of ``image`` ``(B, 1, h, w)`` (:meth:`Acquisition.measured_split`), with a
    one-line error for an acquisition without a null space."""
    parts = acquisition.measured_split(image)
    if parts is None:
        raise BlindspotError(None, f"the {acquisition.modality.upper()} acquisition measures every pixel: it has no "
                                   "null space to split a reconstruction into")
    return parts


@dataclass
class HallucinationResult:
    """Range / null-space energies of ``B`` reconstructions (each ``(B,)`` float64 on the CPU, relative to ``‖y‖²``)
    and their maps.

    Attributes:
        keys, fname, slice_num, acceleration: identities (``acceleration`` float32 ``(B,)``).
        error: ``‖x̂ − y‖² / ‖y‖²`` (the NMSE).
        measured_error, null_error: ``‖P_r(x̂ − y)‖²`` and ``‖P_n(x̂ − y)‖²`` over ``‖y‖²`` (they add up to ``error``).
        output_null, truth_null, output_measured: ``‖P_n x̂‖²``, ``‖P_n y‖²``, ``‖P_r x̂‖²`` over ``‖y‖²``.
        maps: CPU ``(B, 1, h, w)`` images in the data's units: ``truth``, ``output``, ``null_error`` (``|P_n e|``),
            ``measured_error`` (``|P_r e|``), ``output_null`` (``|P_n x̂|``); ``None`` unless asked for.
    """

    keys: list[str]
    fname: list[str]
    slice_num: list[int]
    acceleration: Tensor
    error: Tensor
    measured_error: Tensor
    null_error: Tensor
    output_null: Tensor
    truth_null: Tensor
    output_measured: Tensor
    maps: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def null_error_fraction(self) -> Tensor:
        """Share of the error's energy in the null space ``(B,)`` (NaN for an exact reconstruction)."""
        return torch.where(self.error > 0, self.null_error / self.error.clamp_min(1e-300),
                           torch.full_like(self.error, float("nan")))

    def rows(self, model: str) -> list[dict[str, Any]]:
        """One record per image (:data:`HALLUCINATION_COLUMNS`)."""
        frac = self.null_error_fraction
        return [{"model": model, "key": k, "fname": f, "slice": int(s), "acceleration": float(a),
                 "error": float(self.error[i]), "measured_error": float(self.measured_error[i]),
                 "null_error": float(self.null_error[i]), "null_error_fraction": float(frac[i]),
                 "output_null": float(self.output_null[i]), "truth_null": float(self.truth_null[i]),
                 "output_measured": float(self.output_measured[i])}
                for i, (k, f, s, a) in enumerate(zip(self.keys, self.fname, self.slice_num,
                                                     self.acceleration.tolist()))]


def hallucination_maps(model: "nn.Module | Network", batch: Any, physics: Any = None,
                       return_maps: bool = False) -> HallucinationResult:
    """Split every reconstruction of ``batch`` and its error into measured and null-space parts.

    Args:
        model: any network (an ``nn.Module`` in its declared convention or a :class:`Network`); run in eval mode.
        batch: the truths (:func:`~blindspot.attacks.fnaf.as_truths`: an MRI batch, ``Truths`` or ``(B, 1, h, w)``).
        physics: the acquisition (:func:`~blindspot.attacks.fnaf.attack_acquisition`: an ``Acquisition``, a mask
            function seeded per volume, a mask, or ``None`` for the batch's own masks).
        return_maps: also return the maps (CPU).
    The network sees the normalised zero-filled input (or the k-space) as everywhere; its output is brought back to
    the data's units with the input's own statistics before it is compared with the truth.
    """
    net = as_network(model)
    truths: Truths = as_truths(batch)
    device = model_device(net.module, truths.image.device)
    y = truths.image.to(device=device, dtype=torch.float32)
    truths = replace(truths, image=y)
    acq = attack_acquisition(truths, physics)
    net.check(acq)
    with eval_mode(net.module), torch.no_grad():
        meas = acq.measure(y)
        x, stats = acq.network_input(meas)
        out = stats.invert(net(acq, meas, x, stats))
        if not torch.isfinite(out).all():
            raise BlindspotError(net.name, f"output contains NaN or Inf on {truths.keys[0]}")
        truth = acq.crop_image(y)
        err_r, err_n = split(acq, out - truth)
        out_r, out_n = split(acq, out)
        _, y_n = split(acq, truth)
        norm = energy(truth).clamp_min(1e-30)
        rel = lambda t: (energy(t) / norm).double().cpu()  # noqa: E731
        maps = None
        if return_maps:
            maps = {"truth": truth.cpu(), "output": out.cpu(), "null_error": magnitude_map(err_n).cpu(),
                    "measured_error": magnitude_map(err_r).cpu(), "output_null": magnitude_map(out_n).cpu()}
        acc = acq.accelerations.detach().cpu().to(torch.float32)
        acc = acc.expand(len(truths)) if acc.numel() == 1 else acc
        return HallucinationResult(
            keys=truths.keys, fname=list(truths.fname), slice_num=[int(s) for s in truths.slice_num],
            acceleration=acc, error=rel(out - truth), measured_error=rel(err_r), null_error=rel(err_n),
            output_null=rel(out_n), truth_null=rel(y_n), output_measured=rel(out_r), maps=maps)


__all__ = ["HALLUCINATION_COLUMNS", "HallucinationResult", "energy", "hallucination_maps", "magnitude_map", "split"]
