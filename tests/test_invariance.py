"""Image-domain invariances against known answers: Gaussian + RI, blind and identity networks, MRI null space."""

import pytest
import torch
from skimage.metrics import structural_similarity
from torch import nn

from blindspot.attacks.distances import BoundedMSE, SSIMDistance, VGGPerceptual, build_distance
from blindspot.attacks.invariance import (
    DenoiserTarget,
    InvarianceAttack,
    InvarianceConfig,
    MRITarget,
    mri_decomposition,
    square_contrast,
    square_mask,
)
from blindspot.errors import BlindspotError


@pytest.fixture(scope="module")
def ct_lowdose():
    """Two 64×64 phantom slices (chest, abdomen) at 25% dose, normalised; and the normalisation."""
    from blindspot.data.ct_phantom import FOV_MM, PhantomPatient
    from blindspot.physics.ct import HUNormalization, LowDoseCT

    hu = torch.stack([PhantomPatient(k, 0).render(0.5, size=64) for k in ("chest", "abdomen")]).unsqueeze(1)
    ct = LowDoseCT((64, 64), pixel_size_mm=FOV_MM / 64)
    low = ct.simulate(hu, (0.25,), generator=torch.Generator().manual_seed(0))[0.25]
    norm = HUNormalization.fit(low)
    return norm.to_network(low), norm


# ----------------------------------------------------------------------------------------------------------------
# The known answer: Gaussian + RI
# ----------------------------------------------------------------------------------------------------------------
def test_gaussian_ri_invariance_lies_inside_the_square(ct_lowdose):
    """Gaussian (σ = 1 px) whose output is zero in the central 30×30 square: the invariance's structure (5×5 local
    mean of x_inv − x) must be ≥ 5× larger inside the square (3 px in) than outside (3 px out), while the output
    hardly moves: output MSE ≤ 1e-4 and RMS output change ≤ 2% of the RMS input change (normalised units)."""
    from blindspot.models.gaussian_ri import GaussianRI

    x, norm = ct_lowdose
    model = GaussianRI(sigma=1.0, square=30)
    cfg = InvarianceConfig(alpha=0.01, iterations=400, lr=0.01, restarts=2, progress=False)
    res = InvarianceAttack(BoundedMSE(), config=cfg)(DenoiserTarget(model), x)
    c = square_contrast(res.delta[:, :, 0], square=30, margin=3, window=5)
    assert (c["ratio"] >= 5.0).all(), c
    m = res.metrics(scale=norm.std)
    assert (res.fidelity <= 1e-4).all()
    assert (m["change_ratio"] <= 0.02).all()
    assert (m["mean_abs_change"] >= 100.0).all()  # HU: a large change, not a no-op
    # outside the square the Gaussian is blind only to fine patterns: the pixel-level change there is large, but its
    # local mean is small (checkerboard-like high frequencies the σ = 1 px blur removes)
    outside = ~square_mask(64, 64, 30, inset=-3)
    pix_out = res.delta[:, :, 0][..., outside].abs().mean()
    assert pix_out > 5 * c["outside"].mean()


def test_same_seed_same_result_and_batch_independence(ct_lowdose):
    x, _ = ct_lowdose
    model = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    torch.manual_seed(0)
    nn.init.normal_(model.weight)
    cfg = InvarianceConfig(alpha=0.05, iterations=30, lr=0.01, restarts=2, progress=False, seed=7)
    attack = InvarianceAttack(BoundedMSE(), config=cfg)
    a = attack(DenoiserTarget(model), x, item_ids=[10, 11])
    b = attack(DenoiserTarget(model), x, item_ids=[10, 11])
    assert torch.equal(a.x_inv, b.x_inv)
    alone = attack(DenoiserTarget(model), x[1:], item_ids=[11])
    assert torch.allclose(alone.x_inv[0], a.x_inv[1], atol=1e-6)
    other = InvarianceAttack(BoundedMSE(), config=InvarianceConfig(**{**cfg.to_dict(), "seed": 8}))(
        DenoiserTarget(model), x, item_ids=[10, 11])
    assert not torch.allclose(other.x_inv, a.x_inv)


class _BlindForSome(nn.Module):
    """Output ``x`` for image 1, a constant for image 0: image 0 is fully invariant, image 1 not at all."""

    def forward(self, x, items):
        return x * (items == 1).to(x.dtype).reshape(-1, 1, 1, 1)


