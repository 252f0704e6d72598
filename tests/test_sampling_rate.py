"""Sampling-rate stability and the audit's beyond-the-seeds section (blindspot.runs.beyond).

Known answers: seeded random masks of one image are nested over accelerations (so "more samples" is literal); the
zero-filled input improves with every added sample and is never flagged; a planted network whose error grows with the
sampled fraction is flagged at the low accelerations and marked as worse than zero-filled; a resumed run recomputes
nothing. The audit entry point writes its four sections.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from blindspot.fileio import read_jsonl
from blindspot.models.loading import LoadedModel
from blindspot.physics.mri import create_mask_func, ifft2c
from blindspot.runs.beyond import BeyondConfig, build_settings, run_beyond_audit, run_sampling

SIZE = 32
PHYSICS = {"modality": "mri", "crop": [SIZE, SIZE], "phantom": {"shape": [SIZE, SIZE], "recon_size": [SIZE, SIZE]}}


class WorseWithMoreSamples(nn.Module):
    """k-space network: the zero-filled magnitude plus a bias that grows with the sampled fraction."""

    network_input = "kspace"

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        zf = ifft2c(torch.view_as_complex(kspace.contiguous())[:, 0]).abs()
        frac = mask.float().flatten(1).mean(1).reshape(-1, 1, 1)
        return zf + 10.0 * frac * zf.mean((1, 2), keepdim=True)


def model(module: nn.Module, name: str) -> LoadedModel:
    return LoadedModel(module, name, "mri", "custom", "test", physics=dict(PHYSICS))


def test_seeded_random_masks_are_nested_over_accelerations():
    accs = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
    for width in (64, 368):
        for seed in ("file1000.h5", "file2001.h5", 7):
            masks = [create_mask_func("random", [a])(width, seed=seed).mask for a in accs]
            for more, fewer in zip(masks, masks[1:]):
                assert torch.all(more >= fewer)  # every column of the higher acceleration is also sampled here
                assert more.sum() >= fewer.sum()


def test_planted_instability_is_flagged_and_zero_filled_is_not(tmp_path):
    models = [model(WorseWithMoreSamples(), "unstable")]
    settings = build_settings(models, accelerations=(4.0,), volumes=1, slices=3, seed=100)
    config = BeyondConfig(sampling_accelerations=(2.0, 4.0, 12.0), figures=False)
    res = run_sampling(models, settings, tmp_path / "sr", config)
    by = {(s["model"], s["acceleration"]): s for s in res.summary}
    zf = [by[("zero-filled", a)] for a in (2.0, 4.0, 12.0)]
    assert zf[0]["ssim"] > zf[1]["ssim"] > zf[2]["ssim"] and zf[0]["nmse"] < zf[1]["nmse"] < zf[2]["nmse"]
    assert not any(s["flag_ssim"] or s["flag_nmse"] for s in zf)
    assert by[("unstable", 2.0)]["flag_nmse"] and by[("unstable", 2.0)]["below_zero_filled"]
    assert not by[("unstable", 12.0)]["flag_nmse"]  # nothing with fewer samples to be worse than
    assert {"model": "unstable", "acceleration": 2.0} in res.results["below_zero_filled"]
    n_rows = len(read_jsonl(tmp_path / "sr" / "records.jsonl"))
    assert n_rows == 3 * 3 * 2  # images x accelerations x (network, zero-filled)
    again = run_sampling(models, settings, tmp_path / "sr", config, resume=True)
    assert len(read_jsonl(tmp_path / "sr" / "records.jsonl")) == n_rows
    assert again.summary == res.summary


def test_audit_section_writes_every_section(tmp_path):
    models = [model(WorseWithMoreSamples(), "unstable"), model(nn.Identity(), "identity")]
    settings = build_settings(models, accelerations=(4.0,), volumes=1, slices=2, seed=100)
    config = BeyondConfig.demo(images=2, attack_images=1, sampling_images=2, steps=2, fp_steps=2)
    section = run_beyond_audit(models, settings, tmp_path, config, progress=False)
    assert set(section.results) == {"hallucinations", "worst_case", "false_positive", "sampling", "timings_s"}
    assert len(section.html_sections) == 4 and all(h.startswith("<section") for h in section.html_sections)
    assert all(p.is_file() for _, _, p in section.figures)
    hall = section.results["hallucinations"]["summary"]
    assert {(s["model"], s["acceleration"]) for s in hall} == {("unstable", 4.0), ("identity", 4.0)}
    # the identity "network" returns the zero-filled input: for a real truth and a random mask its error is mostly
    # unmeasured, and the worst case cannot be worse than passing the perturbation through (gain <= 1)
    wc = [s for s in section.results["worst_case"]["summary"] if s["model"] == "identity"]
    assert wc and all(s["gain_pgd"] <= 1.0 + 1e-3 for s in wc)
    json.dumps(section.results)  # results.json material
    assert (tmp_path / "beyond" / "worst_case" / "records.csv").is_file()
