"""FNAF feature families: counter-based sampling, batched rendering against reference loops, regions, T."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from blindspot.attacks.features import (
    FAMILIES,
    FeatureSampler,
    Features,
    Region,
    candidate_keys,
    counter_bits,
    counter_uniform,
    neighbourhood,
    sample_locations,
    string_key,
)
from blindspot.errors import BlindspotError


def _features(family: str, n: int, shape=(48, 48), seed: int = 0) -> Features:
    B = n
    image_keys = torch.tensor([string_key(seed, f"img{i}") for i in range(B)], dtype=torch.int64)
    region = Region().masks(torch.ones(B, 1, *shape))
    return FeatureSampler(family).sample(candidate_keys(image_keys, range(1)), region, torch.full((B,), 2.0))


def test_counter_uniform_is_uniform_deterministic_and_prefix_stable():
    keys = torch.arange(200, dtype=torch.int64) * 7919
    u = counter_uniform(keys, 3, 50)
    assert u.shape == (200, 50) and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01  # 10 000 draws: sd of the mean ≈ 0.003
    assert abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(u, counter_uniform(keys, 3, 50))
    assert torch.equal(counter_uniform(keys, 3, 10), u[:, :10])  # more numbers never change the first ones
    assert not torch.equal(counter_uniform(keys, 4, 50), u)  # streams differ
    # neighbouring keys and neighbouring counters give unrelated numbers; the low bits are uniform too
    corr = np.corrcoef(u[:-1].flatten().numpy(), u[1:].flatten().numpy())[0, 1]
    assert abs(corr) < 0.05
    corr = np.corrcoef(u[:, :-1].flatten().numpy(), u[:, 1:].flatten().numpy())[0, 1]
    assert abs(corr) < 0.05
    low = torch.bincount((counter_bits(keys, 5, 50) & 3).flatten(), minlength=4)
    assert int(low.min()) > 2300 and int(low.max()) < 2700  # 10 000 draws over 4 moves


def test_candidates_are_nested_in_their_count():
    keys = torch.tensor([string_key(0, "a"), string_key(0, "b")], dtype=torch.int64)
    region = Region().masks(torch.ones(2, 1, 64, 64))
    s = FeatureSampler("ellipse")
    few = s.sample(candidate_keys(keys, range(5)), region, torch.ones(2))
    many = s.sample(candidate_keys(keys, range(11)), region, torch.ones(2))
    sel = torch.tensor([0, 1, 2, 3, 4, 11, 12, 13, 14, 15])  # image-major: image 1 starts at 11
    for name, t in few.as_dict().items():
        assert torch.equal(t, many.as_dict()[name][sel]), name


def _walk_reference(f: Features, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Step-by-step walk, one feature at a time (the seed's procedure, clipped to the image)."""
    L = f.max_steps
    moves = [(1, 0), (-1, 0), (0, 1), (0, -1)]
    bits = counter_bits(f.seed, 101, L).numpy()
    u_val = (bits >> 8).astype(np.float32) / np.float32(16777216.0)
    vals = np.zeros((len(f), h, w), np.float32)
    sup = np.zeros((len(f), h, w), bool)
    for i in range(len(f)):
        r, c = int(round(float(f.center[i, 0]))), int(round(float(f.center[i, 1])))
        for j in range(int(round(float(f.size[i, 0])))):
            rr, cc = min(max(r, 0), h - 1), min(max(c, 0), w - 1)
            v = np.float32(u_val[i, j]) * np.float32(f.intensity[i])
            vals[i, rr, cc] = max(vals[i, rr, cc], v)
            sup[i, rr, cc] = True
            d = int(bits[i, j] & 3)
            r, c = r + moves[d][0], c + moves[d][1]
    return vals, sup


def test_walk_matches_a_step_by_step_reference_and_is_connected():
    f = _features("walk", 12)
    values, support = f.render((48, 48))
    ref_v, ref_s = _walk_reference(f, 48, 48)
    assert torch.equal(support[:, 0], torch.from_numpy(ref_s))
    assert torch.allclose(values[:, 0], torch.from_numpy(ref_v), atol=1e-6)
    steps = f.size[:, 0]
    assert bool(((steps >= 10) & (steps <= 100)).all())
    for i in range(len(f)):
        s = support[i, 0].numpy()
        _, n_comp = ndimage.label(s)  # 4-connectivity
        assert n_comp == 1
        assert 1 <= s.sum() <= steps[i]
    assert float(values.min()) >= 0 and bool((values <= f.intensity.reshape(-1, 1, 1, 1) + 1e-6).all())
    assert bool((values[~support] == 0).all())


def test_walk_translates_with_its_centre():
    f = _features("walk", 4, shape=(128, 128))
    f.size[:, 0] = 30  # short walks stay far from the border
    f.center[:] = torch.tensor([64.0, 64.0])
    v0, _ = f.render((128, 128))
    v1, _ = f.moved(torch.tensor([[5.0, -7.0]]).expand(4, 2), (128, 128)).render((128, 128))
    assert torch.equal(torch.roll(v0, shifts=(5, -7), dims=(-2, -1)), v1)


