"""CT phantom rendering primitives against brute-force oracles."""

from __future__ import annotations

import numpy as np
import torch

from blindspot.data.ct_phantom import capsules


def _capsule_union_everywhere(X, Y, p0, p1, r0, r1) -> torch.Tensor:
    """The signed distance to the union of tapered capsules at every pixel, one capsule at a time (the oracle)."""
    best = torch.full_like(X, 1e4)
    for a, b, ra, rb in zip(p0, p1, r0, r1):
        ba = (b - a).astype(np.float32)
        denom = max(float(ba @ ba), 1e-9)
        px, py = X - float(a[0]), Y - float(a[1])
        h = ((px * float(ba[0]) + py * float(ba[1])) / denom).clamp(0.0, 1.0)
        d = torch.sqrt((px - h * float(ba[0])) ** 2 + (py - h * float(ba[1])) ** 2) - (float(ra) + h * float(rb - ra))
        best = torch.minimum(best, d)
    return best


def test_windowed_capsules_are_the_exact_union_near_the_shapes():
    """Each capsule is evaluated in its own window only: the result must equal the union's distance wherever that is
    below two pixels (what painting reads), and must not fall below two pixels anywhere else."""
    rng = np.random.default_rng(0)
    n, px = 96, 1.5
    coords = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0) * px
    X, Y = coords.view(1, -1).expand(n, n), coords.view(-1, 1).expand(n, n)
    k = 70  # more than one chunk; some capsules reach past the image border
    p0 = rng.uniform(-80, 80, (k, 2))
    p1 = p0 + rng.normal(0, 12, (k, 2)) * (rng.uniform(size=(k, 1)) < 0.7)
    r0 = rng.uniform(0.4, 6.0, k)
    r1 = r0 * rng.uniform(0.5, 1.0, k)
    got = capsules(X, Y, p0, p1, r0, r1, chunk=16)
    want = _capsule_union_everywhere(X, Y, p0, p1, r0, r1)
    near = want < 2 * px
    assert near.sum() > 500 and (~near).sum() > 500
    assert torch.allclose(got[near], want[near], rtol=0, atol=1e-4)
    assert (got[~near] >= 2 * px - 1e-4).all()
    assert torch.equal(capsules(X, Y, p0[:0], p1[:0], r0[:0], r1[:0]), torch.full((n, n), 1e4))
