"""Image-domain invariance reconstruction (DESIGN.md §1.3): large input changes that leave a network's output alone.

For a network ``f`` and an image ``x`` the attack solves

    x_inv = argmin  ‖f(x) − f(x_inv)‖ − α · D(x, x_inv),      started at  x_inv⁰ = x + n,  n ~ N(0, σ₀²)

with Adam, where ``‖·‖`` (the *fidelity*) and ``D`` are bounded distances from :mod:`blindspot.attacks.distances`
(bounded MSE, ``(1 − SSIM)/2``, VGG16 perceptual). The seed writes the start noise as ``N(0, 10⁻²)``: a variance
of 10⁻², i.e. ``σ₀ = 0.1`` normalised units.

What is optimised is a *target*: any callable ``target(x, items) -> output`` on a batch ``(n, C, H, W)`` whose
row ``k`` belongs to image ``items[k]`` of the batch (so per-image context such as an MRI mask can follow the row):

* :class:`DenoiserTarget` — a CT denoiser on normalised low-dose images: ``f(x)`` (the source document optimises
  the low-dose input itself).
* :class:`MRITarget` — any MRI reconstruction network (image, image + mask or k-space convention, through
  :class:`~blindspot.models.adapters.Network`) seen through its acquisition
  (:class:`~blindspot.physics.acquisition.CartesianMRI`), ``f ∘ N ∘ A``, optimised on the *true* image ``y`` (in
  the units of the clean zero-filled input's normalisation); it also splits an invariance with the acquisition's
  null-space projector into the part the sampling mask already hides and the part the network ignores.

Every image gets ``restarts`` independent starts; images × restarts are optimised together as one tensor batch on
the target's device. Convergence is checked every ``window`` iterations: a row stops (and leaves the batch) once
``|J_t − J_{t−window}| ≤ max(tol·|J_t|, atol)`` for its objective ``J``, after at least ``min_iterations``.
Because Adam and the summed objective act on each row separately, a row's trajectory does not depend on the other
rows, and its start noise comes from a generator seeded by ``(seed, item_id)``, so the same seed and image give the
same invariance whatever the batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from blindspot.attacks.distances import Distance
from blindspot.errors import BlindspotError
from blindspot.models.adapters import Network, as_network, check_finite_output
from blindspot.physics.acquisition import CartesianMRI
from blindspot.physics.mri import NormStats, mask_on_grid


# ----------------------------------------------------------------------------------------------------------------
# Targets: what the optimisation differentiates through
# ----------------------------------------------------------------------------------------------------------------
class InvarianceTarget(Protocol):
    """``target(x, items) -> out``: ``x`` ``(n, C, H, W)`` normalised; ``items`` ``(n,)`` long, row → image index."""

    def __call__(self, x: Tensor, items: Tensor) -> Tensor: ...


class DenoiserTarget(nn.Module):
    """A CT denoiser (or any image-to-image network) as an invariance target: ``f(x)`` on normalised low-dose
    images ``(n, 1, H, W)``, the source document's set-up (the low-dose input itself is optimised).

    Args:
        model: the network, an ``nn.Module`` or an image-convention :class:`~blindspot.models.adapters.Network`.
    """

    def __init__(self, model: "nn.Module | Network") -> None:
        super().__init__()
        net = as_network(model)
        if net.convention != "image":
            raise BlindspotError(net.name, f"takes the {net.convention} convention; optimise its invariances "
                                           "through the acquisition with MRITarget")
        self.model = net.module
        self.name = net.name

    def forward(self, x: Tensor, items: Tensor | None = None) -> Tensor:
        return self.model(x)


class MRITarget(nn.Module):
    """An MRI reconstruction network through its acquisition, ``u ↦ f(N(A(y(u))))``, for invariances of the truth.

    Works for every network convention (image, image + mask, k-space; see :mod:`blindspot.models.adapters`):
    the change is made to the true image, the acquisition (:class:`~blindspot.physics.acquisition.CartesianMRI`,
    single- or multi-coil) turns it into the measurements, and the network sees them in its own convention.

    The variable ``u`` is the true image in the units of the clean zero-filled input's normalisation,
    ``u = (y − μ)/σ`` with ``(μ, σ)`` from ``A(y)``; the output is the reconstruction in the same units
    ``(n, 1, h, w)``. With ``renormalize`` (the default, as a deployed pipeline would) the network input is
    re-normalised with the statistics of the *perturbed* zero-filled image, and the output is mapped back through them.

    Args:
        model: the reconstruction network: an ``nn.Module`` (its declared convention) or a
            :class:`~blindspot.models.adapters.Network`.
        truth: true magnitude images ``(B, 1, H, W)`` in the data's units.
        acquisition: a :class:`~blindspot.physics.acquisition.CartesianMRI` (one mask for all or one per image;
            optional coils and crop), or masks — columns ``(B, 1, 1, W)``, ``(1, W)``, ``(W,)`` or 2-D ``(B, 1, H, W)``,
            ``(H, W)`` — mapped onto the truth's grid by spatial frequency
            (:func:`~blindspot.physics.mri.mask_on_grid`; k-space is then simulated from the truth as ``F(y)``, as the
            FNAF attack does).
        renormalize: re-normalise each perturbed input with its own statistics (else keep the clean ones).

    Attributes:
        acquisition: the per-image acquisition (``B`` items); ``mean``, ``std``: ``(B, 1, 1, 1)`` clean statistics.
    """

    def __init__(self, model: "nn.Module | Network", truth: Tensor, acquisition: "CartesianMRI | Tensor",
                 renormalize: bool = True) -> None:
        super().__init__()
        if truth.ndim != 4 or truth.shape[1] != 1:
            raise BlindspotError(None, f"MRI truth must be (B, 1, H, W), got {tuple(truth.shape)}")
        B = truth.shape[0]
        if not isinstance(acquisition, CartesianMRI):
            acquisition = CartesianMRI(mask_on_grid(torch.as_tensor(acquisition, device=truth.device), truth.shape[-2:]))
        if len(acquisition) not in (1, B):
            raise BlindspotError(None, f"{len(acquisition)} masks for {B} images")
        acquisition = acquisition.to(truth.device)
        if len(acquisition) == 1:
            acquisition = acquisition.select(torch.zeros(B, dtype=torch.long))
        self.network = as_network(model)
        self.network.check(acquisition)
        self.model = self.network.module  # a sub-module, so that the attack freezes its parameters
        self.name = self.network.name
        self.acquisition = acquisition
        self.renormalize = bool(renormalize)
        self._selected: tuple[Tensor, CartesianMRI] | None = None
        with torch.no_grad():
            stats = acquisition.normalization(acquisition.measure(truth))
        self.clamp = stats.clamp
        self.register_buffer("mean", stats.mean, persistent=False)
        self.register_buffer("std", stats.std, persistent=False)
        self.register_buffer("truth", truth, persistent=False)

    @property
    def x(self) -> Tensor:
        """The clean truth in normalised units, ``(B, 1, H, W)``: the attack's starting point."""
        return (self.truth - self.mean) / self.std

    @property
    def mask(self) -> Tensor:
        """The column masks ``(B, 1, 1, W)``."""
        return self.acquisition.mask

    def rows(self, items: Tensor) -> CartesianMRI:
        """The acquisition of rows ``items`` ``(n,)``; the last selection is kept, since the attack calls the target
        with the same rows every iteration until some converge (no re-indexing, no host sync per iteration)."""
        if self._selected is None or self._selected[0] is not items:
            self._selected = (items, self.acquisition.select(items))
        return self._selected[1]

    def zero_filled(self, u: Tensor, items: Tensor) -> Tensor:
        """``A(y(u))`` in the clean input's normalised units (not clamped), ``(n, 1, h, w)``."""
        mean, std = self.mean[items], self.std[items]
        return (self.rows(items).measure(u * std + mean).image - mean) / std

    def forward(self, u: Tensor, items: Tensor) -> Tensor:
        mean, std = self.mean[items], self.std[items]
        acq = self.rows(items)
        meas = acq.measure(u * std + mean)  # data units
        stats = acq.normalization(meas) if self.renormalize else NormStats(mean, std, self.clamp)
        x = stats.apply(meas.image)
        out = self.network(acq, meas, x, stats)
        return (stats.invert(out) - mean) / std

    def decompose(self, d: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """Split a change of the truth ``d`` ``(n, 1, H, W)`` into (null-space, range-space) parts, both complex.

        The null-space part (:meth:`~blindspot.physics.acquisition.Acquisition.null_space`, ``F⁻¹((1 − M)F d)``)
        is invisible to the acquisition; the range-space part ``d − null`` reaches the network. They are
        orthogonal: ``‖d‖² = ‖null‖² + ‖range‖²``.
        """
        null = self.rows(items).null_space(d)
        return null, d - null


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration (restored afterwards)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    for p, _ in flags:
        p.requires_grad_(False)
    module.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# Configuration and result
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InvarianceConfig:
    """Settings of the image-domain optimisation.

    Attributes:
        alpha: weight ``α`` of the distance reward.
        iterations: maximum Adam iterations (the seed's 3000).
        lr: Adam learning rate (normalised units per step, roughly).
        restarts: independent starts per image (several invariances per image).
        init_std: standard deviation ``σ₀`` of the start noise, normalised units (seed: variance 10⁻²).
        tol, atol, window, min_iterations: early stop — a row stops once its objective changed by at most
            ``max(tol·|J|, atol)`` over the last ``window`` iterations, checked every ``window`` iterations
            from ``min_iterations`` on.
        bounds: optional ``(low, high)`` box for ``x_inv`` in normalised units (e.g. −1024 HU … 3071 HU),
            enforced by projection after every step.
        seed: seed of the start noise.
        progress: show a tqdm bar (auto-disabled when not on a terminal).
    """

    alpha: float = 1.0
    iterations: int = 3000
    lr: float = 1e-2
    restarts: int = 1
    init_std: float = 0.1
    tol: float = 1e-4
    atol: float = 1e-7
    window: int = 100
    min_iterations: int = 300
    bounds: tuple[float, float] | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.restarts < 1 or self.window < 1:
            raise BlindspotError(None, "iterations, restarts and window must be at least 1")
        if not (self.lr > 0 and self.alpha >= 0 and self.init_std >= 0 and self.tol >= 0):
            raise BlindspotError(None, "lr must be positive; alpha, init_std and tol non-negative")
        if self.bounds is not None and not self.bounds[0] < self.bounds[1]:
            raise BlindspotError(None, f"bounds {self.bounds} must be (low, high) with low < high")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class InvarianceResult:
    """Invariances of a batch of ``B`` images with ``R`` restarts each (all tensors on the CPU, normalised units).

    Attributes:
        x: clean inputs ``(B, C, H, W)``.
        x_inv: invariances ``(B, R, C, H, W)``.
        f_x: clean outputs ``(B, C', H', W')``.
        f_x_inv: outputs of the invariances ``(B, R, C', H', W')``.
        distance: ``D(x, x_inv)`` ``(B, R)``.
        fidelity: ``‖f(x) − f(x_inv)‖`` in the fidelity distance ``(B, R)``.
        objective: ``fidelity − α·distance`` ``(B, R)``.
        iterations: Adam iterations each row ran ``(B, R)``.
        converged: whether the row stopped by the early-stop rule ``(B, R)``.
        field: the field of view the attack was given, bool ``(B, 1, H, W)`` (``True`` = image), or ``None``.
    """

    x: Tensor
    x_inv: Tensor
    f_x: Tensor
    f_x_inv: Tensor
    distance: Tensor
    fidelity: Tensor
    objective: Tensor
    iterations: Tensor
    converged: Tensor
    field: Tensor | None = None

    @property
    def delta(self) -> Tensor:
        """``x_inv − x``, ``(B, R, C, H, W)``."""
        return self.x_inv - self.x.unsqueeze(1)

    @property
    def output_delta(self) -> Tensor:
        """``f(x_inv) − f(x)``, ``(B, R, C', H', W')``."""
        return self.f_x_inv - self.f_x.unsqueeze(1)

    def restart_std(self) -> Tensor:
        """Pixel-wise standard deviation of ``x_inv`` over restarts, ``(B, C, H, W)`` (zeros when ``R = 1``)."""
        if self.x_inv.shape[1] < 2:
            return torch.zeros_like(self.x)
        return self.x_inv.std(dim=1)

    def metrics(self, scale: float = 1.0) -> dict[str, Tensor]:
        """Per-row magnitudes ``(B, R)``; differences are multiplied by ``scale`` (HU per normalised unit for CT).

        Keys: ``mean_abs_change`` (mean |x_inv − x|), ``max_abs_change``, ``rms_change``, ``output_mean_abs_change``
        (mean |f(x_inv) − f(x)|), ``output_rms_change``, ``distance``, ``fidelity``, ``objective``,
        ``change_ratio`` (RMS output change / RMS input change: ≪ 1 for an invariance). With a :attr:`field`, means
        and maxima are over the pixels inside it only (when the output has the input's size).
        """
        d, od = self.delta.flatten(2), self.output_delta.flatten(2)
        w_in = w_out = None
        if self.field is not None:
            w_in = self.field.to(d.dtype).flatten(1).unsqueeze(1).expand(-1, d.shape[1], -1)  # (B, R, C·H·W)
            if d.shape[-1] != w_in.shape[-1]:
                w_in = w_in.repeat(1, 1, d.shape[-1] // w_in.shape[-1])
            if od.shape[-1] == d.shape[-1]:
                w_out = w_in

        def mean(v: Tensor, w: Tensor | None) -> Tensor:
            return v.mean(-1) if w is None else (v * w).sum(-1) / w.sum(-1).clamp_min(1)

        rms_in, rms_out = mean(d.square(), w_in).sqrt(), mean(od.square(), w_out).sqrt()
        return {
            "mean_abs_change": mean(d.abs(), w_in) * scale,
            "max_abs_change": (d.abs() if w_in is None else d.abs() * w_in).amax(-1) * scale,
            "rms_change": rms_in * scale,
            "output_mean_abs_change": mean(od.abs(), w_out) * scale,
            "output_rms_change": rms_out * scale,
            "change_ratio": rms_out / rms_in.clamp_min(1e-12),
            "distance": self.distance,
            "fidelity": self.fidelity,
            "objective": self.objective,
        }


# ----------------------------------------------------------------------------------------------------------------
# The optimisation
# ----------------------------------------------------------------------------------------------------------------
def start_noise(shape: Sequence[int], restarts: int, item_ids: Sequence[int], std: float, seed: int) -> Tensor:
    """Start noise ``(len(item_ids)·restarts, *shape)`` on the CPU; rows of item ``i`` come from seed ``(seed, i)``."""
    chunks = []
    for item in item_ids:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(item)) % (2**63 - 1))
        chunks.append(torch.randn((restarts, *shape), generator=g) * std)
    return torch.cat(chunks, dim=0)