def test_solid_shapes_have_their_geometry():
    h = w = 64
    n = 3
    base = dict(
        center=torch.tensor([[32.0, 32.0]] * n),
        angle=torch.tensor([0.0, 0.7, 2.0]),
        intensity=torch.tensor([1.0, 2.0, 3.0]),
        seed=torch.zeros(n, dtype=torch.int64),
    )
    disc, dsup = Features("disc", size=torch.tensor([[6.0, 6.0]] * n), **base).render((h, w))
    area = dsup.flatten(1).sum(1).float()
    assert torch.allclose(area, torch.full((n,), math.pi * 36), rtol=0.06)
    assert torch.allclose(disc.flatten(1).amax(1), base["intensity"])
    assert bool((disc[dsup] > 0).all()) and bool((disc[~dsup] == 0).all())

    ell, esup = Features("ellipse", size=torch.tensor([[8.0, 3.0]] * n), **base).render((h, w))
    assert torch.allclose(esup.flatten(1).sum(1).float(), torch.full((n,), math.pi * 24), rtol=0.08)
    # the major axis follows the angle: at angle 0 it runs along the rows
    rows = esup[0, 0].any(1).sum()
    cols = esup[0, 0].any(0).sum()
    assert rows > cols

    line, lsup = Features("line", size=torch.tensor([[20.0, 1.0]] * n), **base).render((h, w))
    counts = lsup.flatten(1).sum(1).float()
    assert bool(((counts >= 19) & (counts <= 30)).all())
    for i in range(n):
        assert ndimage.label(lsup[i, 0].numpy(), structure=np.ones((3, 3)))[1] == 1  # one 8-connected piece

    blob, bsup = Features("blob", size=torch.tensor([[2.0, 3.0]] * n), **base).render((h, w))
    total = blob.flatten(1).sum(1)
    expected = 2 * math.pi * 2.0 * 3.0 * base["intensity"] * (1 - math.exp(-4.5))  # mass inside 3σ
    assert torch.allclose(total, expected, rtol=0.03)
    assert torch.allclose(blob.flatten(1).amax(1), base["intensity"])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_renders_in_one_batch(family):
    f = _features(family, 9)
    values, support = f.render((40, 56))
    assert values.shape == (9, 1, 40, 56) and support.shape == (9, 1, 40, 56)
    assert values.dtype == torch.float32 and support.dtype == torch.bool
    assert bool(support.flatten(1).any(1).all())
    assert float(values.min()) >= 0
    lo, hi = FeatureSampler(family).intensities
    assert bool((f.intensity <= hi * 2.0 + 1e-6).all()) and bool((f.intensity >= lo * 2.0 - 1e-6).all())


def test_region_centre_crop_scales_with_the_image():
    assert Region().box(320, 320) == (100, 100, 120, 120)
    assert Region().box(48, 48) == (15, 15, 18, 18)
    m = Region().masks(torch.ones(2, 1, 320, 320))
    assert m.shape == (2, 320, 320) and int(m[0].sum()) == 120 * 120


def test_locations_fall_inside_the_region_uniformly():
    y = torch.zeros(2, 1, 32, 32)
    y[0, 0, 4:10, 20:30] = 1.0
    y[1, 0, 20:22, 3:5] = 1.0
    masks = Region("foreground").masks(y)
    u = counter_uniform(torch.arange(2, dtype=torch.int64), 1, 2000)
    loc = sample_locations(masks, u).long()
    inside = masks[torch.arange(2)[:, None], loc[..., 0], loc[..., 1]]
    assert bool(inside.all())
    # uniform over the 4 foreground pixels of image 1
    flat = loc[1, :, 0] * 32 + loc[1, :, 1]
    counts = torch.bincount(flat, minlength=32 * 32)[masks[1].flatten()]
    assert counts.numel() == 4 and int(counts.min()) > 400
    # a blank image falls back to the whole image; a user mask is respected
    assert bool(Region("foreground").masks(torch.zeros(1, 1, 8, 8)).all())
    um = torch.zeros(8, 8, dtype=torch.bool)
    um[2, 5] = True
    loc = sample_locations(Region("mask", mask=um).masks(torch.ones(3, 1, 8, 8)), torch.rand(3, 7))
    assert bool((loc == torch.tensor([2.0, 5.0])).all())


def test_neighbourhood_is_a_dilation():
    s = torch.zeros(1, 1, 15, 15, dtype=torch.bool)
    s[0, 0, 7, 7] = True
    T = neighbourhood(s, 3)
    assert int(T.sum()) == 49 and float(T[0, 0, 4, 4]) == 1 and float(T[0, 0, 3, 7]) == 0
    assert torch.equal(neighbourhood(s, 0), s.float())


def test_bad_configuration_is_a_user_error():
    with pytest.raises(BlindspotError):
        FeatureSampler("square")
    with pytest.raises(BlindspotError):
        FeatureSampler("walk", size_range=((0, 5), (0, 0)))
    with pytest.raises(BlindspotError):
        Region("elsewhere")
    with pytest.raises(BlindspotError):
        Region("mask", mask=torch.ones(4, 4, dtype=torch.bool)).masks(torch.ones(1, 1, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rendering_is_identical_on_the_gpu():
    for family in FAMILIES:
        f = _features(family, 6)
        v_cpu, s_cpu = f.render((48, 48))
        v_gpu, s_gpu = f.to("cuda").render((48, 48))
        assert torch.equal(s_cpu, s_gpu.cpu())
        assert torch.allclose(v_cpu, v_gpu.cpu(), atol=1e-6)


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_neighbourhood_equals_max_pooling(d):
    import torch.nn.functional as F

    s = torch.rand(3, 1, 30, 41) > 0.97
    assert torch.equal(neighbourhood(s, d), F.max_pool2d(s.float(), 2 * d + 1, 1, d))