def test_early_stop_and_compaction_keep_each_row_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 16, 16, generator=g)
    cfg = InvarianceConfig(alpha=0.5, iterations=1500, lr=0.02, restarts=1, window=50, min_iterations=100,
                           tol=1e-4, atol=1e-6, progress=False)
    res = InvarianceAttack(BoundedMSE(), config=cfg)(_BlindForSome(), x)
    # a blind network: the change grows until the distance saturates at its bound; then the objective is flat
    assert bool(res.converged[0, 0]) and int(res.iterations[0, 0]) < 1500
    assert float(res.distance[0, 0]) == pytest.approx(1.0)
    # an identity network: (1 − α)·MSE(d) is minimised by d → 0
    assert float(res.distance[1, 0]) < 1e-3
    assert int(res.iterations[1, 0]) > int(res.iterations[0, 0])
    # the surviving row, run alone, follows the same trajectory (compaction keeps Adam's per-row state)
    alone = InvarianceAttack(BoundedMSE(), config=cfg)(lambda t, i: _BlindForSome()(t, i + 1), x[1:], item_ids=[1])
    assert int(alone.iterations[0, 0]) == int(res.iterations[1, 0])
    assert torch.allclose(alone.x_inv[0], res.x_inv[1], atol=1e-6)


def test_region_and_bounds_are_respected():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 20, 20, generator=g).clamp(-1, 1)
    region = square_mask(20, 20, 8)
    cfg = InvarianceConfig(alpha=1.0, iterations=60, lr=0.1, restarts=2, bounds=(-1.5, 1.5), progress=False)
    res = InvarianceAttack(BoundedMSE(), config=cfg)(lambda t, i: torch.zeros_like(t), x, region=region)
    d = res.delta[0, :, 0]
    assert torch.equal(d[:, ~region], torch.zeros_like(d[:, ~region]))
    assert d[:, region].abs().mean() > 0.3
    assert res.x_inv.min() >= -1.5 - 1e-6 and res.x_inv.max() <= 1.5 + 1e-6
    with pytest.raises(BlindspotError):
        InvarianceAttack(BoundedMSE(), config=cfg)(lambda t, i: t, x, region=torch.zeros(20, 20))


def test_bad_inputs_are_clean_errors():
    with pytest.raises(BlindspotError):
        InvarianceConfig(iterations=0)
    with pytest.raises(BlindspotError):
        InvarianceConfig(bounds=(1.0, -1.0))
    with pytest.raises(BlindspotError):
        InvarianceAttack(BoundedMSE(), config=InvarianceConfig(progress=False))(
            lambda t, i: t, torch.full((1, 1, 8, 8), float("nan")))
    with pytest.raises(BlindspotError):
        build_distance("l1")


# ----------------------------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------------------------
def test_bounded_mse_values_and_gradient():
    a = torch.zeros(3, 1, 8, 8, requires_grad=True)
    b = torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), 3.0)])
    d = BoundedMSE()(a, b)
    assert torch.allclose(d, torch.tensor([0.0, 0.25, 1.0]))
    d.sum().backward()
    assert a.grad[2].abs().max() == 0  # past the bound nothing pushes further
    assert a.grad[1].abs().max() > 0


def test_ssim_distance_matches_scikit_image():
    g = torch.Generator().manual_seed(3)
    ref = torch.nn.functional.avg_pool2d(torch.rand(2, 1, 32, 32, generator=g, dtype=torch.float64), 3, 1, 1)
    pred = ref + 0.1 * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    d = SSIMDistance()(pred, ref)
    for i in range(2):
        rng = float(ref[i].max() - ref[i].min())
        s = structural_similarity(ref[i, 0].numpy(), pred[i, 0].numpy(), data_range=rng)
        assert float(d[i]) == pytest.approx((1 - s) / 2, abs=1e-5)
    assert torch.allclose(SSIMDistance()(ref, ref), torch.zeros(2, dtype=torch.float64))


def _random_vgg_features():
    """The project's VGG16 (torchvision layout) with seeded random weights."""
    from blindspot.models.vgg import VGG16Features

    vgg = VGG16Features()
    vgg.reset_parameters(torch.Generator().manual_seed(0))
    return vgg


def test_vgg_distance_is_bounded_and_differentiable():
    dist = VGGPerceptual(_random_vgg_features(), layers=("relu1_2", "relu2_2", "relu3_3"))
    g = torch.Generator().manual_seed(4)
    ref = torch.rand(2, 1, 32, 32, generator=g)
    pred = (ref + 0.3 * torch.randn(ref.shape, generator=g)).requires_grad_(True)
    d = dist(pred, ref)
    assert d.shape == (2,) and (d > 0).all() and (d <= 1).all()
    d.sum().backward()
    assert pred.grad.abs().sum() > 0
    assert torch.allclose(dist(ref, ref), torch.zeros(2), atol=1e-6)
    assert all(not p.requires_grad for p in dist.parameters())
    # the cached reference features (fixed ref) give what a joint pass gives
    again = dist(pred.detach(), ref)
    joint = dist(pred.detach(), ref.clone().requires_grad_(True))
    assert torch.allclose(again, d.detach(), atol=1e-6) and torch.allclose(joint, d.detach(), atol=1e-5)
    ref.add_(0.5)  # an in-place change of the reference must not reuse stale features
    assert not torch.allclose(dist(pred.detach(), ref), d.detach(), atol=1e-4)