class InvarianceAttack:
    """The image-domain invariance attack, configured once and called on (target, batch).

    Args:
        distance: ``D`` — how far the invariance must move the input.
        fidelity: ``‖·‖`` — how little the output may move; ``None`` uses ``distance`` (as the seed does).
        config: optimisation settings.

    Call ``attack(target, x, region=None, item_ids=None)``:
        target: an :class:`InvarianceTarget` (e.g. :class:`DenoiserTarget`, :class:`MRITarget`) on ``x``'s device.
        x: clean inputs ``(B, C, H, W)``, normalised units.
        region: optional mask of the pixels the invariance may change, ``(H, W)``, ``(1, 1, H, W)`` or
            ``(B, 1, H, W)`` (non-zero = free); the rest of ``x_inv`` equals ``x`` exactly.
        item_ids: global indices of the images (seed the start noise); default ``0 … B−1``.
        field: optional field of view (CT: the reconstructed circle), bool ``(B, 1, H, W)``, ``True`` = image.
            Pixels outside it are not image: the invariance never changes them (the region is cut to the field),
            the fidelity ignores the output there (it is compared as if unchanged), and the result's metrics leave
            them out. The field must fit ``x``; the output must have ``x``'s size for the output part.

    The network's outputs are checked once per call (clean) and once at the end (invariances): a non-finite output
    is a :class:`BlindspotError` naming the network; per-iteration outputs are not checked (that would cost a
    device sync per step), but a non-finite objective ends in the same error.
    """

    def __init__(self, distance: Distance, fidelity: Distance | None = None, config: InvarianceConfig | None = None):
        self.distance = distance
        self.fidelity = fidelity if fidelity is not None else distance
        self.config = config or InvarianceConfig()

    def __call__(
        self,
        target: InvarianceTarget,
        x: Tensor,
        region: Tensor | None = None,
        item_ids: Sequence[int] | None = None,
        field: Tensor | None = None,
    ) -> InvarianceResult:
        cfg = self.config
        if x.ndim != 4:
            raise BlindspotError(None, f"images must be (B, C, H, W), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise BlindspotError(None, "images contain NaN or Inf")
        B, R = x.shape[0], cfg.restarts
        device = x.device
        item_ids = list(range(B)) if item_ids is None else [int(i) for i in item_ids]
        if len(item_ids) != B:
            raise ValueError(f"{len(item_ids)} item ids for {B} images")
        x = x.detach()
        if field is not None:
            field = torch.as_tensor(field, device=device)
            if tuple(field.shape) != (B, 1, *x.shape[-2:]):
                raise BlindspotError(None, f"field of view {tuple(field.shape)} does not fit images {tuple(x.shape)}")
            field = field != 0
            if bool(field.all()):
                field = None
        if field is not None:
            region = field if region is None else _region_rows(region, x, 1).bool() & field
        free = None if region is None else _region_rows(region, x, R)
        name = getattr(target, "name", None) or type(getattr(target, "model", target)).__name__
        module = target if isinstance(target, nn.Module) else nn.Module()
        with _frozen(module), contextlib.ExitStack() as stack:
            stack.enter_context(_frozen(self.distance))
            if self.fidelity is not self.distance:
                stack.enter_context(_frozen(self.fidelity))
            items_all = torch.arange(B, device=device).repeat_interleave(R)
            with torch.no_grad():
                f_x = target(x, torch.arange(B, device=device))
            check_finite_output(f_x, name, "the clean images")
            x_rep = x.repeat_interleave(R, dim=0)
            f_rep = f_x.repeat_interleave(R, dim=0)
            out_field = None
            if field is not None and f_x.shape[-2:] == x.shape[-2:]:
                out_field = field.repeat_interleave(R, dim=0).to(x.dtype)
            noise = start_noise(x.shape[1:], R, item_ids, cfg.init_std, cfg.seed).to(device=device, dtype=x.dtype)
            final_delta, iters, converged = self._optimise(target, x_rep, f_rep, items_all, free, noise, out_field)
            with torch.no_grad():
                x_inv = x_rep + (final_delta if free is None else free * final_delta)
                f_inv = target(x_inv, items_all)
                check_finite_output(f_inv, name, "the invariances")
                fid = self.fidelity(_in_field(f_inv, f_rep, out_field), f_rep)
                dist = self.distance(x_inv, x_rep)
        shape = lambda t: t.reshape(B, R, *t.shape[1:]).cpu()  # noqa: E731
        return InvarianceResult(
            x=x.cpu(),
            x_inv=shape(x_inv),
            f_x=f_x.detach().cpu(),
            f_x_inv=shape(f_inv),
            distance=shape(dist),
            fidelity=shape(fid),
            objective=shape(fid - cfg.alpha * dist),
            iterations=shape(iters),
            converged=shape(converged),
            field=None if field is None else field.cpu(),
        )

    def _objective(self, target, x_inv: Tensor, x_ref: Tensor, f_ref: Tensor, items: Tensor,
                   out_field: Tensor | None = None) -> Tensor:
        out = _in_field(target(x_inv, items), f_ref, out_field)
        return self.fidelity(out, f_ref) - self.config.alpha * self.distance(x_inv, x_ref)

    def _optimise(
        self, target, x_rep: Tensor, f_rep: Tensor, items_all: Tensor, free: Tensor | None, noise: Tensor,
        out_field: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Adam on the change ``δ`` (``x_inv = x + free ⊙ δ``) of every row; converged rows leave the batch."""
        cfg = self.config
        rows = x_rep.shape[0]
        device = x_rep.device
        final_delta = noise.clone()
        iters = torch.full((rows,), cfg.iterations, dtype=torch.long)
        converged = torch.zeros(rows, dtype=torch.bool)
        active = torch.arange(rows, device=device)
        xa, fa, ia, ma, oa = x_rep, f_rep, items_all, free, out_field
        delta = noise.clone().requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=cfg.lr)
        if cfg.bounds is not None:
            with torch.no_grad():
                delta.copy_(self._project(xa, delta, ma))
        prev: Tensor | None = None
        bar = tqdm(total=cfg.iterations, desc="invariances", unit="it", disable=(not cfg.progress) or None, leave=False)
        try:
            for t in range(cfg.iterations):
                x_inv = xa + (delta if ma is None else ma * delta)
                obj = self._objective(target, x_inv, xa, fa, ia, oa)
                opt.zero_grad(set_to_none=True)
                obj.sum().backward()
                opt.step()
                if cfg.bounds is not None:
                    with torch.no_grad():
                        delta.copy_(self._project(xa, delta, ma))
                bar.update(1)
                if (t + 1) % cfg.window:
                    continue
                cur = obj.detach()
                if not bool(torch.isfinite(cur).all()):  # one check per window, with the convergence test's sync
                    raise BlindspotError(getattr(target, "name", None) or type(getattr(target, "model", target)).__name__,
                                         f"the objective became NaN or Inf at iteration {t + 1} (non-finite network "
                                         "output or gradient)")
                bar.set_postfix(objective=f"{float(cur.mean()):.4g}", active=int(active.numel()))
                if prev is None or t + 1 < cfg.min_iterations:
                    prev = cur
                    continue
                done = (cur - prev).abs() <= torch.maximum(cfg.tol * cur.abs(), torch.full_like(cur, cfg.atol))
                if bool(done.any()):
                    rows_done = active[done]
                    final_delta[rows_done] = delta.detach()[done]
                    iters[rows_done.cpu()] = t + 1
                    converged[rows_done.cpu()] = True
                    keep = (~done).nonzero().squeeze(1)
                    if keep.numel() == 0:
                        active = keep
                        break
                    active = active[keep]
                    xa, fa, ia = xa[keep], fa[keep], ia[keep]
                    ma = None if ma is None else ma[keep]
                    oa = None if oa is None else oa[keep]
                    delta, opt = _compact_adam(delta, opt, keep)
                    cur = cur[keep]
                prev = cur
        finally:
            bar.close()
        if active.numel():
            final_delta[active] = delta.detach()
        return final_delta, iters, converged

    def _project(self, x: Tensor, delta: Tensor, free: Tensor | None) -> Tensor:
        lo, hi = self.config.bounds  # type: ignore[misc]
        moved = (x + delta).clamp(lo, hi) - x
        return moved if free is None else torch.where(free > 0, moved, delta)


def _in_field(out: Tensor, ref: Tensor, out_field: Tensor | None) -> Tensor:
    """``out`` inside the field of view and ``ref`` outside it (so out-of-field output changes count for nothing)."""
    return out if out_field is None else ref + out_field * (out - ref)


def _compact_adam(delta: Tensor, opt: torch.optim.Adam, keep: Tensor) -> tuple[Tensor, torch.optim.Adam]:
    """Keep rows ``keep`` of the optimised tensor and of Adam's moment estimates (the step count is shared)."""
    state = opt.state[delta]
    new = delta.detach()[keep].clone().requires_grad_(True)
    new_opt = torch.optim.Adam([new], **{k: v for k, v in opt.defaults.items() if k in ("lr", "betas", "eps")})
    new_state = {}
    for key, value in state.items():
        new_state[key] = value.clone() if key == "step" or value.ndim == 0 else value[keep].clone()
    new_opt.state[new] = new_state
    return new, new_opt


def _region_rows(region: Tensor, x: Tensor, restarts: int) -> Tensor:
    """A region mask as ``(B·R, 1, H, W)`` float 0/1 on ``x``'s device."""
    region = torch.as_tensor(region, device=x.device)
    B, _, H, W = x.shape
    if region.ndim == 2:
        region = region.reshape(1, 1, H, W) if region.shape == (H, W) else region
    if region.ndim != 4 or region.shape[-2:] != (H, W) or region.shape[0] not in (1, B) or region.shape[1] != 1:
        raise BlindspotError(None, f"region mask of shape {tuple(region.shape)} does not fit images {tuple(x.shape)}")
    region = (region != 0).to(x.dtype).expand(B, 1, H, W)
    if not bool(region.any()):
        raise BlindspotError(None, "region mask selects no pixel")
    return region.repeat_interleave(restarts, dim=0)


# ----------------------------------------------------------------------------------------------------------------
# Regions and the Gaussian + RI known answer
# ----------------------------------------------------------------------------------------------------------------
def square_mask(height: int, width: int, size: int, inset: int = 0) -> Tensor:
    """Bool ``(height, width)`` mask of the central ``size``×``size`` square shrunk by ``inset`` pixels per side
    (a negative ``inset`` grows it). The square's top-left corner is ``((height − size)//2, (width − size)//2)``."""
    top, left = (height - size) // 2, (width - size) // 2
    r0, r1 = max(top + inset, 0), min(top + size - inset, height)
    c0, c1 = max(left + inset, 0), min(left + size - inset, width)
    m = torch.zeros(height, width, dtype=torch.bool)
    if r1 > r0 and c1 > c0:
        m[r0:r1, c0:c1] = True
    return m


def box_mask(height: int, width: int, top: int, left: int, box_h: int, box_w: int) -> Tensor:
    """Bool ``(height, width)`` mask of one axis-aligned box; raises :class:`BlindspotError` if it leaves the image."""
    if box_h < 1 or box_w < 1 or top < 0 or left < 0 or top + box_h > height or left + box_w > width:
        raise BlindspotError(None, f"box {top},{left},{box_h},{box_w} does not fit a {height}x{width} image")
    m = torch.zeros(height, width, dtype=torch.bool)
    m[top : top + box_h, left : left + box_w] = True
    return m


def local_mean(d: Tensor, window: int = 5) -> Tensor:
    """``window``×``window`` local mean of ``d`` ``(..., H, W)`` (valid part, ``(..., H−w+1, W−w+1)``)."""
    lead = d.shape[:-2]
    flat = d.reshape(-1, 1, *d.shape[-2:])
    return F.avg_pool2d(flat, window, stride=1).reshape(*lead, *(s - window + 1 for s in d.shape[-2:]))


def square_contrast(
    delta: Tensor, square: int = 30, margin: int = 3, window: int = 5, field: Tensor | None = None
) -> dict[str, Tensor]:
    """How much an invariance concentrates inside the central square (the Gaussian + RI known answer).

    The structure of ``delta`` (``(..., H, W)``, e.g. ``x_inv − x``) is its ``window``×``window`` local mean; its
    mean absolute value is taken over windows lying wholly inside the square shrunk by ``margin`` px, and over
    windows lying wholly outside the square grown by ``margin`` px. Returns ``inside``, ``outside`` and their
    ``ratio`` (each ``delta.shape[:-2]``). With a field of view ``field`` (bool, ``(H, W)`` or
    ``(B, 1, H, W)`` for ``delta`` of ``(B, R, H, W)``), only windows wholly inside the field count.
    """
    H, W = delta.shape[-2:]
    lm = local_mean(delta, window).abs()
    # a window centred at (i + k, j + k), k = window // 2, covers [i, i + window) × [j, j + window)
    inner = square_mask(H, W, square, inset=margin).float()
    outer = (~square_mask(H, W, square, inset=-margin)).float()
    ones = torch.ones(1, 1, window, window)
    fully_in = F.conv2d(inner.reshape(1, 1, H, W), ones)[0, 0] >= window * window - 0.5
    fully_out = F.conv2d(outer.reshape(1, 1, H, W), ones)[0, 0] >= window * window - 0.5
    fully_in, fully_out = fully_in.to(lm.device).float(), fully_out.to(lm.device).float()
    if field is not None:
        f = field.to(lm.device).float().reshape(-1, 1, H, W)
        in_field = (F.conv2d(f, ones.to(lm.device)) >= window * window - 0.5).float()  # (B or 1, 1, h, w)
        in_field = in_field.reshape(*([in_field.shape[0]] + [1] * (lm.ndim - 3)), *in_field.shape[-2:]) \
            if lm.ndim >= 3 else in_field[0, 0]
        fully_in, fully_out = fully_in * in_field, fully_out * in_field
    inside = (lm * fully_in).sum((-2, -1)) / fully_in.sum((-2, -1)).clamp_min(1)
    outside = (lm * fully_out).sum((-2, -1)) / fully_out.sum((-2, -1)).clamp_min(1)
    return {"inside": inside, "outside": outside, "ratio": inside / outside.clamp_min(1e-12)}


def mri_decomposition(target: MRITarget, result: InvarianceResult) -> dict[str, Tensor]:
    """Split each MRI invariance ``u_inv − u`` into what the mask hides and what the network ignores.

    Returns ``(B, R)`` tensors in normalised units: ``null_mean_abs`` and ``range_mean_abs`` (mean modulus of the
    null- and range-space parts), ``null_energy_fraction`` (``‖null‖² / ‖δ‖²``), and ``input_mean_abs_change``
    (mean |A(y_inv) − A(y)|, the change the network actually receives).
    """
    B, R = result.x_inv.shape[:2]
    device = target.truth.device
    d = result.delta.reshape(B * R, *result.x.shape[1:]).to(device)
    items = torch.arange(B, device=device).repeat_interleave(R)
    with torch.no_grad():
        null, rng = target.decompose(d, items)
        x_inv = result.x_inv.reshape(B * R, *result.x.shape[1:]).to(device)
        zf_inv = target.zero_filled(x_inv, items)
        zf = target.zero_filled(result.x.to(device), torch.arange(B, device=device)).repeat_interleave(R, 0)
    dims = (1, 2, 3)
    e_null, e_rng = null.abs().square().sum(dims), rng.abs().square().sum(dims)
    out = {
        "null_mean_abs": null.abs().mean(dims),
        "range_mean_abs": rng.abs().mean(dims),
        "null_energy_fraction": e_null / (e_null + e_rng).clamp_min(1e-30),
        "input_mean_abs_change": (zf_inv - zf).abs().mean(dims),
    }
    return {k: v.reshape(B, R).cpu() for k, v in out.items()}


def null_range_images(target: MRITarget, result: InvarianceResult) -> tuple[Tensor, Tensor]:
    """Moduli of the null- and range-space parts of every invariance, each ``(B, R, 1, h, w)``, normalised units."""
    B, R = result.x_inv.shape[:2]
    device = target.truth.device
    d = result.delta.reshape(B * R, *result.x.shape[1:]).to(device)
    with torch.no_grad():
        null, rng = target.decompose(d, torch.arange(B, device=device).repeat_interleave(R))
    return null.abs().reshape(B, R, *d.shape[1:]).cpu(), rng.abs().reshape(B, R, *d.shape[1:]).cpu()
