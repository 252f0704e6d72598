"""Two CPU processes under gloo (DistributedDataParallel) train to the same weights as one process with the same
global batch.

Stated tolerance: after 2 epochs (4 optimiser steps, float32) every parameter agrees to 2e-5 absolute and validation
metrics to 1e-5 relative; the only differences are the order of floating-point sums in the gradient all-reduce.
The U-Net trains with Adam, the I-RIM with SGD: the Householder vectors of the I-RIM are scale-invariant, so their
radial gradient is zero up to round-off, and Adam's per-coordinate normalisation would blow that round-off up to
full-size steps (an optimiser property, not a distribution one).
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from blindspot.models.checkpoint import read_checkpoint_dict
from blindspot.models.registry import build_model
from blindspot.physics.mri import create_mask_func
from blindspot.training.distributed import DistContext
from blindspot.training.engine import TrainConfig, seed_everything
from blindspot.training.mri import EpochDataset, EpochMasks, train_mri

MODELS = {
    "unet": {"chans": 4, "num_pool_layers": 2},
    "irim": {"n_steps": 2, "n_latent": 6, "hidden_channels": [6], "dilations": [2], "head_channels": 4},
}
OPTIMIZERS = {"unet": ("adam", 2e-3), "irim": ("sgd", 2e-2)}


def _run(out_dir, architecture, dist):
    from helpers_mri import TinyMRIDataset

    masks = EpochMasks(create_mask_func("random", [4, 8], [0.08, 0.04]), seed=1)
    train = EpochDataset(TinyMRIDataset(volumes=4, slices=2, mask_func=masks, seed=0), masks)
    val = TinyMRIDataset(volumes=3, slices=1, seed=50)  # 3 slices over 2 ranks: uneven shards
    seed_everything(11)
    model = build_model(architecture, **MODELS[architecture])
    optimizer, lr = OPTIMIZERS[architecture]
    config = TrainConfig(epochs=2, batch_size=4, lr=lr, optimizer=optimizer, grad_clip=1.0, seed=2, progress=False,
                         log_every=1)
    return train_mri(model, architecture, MODELS[architecture], train, val, config, out_dir, dist=dist)


def _worker(rank, world_size, port, out_root, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist = DistContext.from_env(device="cpu")
    try:
        assert dist.backend == "gloo" and dist.world_size == world_size
        out = {}
        for architecture in MODELS:
            result = _run(os.path.join(out_root, architecture), architecture, dist)
            out[architecture] = result.history[-1]["val"]
        queue.put((rank, out))
    finally:
        dist.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path / "ddp"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]  # every rank returns the same gathered validation metrics

    for architecture in MODELS:
        single = _run(tmp_path / "single" / architecture, architecture, DistContext())
        ddp_ckpt = read_checkpoint_dict(tmp_path / "ddp" / architecture / "last.pt")
        one_ckpt = read_checkpoint_dict(tmp_path / "single" / architecture / "last.pt")
        assert ddp_ckpt["training"]["world_size"] == 2 and ddp_ckpt["training"]["step"] == 4
        for key, value in one_ckpt["state_dict"].items():
            torch.testing.assert_close(ddp_ckpt["state_dict"][key], value, rtol=0, atol=2e-5, msg=key)
        seed_everything(11)
        initial = build_model(architecture, **MODELS[architecture]).state_dict()
        moved = max(float((v - initial[k]).abs().max()) for k, v in one_ckpt["state_dict"].items())
        assert moved > 100 * 2e-5  # training moved the weights far more than the tolerance
        for key in ("ssim", "nmse", "psnr"):
            assert results[0][architecture][key] == pytest.approx(single.history[-1]["val"][key], rel=1e-5)
        assert results[0][architecture]["slices"] == 3
