"""A tiny in-memory MRI data set for training / evaluation tests: smooth complex images → k-space → MRISample."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from blindspot.data.sample import KspaceTransform, MRISample
from blindspot.physics.mri import create_mask_func, fft2c
from helpers_data import complex_volume


class TinyMRIDataset(Dataset):
    """``volumes × slices`` single-coil slices of ``size``; masks drawn by ``mask_func`` seeded with the volume name.

    ``samples`` lists ``(volume, slice)`` like the real data sets, so :func:`split_volumes` needs no loading.
    """

    def __init__(self, volumes=4, slices=2, size=(32, 32), mask_func=None, seed=0, accelerations=(4,)):
        if mask_func is None:
            mask_func = create_mask_func("random", accelerations)
        self.mask_func = mask_func
        self.kspace = [fft2c(torch.from_numpy(complex_volume((slices, *size), seed=seed + v))) for v in range(volumes)]
        self.samples = [(v, s) for v in range(volumes) for s in range(slices)]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> MRISample:
        v, s = self.samples[index]
        k = self.kspace[v][s]
        return KspaceTransform(self.mask_func, crop=None, use_seed=True)(k, None, f"vol{self.seed + v}.h5", s)


def tiny_mri_checkpoints(folder, physics: dict) -> tuple:
    """An untrained tiny U-Net and I-RIM saved as checkpoints in ``folder`` with ``physics`` (seed 0): fast models
    for end-to-end runs of the commands. Returns the two paths."""
    from blindspot.models.checkpoint import save_checkpoint
    from blindspot.models.registry import build_model
    from blindspot.training.engine import seed_everything

    seed_everything(0)
    unet_hp = {"chans": 4, "num_pool_layers": 2}
    unet = save_checkpoint(folder / "unet.pt", build_model("unet", **unet_hp), "unet", unet_hp, physics=physics)
    hp = {"n_steps": 1, "n_latent": 4, "hidden_channels": [4], "dilations": [1], "head_channels": 4}
    irim = save_checkpoint(folder / "irim.pt", build_model("irim", **hp), "irim", hp, physics=physics)
    return unet, irim
