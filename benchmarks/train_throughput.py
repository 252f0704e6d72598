"""Training throughput and memory of the MRI models; prints JSON.

For the U-Net (fastMRI baseline size by default) and the I-RIM at ``--size`` (default 320×320): slices per second
of a full training step (forward, L1 loss, backward, Adam step) and peak memory. Then the I-RIM's memory against its
number of steps, with activation recomputation (``memory_saving=True``, the default) and without (plain autograd).

Memory is reported two ways: ``activation_bytes`` — the bytes autograd saves for the backward pass (counted with
``torch.autograd.graph.saved_tensors_hooks``; exact and device-independent) — and, on CUDA, ``peak_bytes`` from
``torch.cuda.max_memory_allocated`` over a training step (weights, gradients and optimiser state included).

    python benchmarks/train_throughput.py                      # 320×320, auto device
    python benchmarks/train_throughput.py --size 64 --steps 2  # a quick CPU run
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from timing import sync

from blindspot.models.irim import PRESETS
from blindspot.models.registry import build_model


def _mask(batch: int, width: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(batch, 1, 1, width, generator=g) < 0.25).float()
    m[..., width // 2 - width // 25 : width // 2 + width // 25] = 1.0
    return m.to(device)


def _step_fn(model, x, target, mask):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        out = model(x, mask) if getattr(model, "uses_mask", False) else model(x)
        loss = (out - target).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def activation_bytes(model, x, mask) -> int:
    """Bytes autograd stores for the backward pass of one forward call."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, mask) if getattr(model, "uses_mask", False) else model(x)
    del out
    return total


def measure(name: str, hparams: dict, size: int, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(name, **hparams).to(device).train()
    x = torch.randn(batch, 1, size, size, device=device)
    target = torch.randn(batch, 1, size, size, device=device)
    mask = _mask(batch, size, device)
    step = _step_fn(model, x, target, mask)
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    row = {
        "model": name,
        "hparams": hparams,
        "parameters": sum(p.numel() for p in model.parameters()),
        "size": [size, size],
        "batch": batch,
        "slices_per_s": batch * steps / elapsed,
        "step_s": elapsed / steps,
        "activation_bytes": activation_bytes(model, x, mask),
    }
    if device.type == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def irim_memory(n_steps: int, memory_saving: bool, base: dict, size: int, batch: int, device: torch.device) -> dict:
    row = measure("irim", {**base, "n_steps": n_steps, "memory_saving": memory_saving}, size, batch, 1, 1, device)
    return {k: row[k] for k in ("hparams", "parameters", "slices_per_s", "activation_bytes") if k in row} | (
        {"peak_bytes": row["peak_bytes"]} if "peak_bytes" in row else {}
    ) | {"n_steps": n_steps, "memory_saving": memory_saving}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--unet-chans", type=int, default=32, help="U-Net width (fastMRI baseline: 32)")
    p.add_argument("--irim-preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--irim-steps", type=int, nargs="+", default=[1, 2, 4, 8], help="I-RIM step counts for memory")
    p.add_argument("--memory-batch", type=int, default=1, help="batch of the memory-vs-steps runs (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    irim_base = {k: v for k, v in PRESETS[args.irim_preset].items() if k != "n_steps"}
    irim_hp = dict(PRESETS[args.irim_preset])
    report = {
        "benchmark": "train_throughput",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "training": [
            measure("unet", {"chans": args.unet_chans, "num_pool_layers": 4}, args.size, args.batch_size,
                    args.steps, args.warmup, device),
            measure("irim", irim_hp, args.size, args.batch_size, args.steps, args.warmup, device),
        ],
        "irim_memory_vs_steps": [
            irim_memory(n, ms, irim_base, args.size, args.memory_batch, device)
            for ms in (True, False) for n in args.irim_steps
        ],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
