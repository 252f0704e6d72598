"""Channels-last against contiguous weights on the CPU for the bundled networks; prints JSON.

For each network: the forward pass (no gradient, as attacks score candidates) and the forward + backward pass with
respect to the input (weights frozen, as gradient attacks and invariances need) on one batch, with the network's
weights contiguous and channels-last, timed in alternating rounds (``timing.median_times``) so that drift
hits both alike; the ratio ``contiguous / channels_last`` (> 1: channels-last is faster) and the largest output
difference between the two. :func:`blindspot.models.loading.load_model` gives the networks whose class sets
``channels_last_on_cpu`` (the CT denoisers) channels-last weights on the CPU.

    python benchmarks/cpu_layout.py                      # batch 16, 128×128, 1 thread (as in the demo)
    python benchmarks/cpu_layout.py --threads 2 --size 256
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from timing import median_times

from blindspot.models.loading import load_model


def _input_channels(model: torch.nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


def measure(name: str, batch: int, size: int, repeats: int) -> dict:
    model = load_model(name).model
    layouts = {
        "contiguous": copy.deepcopy(model).to(memory_format=torch.contiguous_format),
        "channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last),
    }
    x = torch.randn(batch, _input_channels(model), size, size, generator=torch.Generator().manual_seed(0))

    def forward(m: torch.nn.Module):
        with torch.no_grad():
            return m(x)

    def forward_backward(m: torch.nn.Module) -> None:
        xg = x.clone().requires_grad_(True)
        m(xg).square().mean().backward()

    cpu = torch.device("cpu")
    out: dict = {"model": name, "channels_last_on_cpu": bool(getattr(type(model), "channels_last_on_cpu", False))}
    for label, fn in (("forward", forward), ("forward_backward", forward_backward)):
        med = median_times({k: (lambda m=m: fn(m)) for k, m in layouts.items()}, cpu, repeats, warmup=1)
        out[f"{label}_s"] = {k: round(v, 4) for k, v in med.items()}
        out[f"{label}_ratio"] = round(med["contiguous"] / med["channels_last"], 3)
    ref, alt = forward(layouts["contiguous"]), forward(layouts["channels_last"])
    out["max_abs_difference"] = float((ref - alt).abs().max())
    out["output_scale"] = float(ref.abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cnn10", "redcnn", "wganvgg", "mri_unet"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(name, args.batch, args.size, args.repeats) for name in args.models]
    print(json.dumps({"benchmark": "cpu_layout", "torch": torch.__version__, "threads": args.threads,
                      "batch": args.batch, "size": args.size, "note": "median seconds per call; ratio = contiguous "
                      "/ channels_last (> 1: channels-last faster)", "models": results}, indent=2))


if __name__ == "__main__":
    main()
