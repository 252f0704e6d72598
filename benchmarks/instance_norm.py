"""The U-Net's instance norm (a group norm with one group per channel) against ``F.instance_norm``; prints JSON.

Two levels, each timed in alternating rounds (``timing.median_times``) so that drift hits both alike:

* ``ops``: the norm alone on the activations of a U-Net (``--chans`` channels at ``--size``², doubling per level),
  forward without gradient and forward + backward;
* ``unet``: a whole U-Net (``--chans``, ``--pools``) with its norms as built (:class:`blindspot.models.unet.
  InstanceNorm2d`) and with ``torch.nn.InstanceNorm2d`` put back (fastMRI's module), forward without gradient (as
  attacks score candidates) and a training step's forward + backward; the largest output difference between the two.

``ratio`` = ``F.instance_norm`` time / group-norm time (> 1: the U-Net's norm is faster).

    python benchmarks/instance_norm.py                          # batch 16, 96², 16 channels, 1 thread
    python benchmarks/instance_norm.py --size 320 --chans 32 --pools 4 --batch 4
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F

from timing import median_times

from blindspot.models.unet import InstanceNorm2d, Unet

CPU = torch.device("cpu")


def _ratio(fns: dict, repeats: int) -> dict:
    med = median_times(fns, CPU, repeats, warmup=1)
    return {"seconds": {k: round(v, 5) for k, v in med.items()},
            "ratio": round(med["instance_norm"] / med["group_norm"], 3)}


def ops(batch: int, size: int, chans: int, pools: int, repeats: int) -> list[dict]:
    out = []
    g = torch.Generator().manual_seed(0)
    for level in range(pools + 1):
        x = torch.randn(batch, chans * 2**level, size // 2**level, size // 2**level, generator=g)
        norms = {"instance_norm": lambda t: F.instance_norm(t, eps=1e-5), "group_norm": InstanceNorm2d(x.shape[1])}

        def forward(f, x=x):
            with torch.no_grad():
                f(x)

        def forward_backward(f, x=x):
            xg = x.clone().requires_grad_(True)
            f(xg).square().sum().backward()

        row = {"shape": list(x.shape)}
        for label, fn in (("forward", forward), ("forward_backward", forward_backward)):
            row[label] = _ratio({k: (lambda f=f, fn=fn: fn(f)) for k, f in norms.items()}, repeats)
        out.append(row)
    return out


def unet(batch: int, size: int, chans: int, pools: int, repeats: int) -> dict:
    torch.manual_seed(0)
    ours = Unet(chans=chans, num_pool_layers=pools)
    theirs = copy.deepcopy(ours)
    for module in list(theirs.modules()):
        for name, child in module.named_children():
            if isinstance(child, InstanceNorm2d):
                setattr(module, name, torch.nn.InstanceNorm2d(child.num_features))
    x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(1))
    models = {"instance_norm": theirs, "group_norm": ours}

    def forward(m):
        with torch.no_grad():
            return m(x)

    def step(m):
        m.zero_grad(set_to_none=True)
        m(x).abs().mean().backward()

    res = {"forward": _ratio({k: (lambda m=m: forward(m)) for k, m in models.items()}, repeats),
           "forward_backward": _ratio({k: (lambda m=m: step(m)) for k, m in models.items()}, repeats)}
    ref = forward(theirs)
    res["max_abs_difference"] = float((forward(ours) - ref).abs().max())
    res["output_scale"] = float(ref.abs().max())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--chans", type=int, default=16)
    ap.add_argument("--pools", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({
        "benchmark": "instance_norm", "torch": torch.__version__, "threads": args.threads, "batch": args.batch,
        "size": args.size, "chans": args.chans, "pools": args.pools,
        "note": "median seconds per call; ratio = F.instance_norm / group norm (> 1: the U-Net's norm is faster)",
        "ops": ops(args.batch, args.size, args.chans, args.pools, args.repeats),
        "unet": unet(args.batch, args.size, args.chans, args.pools, args.repeats),
    }, indent=2))


if __name__ == "__main__":
    main()
