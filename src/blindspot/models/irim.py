"""I-RIM: the invertible recurrent inference machine (Putzky & Welling, *Invert to Learn to Invert*, NeurIPS 2019;
Putzky et al., *i-RIM applied to the fastMRI challenge*, 2019), the source document's second MRI model.

The machine state ``h`` is a ``(B, n_latent, H, W)`` tensor whose channel 0 is the current image estimate ``η``
(normalised units). It starts as ``[x, 0, …, 0]`` for the normalised zero-filled input ``x`` and is transformed by an
invertible chain::

    DC → [coupling_1 … coupling_L] → DC → … (n_steps times) … → DC

* **DC** (data-consistency update) adds the gradient of the data term ``½‖M F η − M F x‖²`` with respect to ``η``,
  ``P(η − x)`` with ``P = F⁻¹ M F`` on the image grid (the column or 2-D mask resampled onto the image grid by
  :func:`blindspot.physics.mri.mask_on_grid`), as two channels (real and imaginary part) to state channels 1–2.
  It reads only channel 0 and writes only channels 1–2, so it is inverted by subtracting the same gradient.
  ``P`` commutes with the affine input normalisation because the k-space centre (DC) column is always sampled.
* **coupling** layers are additive couplings conjugated by a learned orthogonal 1×1 mixing ``Q`` (a product of
  Householder reflections): ``h ↦ Qᵀ c(Q h)`` with ``c([a, b]) = [a, b + g(a)]``; ``g`` works at a down-sampling
  ``scale`` (strided conv → 3×3 conv → transpose conv → GLU, all weight-normalised), so a step mixes several scales
  like Putzky's invertible U-Net. Each step has its own weights.
* The output is ``η_final + head(h_final)`` with a small convolutional head whose last layer starts at zero and
  couplings whose last layer starts small, so an untrained I-RIM returns nearly the zero-filled input.

**Memory.** Because every layer is invertible, training does not keep activations: with ``memory_saving=True`` the
forward pass runs without building a graph and stores only the final state; the backward pass walks the chain in
reverse, reconstructing each layer's input from its output and back-propagating through that one layer (for a
coupling, inversion and gradient share a single evaluation of its residual function, since its input half passes
through unchanged). Activation memory is then that of one layer, whatever ``n_steps`` is; the price is one extra
evaluation of each residual function (``benchmarks/train_throughput.py`` measures both). Gradients
equal plain autograd's up to floating-point round-off (the inverses are exact in exact arithmetic). Gradients with
respect to the input ``x`` are supported (attacks need them); double back-propagation is not.

:data:`PRESETS` holds a small CPU-friendly configuration (the constructor's defaults) and the single-coil fastMRI
challenge sizes (``"paper"``: 8 steps, 64 latent channels, 12 couplings per step with hidden widths 64…1024 at
scales 1…8). The paper's model works on complex images and 4 virtual copies of the data; here the estimate is the
real normalised magnitude image of the project's model contract.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from blindspot.models.registry import register_model
from blindspot.physics.mri import fft2c, ifft2c, mask_on_grid

#: Hyper-parameter presets for :class:`IRIM` (keyword arguments of its constructor).
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(n_steps=4, n_latent=12, hidden_channels=[24, 24, 24], dilations=[1, 2, 4], n_householder=3,
                  head_channels=16),
    "paper": dict(n_steps=8, n_latent=64,
                  hidden_channels=[64, 64, 128, 128, 256, 1024, 1024, 256, 128, 128, 64, 64],
                  dilations=[1, 1, 2, 2, 4, 8, 8, 4, 2, 2, 1, 1], n_householder=3, head_channels=64),
}


# ----------------------------------------------------------------------------------------------------------------
# Invertible layers. Each has forward(h, x, m) and inverse(h, x, m); x, m are the data (only DC uses them).
# ----------------------------------------------------------------------------------------------------------------
class HouseholderMixing(nn.Module):
    """Orthogonal 1×1 convolution ``Q = H_1 ⋯ H_k`` with ``H_i = I − 2 v_i v_iᵀ / ‖v_i‖²``; ``Q⁻¹ = Qᵀ``.

    Args:
        n_channels: channels ``C`` mixed.
        n_reflections: number ``k`` of Householder vectors (at most ``C``).
    """

    def __init__(self, n_channels: int, n_reflections: int = 3) -> None:
        super().__init__()
        self.vectors = nn.Parameter(torch.randn(min(n_reflections, n_channels), n_channels))

    def matrix(self) -> Tensor:
        """``(C, C)`` orthogonal matrix."""
        v = self.vectors
        eye = torch.eye(v.shape[1], dtype=v.dtype, device=v.device)
        q = eye
        for i in range(v.shape[0]):
            vi = v[i : i + 1]  # (1, C)
            q = q @ (eye - 2.0 * vi.t() @ vi / (vi @ vi.t()))
        return q

    @staticmethod
    def apply_matrix(h: Tensor, q: Tensor) -> Tensor:
        """``(B, C, H, W)`` → ``(B, C, H, W)``: channel vector ``h[b, :, i, j]`` ↦ ``q @ h[b, :, i, j]``."""
        return F.conv2d(h, q[:, :, None, None])


class ScaleResidual(nn.Module):
    """The coupling function ``g``: ``(B, n_in, H, W)`` → ``(B, n_out, H, W)`` working at ``1/scale`` resolution.

    Weight-normalised strided ``scale×scale`` conv → ReLU → 3×3 conv → ReLU → ``scale×scale`` transpose conv to
    ``2·n_out`` channels → GLU. Any ``H, W`` (the transpose conv restores the exact input size).
    """

    def __init__(self, n_in: int, n_out: int, n_hidden: int, scale: int = 1) -> None:
        super().__init__()
        self.n_out, self.scale = n_out, scale
        self.down = weight_norm(nn.Conv2d(n_in, n_hidden, kernel_size=scale, stride=scale))
        self.mid = weight_norm(nn.Conv2d(n_hidden, n_hidden, kernel_size=3, padding=1))
        self.up = weight_norm(nn.ConvTranspose2d(n_hidden, 2 * n_out, kernel_size=scale, stride=scale, bias=False),
                              dim=1)
        with torch.no_grad():
            for conv in (self.down, self.mid, self.up):  # standard strides (DDP's gradient buckets expect them)
                g = conv.parametrizations.weight.original0
                g.data = g.data.clone(memory_format=torch.contiguous_format)
            self.up.parametrizations.weight.original0.mul_(0.1)  # start close to the identity coupling

    def forward(self, a: Tensor) -> Tensor:
        size = a.shape[-2:]
        if min(size) < self.scale:
            raise ValueError(f"image {tuple(size)} is smaller than the coupling scale {self.scale}")
        z = F.relu(self.down(a))
        z = F.relu(self.mid(z))
        z = self.up(z, output_size=list(size))
        return F.glu(z, dim=1)


class MixedCoupling(nn.Module):
    """``h ↦ Qᵀ c(Q h)``: additive coupling ``c([a, b]) = [a, b + g(a)]`` between learned orthogonal mixings.

    Args:
        n_channels: state channels ``C``; ``a`` is the first ``C // 2``.
        n_hidden: hidden channels of ``g``.
        scale: down-sampling factor of ``g``.
        n_householder: reflections in ``Q``.
    """

    uses_data = False

    def __init__(self, n_channels: int, n_hidden: int, scale: int = 1, n_householder: int = 3) -> None:
        super().__init__()
        self.n_left = n_channels // 2
        self.mix = HouseholderMixing(n_channels, n_householder)
        self.residual = ScaleResidual(self.n_left, n_channels - self.n_left, n_hidden, scale)

    def _couple(self, h: Tensor, sign: float) -> Tensor:
        q = self.mix.matrix()
        u = HouseholderMixing.apply_matrix(h, q)
        a, b = u[:, : self.n_left], u[:, self.n_left :]
        u = torch.cat([a, b + sign * self.residual(a)], dim=1)
        return HouseholderMixing.apply_matrix(u, q.t())

    def forward(self, h: Tensor, x: Tensor | None = None, m: Tensor | None = None) -> Tensor:
        return self._couple(h, 1.0)

    def inverse(self, h: Tensor, x: Tensor | None = None, m: Tensor | None = None) -> Tensor:
        return self._couple(h, -1.0)

    def backward_step(self, out: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """Invert and back-propagate in one pass, evaluating ``g`` once (not twice, as inverse + recompute would).

        Because ``a`` passes through the coupling unchanged, ``g(a)`` computed from the *output* is the ``g(a)`` of
        the forward pass, with the same Jacobian. Args: ``out`` ``(B, C, H, W)`` this layer's output, ``grad_out``
        ``∂L/∂out``. Returns ``(h, ∂L/∂h, [(parameter, ∂L/∂parameter), …])``.
        """
        k = self.n_left
        with torch.enable_grad():
            q = self.mix.matrix()
        qd = q.detach()
        v = HouseholderMixing.apply_matrix(out, qd)  # v = Q·out = c(Q h)
        grad_v = HouseholderMixing.apply_matrix(grad_out, qd)  # out = Qᵀ v  ⇒  ∂L/∂v = Q ∂L/∂out
        g_params = [p for p in self.residual.parameters() if p.requires_grad]
        with torch.enable_grad():
            a = v[:, :k].detach().requires_grad_(True)
            g = self.residual(a)
            grads = torch.autograd.grad(g, [a] + g_params, grad_v[:, k:])
        grad_u = torch.cat([grad_v[:, :k] + grads[0], grad_v[:, k:]], dim=1)
        u = torch.cat([v[:, :k], v[:, k:] - g.detach()], dim=1)
        h = HouseholderMixing.apply_matrix(u, qd.t())
        grad_h = HouseholderMixing.apply_matrix(grad_u, qd.t())  # u = Q h  ⇒  ∂L/∂h = Qᵀ ∂L/∂u
        pairs = list(zip(g_params, grads[1:]))
        if self.mix.vectors.requires_grad:
            # ∂L/∂Q through u = Q h and through out = Qᵀ v, then through Q(vectors).
            grad_q = torch.einsum("bchw,bdhw->cd", grad_u, h) + torch.einsum("bchw,bdhw->cd", v, grad_out)
            (grad_vectors,) = torch.autograd.grad(q, [self.mix.vectors], grad_q)
            pairs.append((self.mix.vectors, grad_vectors))
        return h, grad_h, pairs


class DataConsistencyUpdate(nn.Module):
    """Adds ``[Re, Im] P(η − x)`` (``η`` = state channel 0, ``P = F⁻¹ M F``) to state channels 1–2.

    ``x``: normalised zero-filled input ``(B, 1, H, W)``; ``m``: mask on the image grid, column ``(B|1, 1, 1, W)`` or
    2-D ``(B|1, 1, H, W)``.
    """

    uses_data = True

    @staticmethod
    def gradient(eta: Tensor, x: Tensor, m: Tensor) -> Tensor:
        """``(B, 1, H, W)`` real estimate → ``(B, 2, H, W)`` real/imaginary parts of ``F⁻¹ M F (η − x)``."""
        r = ifft2c(fft2c(eta - x) * m)
        return torch.cat([r.real, r.imag], dim=1).to(eta.dtype)

    def _update(self, h: Tensor, x: Tensor, m: Tensor, sign: float) -> Tensor:
        g = self.gradient(h[:, :1], x, m)
        return torch.cat([h[:, :1], h[:, 1:3] + sign * g, h[:, 3:]], dim=1)

    def forward(self, h: Tensor, x: Tensor, m: Tensor) -> Tensor:
        return self._update(h, x, m, 1.0)

    def inverse(self, h: Tensor, x: Tensor, m: Tensor) -> Tensor:
        return self._update(h, x, m, -1.0)


# ----------------------------------------------------------------------------------------------------------------
# Memory-saving back-propagation through the invertible chain
# ----------------------------------------------------------------------------------------------------------------
class _InvertibleChainFunction(torch.autograd.Function):
    """Runs ``model.chain_ops()`` without storing activations; the backward pass inverts layer by layer.

    Inputs: ``(model, h0, x, m, *params)`` with ``params = model.chain_parameters()``; output: the final state.
    """

    @staticmethod
    def forward(ctx, model: "IRIM", h: Tensor, x: Tensor, m: Tensor, *params: Tensor) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            for op in model.chain_ops():
                h = op(h, x, m)
        ctx.model = model
        ctx.params = params
        ctx.save_for_backward(h, x, m)
        return h

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        h, x, m = ctx.saved_tensors
        model: IRIM = ctx.model
        params: tuple[Tensor, ...] = ctx.params
        need_x = ctx.needs_input_grad[2]
        position = {id(p): i for i, p in enumerate(params)}
        param_grads: list[Tensor | None] = [None] * len(params)
        grad_x = torch.zeros_like(x) if need_x else None
        grad_h = grad_out
        for op in reversed(list(model.chain_ops())):
            if hasattr(op, "backward_step"):  # fused inverse + gradient
                h_in, grad_h, pairs = op.backward_step(h, grad_h)
                for p, g in pairs:
                    i = position[id(p)]
                    param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
                h = h_in
                continue
            with torch.no_grad():
                h_in = op.inverse(h, x, m)
            with torch.enable_grad():
                h_leaf = h_in.detach().requires_grad_(True)
                x_leaf = x.detach().requires_grad_(need_x and op.uses_data)
                out = op(h_leaf, x_leaf, m)
                op_params = [p for p in op.parameters() if p.requires_grad]
                inputs = [h_leaf] + ([x_leaf] if x_leaf.requires_grad else []) + op_params
                grads = torch.autograd.grad(out, inputs, grad_h, allow_unused=True)
            grad_h = grads[0] if grads[0] is not None else torch.zeros_like(h_in)
            rest = list(grads[1:])
            if x_leaf.requires_grad:
                gx = rest.pop(0)
                if gx is not None:
                    grad_x = grad_x + gx
            for p, g in zip(op_params, rest):
                if g is None:
                    continue
                i = position[id(p)]
                param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
            h = h_in
            del out, grads
        param_grads = [
            (torch.zeros_like(p) if g is None else g) if ctx.needs_input_grad[4 + i] else None
            for i, (p, g) in enumerate(zip(params, param_grads))
        ]
        ctx.model = ctx.params = None
        return (None, grad_h if ctx.needs_input_grad[1] else None, grad_x, None, *param_grads)


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
@register_model("irim", modality="mri")
class IRIM(nn.Module):
    """Invertible recurrent inference machine for single-channel (magnitude) MRI reconstruction.

    Args:
        n_steps: recurrent steps (each with its own coupling weights).
        n_latent: channels of the machine state (≥ 4: estimate, 2 gradient channels, at least one latent).
        hidden_channels: hidden width of each coupling in a step (one entry per coupling).
        dilations: down-sampling scale of each coupling (same length as ``hidden_channels``).
        n_householder: Householder reflections per orthogonal mixing.
        head_channels: hidden channels of the output head.
        memory_saving: back-propagate by inversion (constant activation memory in ``n_steps``); ``False`` keeps the
            plain autograd graph (same gradients, memory linear in ``n_steps``).

    ``forward(x, mask)``: normalised zero-filled input ``(B, 1, H, W)`` and column mask ``(B, 1, 1, W_k)`` (``W_k``
    = k-space width, resampled onto ``W``) or 2-D mask ``(B, 1, H_k, W_k)`` (resampled onto ``H × W``) → normalised
    reconstruction ``(B, 1, H, W)``.
    """

    uses_mask = True

    def __init__(
        self,
        n_steps: int = 4,
        n_latent: int = 12,
        hidden_channels: Sequence[int] = (24, 24, 24),
        dilations: Sequence[int] = (1, 2, 4),
        n_householder: int = 3,
        head_channels: int = 16,
        memory_saving: bool = True,
    ) -> None:
        super().__init__()
        hidden_channels, dilations = [int(c) for c in hidden_channels], [int(d) for d in dilations]
        if n_steps < 1 or n_latent < 4:
            raise TypeError(f"need n_steps >= 1 and n_latent >= 4, got {n_steps} and {n_latent}")
        if not hidden_channels or len(hidden_channels) != len(dilations) or min(dilations) < 1:
            raise TypeError("hidden_channels and dilations need one positive entry per coupling, of equal length")
        self.n_steps, self.n_latent = int(n_steps), int(n_latent)
        self.memory_saving = bool(memory_saving)
        self.dc = DataConsistencyUpdate()
        self.steps = nn.ModuleList(
            nn.ModuleList(MixedCoupling(n_latent, c, d, n_householder) for c, d in zip(hidden_channels, dilations))
            for _ in range(n_steps)
        )
        self.head = nn.Sequential(
            nn.Conv2d(n_latent, head_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(head_channels, 1, kernel_size=3, padding=1),
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "IRIM":
        """Build from :data:`PRESETS` (``"small"`` or ``"paper"``), optionally overriding entries."""
        return cls(**{**PRESETS[name], **overrides})

    # -- the invertible chain -------------------------------------------------------------------------------------
    def chain_ops(self) -> Iterator[nn.Module]:
        """The invertible layers in forward order: DC, then for each step its couplings followed by DC."""
        yield self.dc
        for step in self.steps:
            yield from step
            yield self.dc

    def chain_parameters(self) -> list[Tensor]:
        """Parameters of the chain (everything but the head), in a fixed order."""
        return [p for p in self.steps.parameters()]

    def run_chain(self, h: Tensor, x: Tensor, m: Tensor) -> Tensor:
        """Apply the chain to state ``h`` ``(B, n_latent, H, W)``; memory-saving when gradients are needed."""
        params = self.chain_parameters()
        needs_grad = torch.is_grad_enabled() and (
            h.requires_grad or x.requires_grad or any(p.requires_grad for p in params)
        )
        if self.memory_saving and needs_grad:
            return _InvertibleChainFunction.apply(self, h, x, m, *params)
        for op in self.chain_ops():
            h = op(h, x, m)
        return h

    def invert_chain(self, h: Tensor, x: Tensor, m: Tensor) -> Tensor:
        """Inverse of :meth:`run_chain` (no gradients): final state → initial state."""
        with torch.no_grad():
            for op in reversed(list(self.chain_ops())):
                h = op.inverse(h, x, m)
        return h

    # -- model contract --------------------------------------------------------------------------------------------
    @staticmethod
    def grid_mask(mask: Tensor, batch: int, width: int, like: Tensor) -> Tensor:
        """The mask on the image grid of ``like`` ``(B, 1, H, width)``, on its device and dtype
        (:func:`~blindspot.physics.mri.mask_on_grid`): a column mask ``(B|1, 1, 1, W_k)`` (or ``(W_k,)``,
        ``(1, W_k)``) → ``(B|1, 1, 1, width)``; a 2-D mask ``(B|1, 1, H_k, W_k)`` (or ``(H_k, W_k)``) →
        ``(B|1, 1, H, width)``."""
        mask = torch.as_tensor(mask, device=like.device)
        lead = mask.shape[0] if mask.ndim == 4 else 1
        if lead not in (1, batch):
            raise ValueError(f"mask batch {lead} does not match input batch {batch}")
        return mask_on_grid(mask, (like.shape[-2], width)).to(like.dtype)

    def initial_state(self, x: Tensor) -> Tensor:
        """``[x, 0, …, 0]``: ``(B, 1, H, W)`` → ``(B, n_latent, H, W)``."""
        B, _, H, W = x.shape
        return torch.cat([x, x.new_zeros(B, self.n_latent - 1, H, W)], dim=1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``(B, 1, H, W)`` normalised zero-filled input + ``(B, 1, 1, W_k)`` or ``(B, 1, H_k, W_k)`` mask →
        ``(B, 1, H, W)``."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"I-RIM expects (B, 1, H, W) input, got {tuple(x.shape)}")
        m = self.grid_mask(mask, x.shape[0], x.shape[-1], x)
        h = self.run_chain(self.initial_state(x), x, m)
        return h[:, :1] + self.head(h)