def test_vgg_distance_without_weights_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(BlindspotError):
        build_distance("vgg")
    with pytest.raises(BlindspotError):
        build_distance("vgg", vgg_weights=tmp_path / "missing.pth")


def test_vgg_distance_from_a_weights_file_reports_its_origin(tmp_path):
    from blindspot.models.vgg import write_seeded_vgg16

    path = write_seeded_vgg16(tmp_path / "vgg16-random.pth", seed=1)
    dist = build_distance("vgg", vgg_weights=path)
    assert dist.weights_info["vgg_imagenet"] is False
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert float(dist(x, x)) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# MRI: through the under-sampling physics
# ----------------------------------------------------------------------------------------------------------------
def _knee_like(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (((yy - size / 2) / (size / 3)) ** 2 + ((xx - size / 2) / (size / 4)) ** 2 < 1).float()
    return (disc + 0.1 * torch.rand(n, 1, size, size, generator=g)).clamp_min(0)


def test_mri_zero_filled_invariance_is_the_mask_null_space():
    """For the zero-filled 'network' (f = identity on A(y)), everything the optimisation finds must be hidden by the
    mask: the null-space part carries ≥ 99% of the change's energy."""
    from blindspot.models.zero_filled import ZeroFilled
    from blindspot.physics.mri import create_mask_func

    y = _knee_like()
    mask = create_mask_func("random", [4])(32, seed="knee").mask
    target = MRITarget(ZeroFilled(), y, mask)
    cfg = InvarianceConfig(alpha=0.01, iterations=200, lr=0.02, restarts=1, progress=False)
    res = InvarianceAttack(BoundedMSE(), config=cfg)(target, target.x)
    dec = mri_decomposition(target, res)
    assert (dec["null_energy_fraction"] >= 0.99).all()
    assert (dec["null_mean_abs"] > 10 * dec["range_mean_abs"]).all()
    assert (res.metrics()["mean_abs_change"] > 0.3).all()
    # the decomposition is orthogonal: energies add up to the change's
    d = res.delta.reshape(2, 1, 32, 32)
    null, rng = target.decompose(d, torch.arange(2))
    total = d.square().sum((1, 2, 3))
    assert torch.allclose(null.abs().square().sum((1, 2, 3)) + rng.abs().square().sum((1, 2, 3)), total, rtol=1e-4)


def test_mri_target_output_matches_the_pipeline():
    """``MRITarget`` at the clean truth reproduces f(N(A(y))) mapped back to the clean normalisation."""
    from blindspot.physics.mri import CartesianUndersampling, create_mask_func, normalize

    y = _knee_like(seed=1)
    mask = create_mask_func("equispaced", [4])(32, seed=0).mask
    model = nn.Conv2d(1, 1, 3, padding=1)
    target = MRITarget(model, y, mask)
    zf = CartesianUndersampling(mask)(y)
    xn, stats = normalize(zf)
    expected = stats.apply(stats.invert(model(xn)), clamp=False)
    got = target(target.x, torch.arange(2))
    assert torch.allclose(got, expected, atol=1e-5)


def test_gaussian_ri_known_answer_through_the_python_run_layer(ct_lowdose, tmp_path):
    """The same known answer through :func:`blindspot.runs.invariances.run_invariances`, on low-dose images given as
    a tensor in HU: every record's structure lies inside the square (ratio ≥ 5) and the output hardly moves."""
    from blindspot.models.loading import load_model
    from blindspot.runs.images import CTImageSet
    from blindspot.runs.invariances import run_invariances

    x, norm = ct_lowdose
    images = CTImageSet.from_tensor(norm.to_hu(x), keys=["chest", "abdomen"], dose=0.25, normalization=norm)
    cfg = InvarianceConfig(alpha=0.01, iterations=400, lr=0.01, restarts=1, progress=False)
    result = run_invariances(load_model("gaussian-ri"), tmp_path / "run", images, cfg, "mse", figures=0)
    assert [r["key"] for r in result.rows] == ["chest", "abdomen"]
    assert all(r["square_ratio"] >= 5 and r["change_ratio"] <= 0.02 and r["units"] == "HU" for r in result.rows)
    assert result.summary["normalization"] == {"mean": norm.mean, "std": norm.std} and result.summary["dose"] == 0.25
    assert "square_ratio" in "\n".join(result.lines())
