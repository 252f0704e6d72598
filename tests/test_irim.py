"""I-RIM: invertibility, memory-saving gradients equal to plain autograd, constant activation memory, physics."""

import pytest
import torch

from blindspot.errors import BlindspotError

from blindspot.models.irim import PRESETS, IRIM, DataConsistencyUpdate, HouseholderMixing, MixedCoupling
from blindspot.models.adapters import network_convention, reconstruct
from blindspot.models.registry import build_model

TINY = dict(n_steps=2, n_latent=6, hidden_channels=[6, 6], dilations=[1, 2], head_channels=6)


def _mask(batch, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(batch, 1, 1, width, generator=g) < 0.35).float()
    m[..., width // 2 - 2 : width // 2 + 2] = 1.0
    return m


def _train_head(model):
    """Give the (zero-initialised) head non-zero weights so every part of the model carries gradient."""
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn_like(p) * 0.1)


def test_householder_is_orthogonal_and_coupling_inverts():
    torch.manual_seed(0)
    q = HouseholderMixing(6, 3).double().matrix()
    torch.testing.assert_close(q @ q.t(), torch.eye(6, dtype=torch.float64))
    layer = MixedCoupling(6, 8, scale=2).double()
    h = torch.randn(2, 6, 17, 14, dtype=torch.float64)  # odd sizes: the strided branch must restore them
    torch.testing.assert_close(layer.inverse(layer(h)), h)
    assert not torch.allclose(layer(h), h)


def test_whole_chain_inverts():
    torch.manual_seed(1)
    model = IRIM(**TINY).double()
    x = torch.randn(2, 1, 24, 24, dtype=torch.float64)
    m = model.grid_mask(_mask(2, 28), 2, 24, x)
    h0 = model.initial_state(x) + 0.1 * torch.randn(2, 6, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        h = model.run_chain(h0, x, m)
    torch.testing.assert_close(model.invert_chain(h, x, m), h0)


def test_recomputed_gradients_equal_plain_autograd():
    torch.manual_seed(2)
    model = IRIM(**TINY).double()
    _train_head(model)
    x = torch.randn(2, 1, 24, 20, dtype=torch.float64)
    target = torch.randn(2, 1, 24, 20, dtype=torch.float64)
    mask = _mask(2, 26)

    def run(memory_saving):
        model.memory_saving = memory_saving
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = model(xi, mask)
        ((out - target) ** 2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, xi.grad.clone()

    out_a, grads_a, gx_a = run(True)
    out_b, grads_b, gx_b = run(False)
    torch.testing.assert_close(out_a, out_b)
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(gx_a, gx_b, rtol=1e-9, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads_a.values())
    assert gx_a.abs().sum() > 0


def _saved_bytes(model, x, mask):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, mask).sum()
    return total


def test_activation_memory_is_constant_in_steps():
    x, mask = torch.randn(1, 1, 32, 32), _mask(1, 32)
    saved = {}
    for memory_saving in (True, False):
        for steps in (1, 2, 4):
            torch.manual_seed(0)
            model = IRIM(**{**TINY, "n_steps": steps}, memory_saving=memory_saving)
            saved[memory_saving, steps] = _saved_bytes(model, x, mask)
    assert saved[True, 1] == saved[True, 2] == saved[True, 4]
    assert saved[False, 4] > saved[False, 2] > saved[False, 1] > saved[True, 1]
    assert saved[False, 4] > 3 * saved[True, 4]


def test_untrained_model_returns_the_input_and_contract():
    torch.manual_seed(3)
    model = build_model("irim", **TINY)
    assert network_convention(model) == "image+mask"
    x = torch.randn(3, 1, 20, 20)
    with torch.no_grad():
        out = reconstruct(model, x, _mask(3, 24))
    # zero-initialised head and near-identity couplings: an untrained I-RIM stays close to the zero-filled input
    assert out.shape == x.shape and (out - x).abs().max() < 0.1 * x.abs().max()
    with pytest.raises(BlindspotError, match="mask"):
        reconstruct(model, x)


def test_data_consistency_gradient_known_answers():
    v = torch.randn(2, 1, 8, 10, dtype=torch.float64)
    x = torch.zeros_like(v)
    # Only the k-space centre column sampled: P v = each row's mean, spread over the row; imaginary part zero.
    m = torch.zeros(1, 1, 1, 10, dtype=torch.float64)
    m[..., 5] = 1
    g = DataConsistencyUpdate.gradient(v, x, m)
    torch.testing.assert_close(g[:, :1], v.mean(dim=-1, keepdim=True).expand_as(v))
    torch.testing.assert_close(g[:, 1:], torch.zeros_like(v))
    # P is a projection, and with the centre column sampled it commutes with an affine map a·v + b.
    m = _mask(1, 10, seed=4).double()
    Pv = DataConsistencyUpdate.gradient(v, x, m)
    P_of_Pv_real = DataConsistencyUpdate.gradient(Pv[:, :1], x, m)
    P_of_Pv_imag = DataConsistencyUpdate.gradient(Pv[:, 1:], x, m)
    torch.testing.assert_close(P_of_Pv_real[:, :1] - P_of_Pv_imag[:, 1:], Pv[:, :1])
    torch.testing.assert_close(DataConsistencyUpdate.gradient(3 * v + 2, x, m)[:, :1], 3 * Pv[:, :1] + 2)
    # A full mask gives the identity.
    torch.testing.assert_close(DataConsistencyUpdate.gradient(v, x, torch.ones(1, 1, 1, 10, dtype=torch.float64))[:, :1], v)


def test_presets():
    assert PRESETS["paper"]["n_steps"] == 8 and len(PRESETS["paper"]["hidden_channels"]) == 12
    assert len(PRESETS["paper"]["dilations"]) == 12 and max(PRESETS["paper"]["dilations"]) == 8
    small = IRIM.from_preset("small")
    assert small.n_steps == PRESETS["small"]["n_steps"]
    assert sum(len(s) for s in small.steps) == PRESETS["small"]["n_steps"] * len(PRESETS["small"]["dilations"])
