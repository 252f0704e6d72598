"""2-D sampling masks (``gaussian2d``, ``poisson2d``) through data, models, attacks, training and the CLI (issue 13),
and the centre-fraction and crop checks of the MRI data path (issue 17)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blindspot.attacks.fnaf import FnafObjective, as_truths, attack_acquisition
from blindspot.cli import main
from blindspot.data.phantom_dataset import PhantomDataset
from blindspot.data.sample import KspaceTransform, collate_mri
from blindspot.errors import BlindspotError
from blindspot.fileio import read_jsonl
from blindspot.models.irim import IRIM, DataConsistencyUpdate
from blindspot.models.registry import build_model
from blindspot.physics.mri import center_crop, create_mask_func, fft2c, ifft2c, mask_on_grid, rss
from blindspot.training.mri import EpochMasks, reconstruct_batch
from helpers_data import write_singlecoil
from helpers_mri import tiny_mri_checkpoints

KSPACE = (48, 40)  # phantom k-space (rows, columns): the crop below is smaller, so masks are mapped onto it
CROP = (40, 40)
PHANTOM = {"shape": list(KSPACE), "recon_size": list(CROP)}


def _kspace(shape=(4, *KSPACE), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))


# ----------------------------------------------------------------------------------------------------------------
# Samples and batches carry the mask as drawn
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian2d", "poisson2d"])
def test_a_sample_is_the_2d_zero_filled_image_of_its_mask(kind):
    mask_func = create_mask_func(kind, [4])
    k = _kspace()  # 4 coils
    sample = KspaceTransform(mask_func, crop=CROP, kspace=True)(k, None, "vol7.h5", 0)
    drawn = mask_func(KSPACE[1], seed="vol7.h5", height=KSPACE[0])
    assert sample.mask.shape == KSPACE and torch.equal(sample.mask, drawn.mask)
    assert sample.num_low_frequencies == drawn.num_low_frequencies == round(KSPACE[1] * 0.08)
    # the known answer: RSS over coils of the cropped ifft2c(M ⊙ k)
    expect = rss(center_crop(ifft2c(k * drawn.mask), CROP), dim=0)
    torch.testing.assert_close(sample.input, expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(sample.kspace, (k * drawn.mask).to(torch.complex64))
    # single-coil: the magnitude; a column mask keeps its (1, W) shape
    single = KspaceTransform(mask_func, crop=CROP)(k[0], None, "vol7.h5", 0)
    torch.testing.assert_close(single.input[0], center_crop(ifft2c(k[0] * drawn.mask), CROP).abs(), atol=1e-5,
                               rtol=1e-5)
    column = KspaceTransform(create_mask_func("random", [4]), crop=CROP)(k[0], None, "vol7.h5", 0)
    assert column.mask.shape == (1, KSPACE[1])
    # a batch stacks them on the k-space grid, with the centre columns per item
    batch = collate_mri([sample, KspaceTransform(mask_func, crop=CROP, kspace=True)(k, None, "vol8.h5", 1)])
    assert batch.mask.shape == (2, 1, *KSPACE) and torch.equal(batch.mask[0, 0], drawn.mask)
    assert batch.num_low_frequencies.tolist() == [drawn.num_low_frequencies] * 2


def test_the_attack_sees_the_mask_functions_sampling_fraction():
    """Drawn on the truths' grid by the mask function (what ``fnaf`` and ``audit`` do), the attack's 2-D masks hold
    exactly ``round(h·w/R)`` samples (Gaussian); the batch's own masks, on the same grid, are used unchanged."""
    mask_func = create_mask_func("gaussian2d", [4])
    ds = PhantomDataset(volumes=2, slices=1, shape=CROP, recon_size=CROP, mask_func=mask_func)
    batch = collate_mri([ds[0], ds[1]])
    truths = as_truths(batch)
    acq = attack_acquisition(truths, mask_func)
    assert acq.mask.shape == (2, 1, *CROP) and acq.two_dimensional
    assert acq.mask.flatten(1).sum(1).tolist() == [round(CROP[0] * CROP[1] / 4)] * 2
    assert acq.num_low_frequencies.tolist() == [round(CROP[1] * 0.08)] * 2
    own = attack_acquisition(truths, None)
    assert torch.equal(own.mask, batch.mask) and torch.equal(own.mask, acq.mask)  # seeded by file name alike
    one = attack_acquisition(truths, batch.mask[0, 0])  # one 2-D mask tensor for every image
    assert one.mask.shape == (2, 1, *CROP) and torch.equal(one.mask[1], batch.mask[0])
    with pytest.raises(BlindspotError, match="the attack's mask is 8x8 but the truth is 40x40"):
        attack_acquisition(truths, torch.ones(8, 8))
    # on a cropped grid the batch's masks are mapped by nearest frequency (every row kept here is a drawn row)
    big = PhantomDataset(volumes=1, slices=1, shape=KSPACE, recon_size=CROP, mask_func=mask_func)
    b2 = collate_mri([big[0]])
    mapped = attack_acquisition(as_truths(b2), None).mask
    assert mapped.shape == (1, 1, *CROP) and torch.equal(mapped, mask_on_grid(b2.mask, CROP))
    rows = torch.round((torch.arange(CROP[0]) - CROP[0] // 2) * KSPACE[0] / CROP[0] + KSPACE[0] // 2).long()
    assert torch.equal(mapped[0, 0], b2.mask[0, 0, rows])


def test_a_feature_in_the_unsampled_part_of_a_2d_mask_fails_ip():
    """The audit's path (FnafObjective with the mask function): a real feature whose spectrum lies where the 2-D mask
    (and its mirror position) samples nothing leaves the input unchanged and is not accepted; one with sampled
    content is."""
    mask_func = create_mask_func("poisson2d", [4])
    ds = PhantomDataset(volumes=1, slices=1, shape=CROP, recon_size=CROP, mask_func=mask_func)
    batch = collate_mri([ds[0]])
    objective = FnafObjective()
    model = build_model("zero-filled")
    ctx = objective.prepare(model, batch, mask_func)
    m = ctx.acquisition.mask[0, 0]
    H, W = CROP
    i, j = torch.arange(H).reshape(H, 1), torch.arange(W).reshape(1, W)
    blind = (m == 0) & (m[(H - i) % H, (W - j) % W] == 0)
    assert int(blind.sum()) > 0.3 * H * W
    spectrum = torch.randn(1, 1, H, W, dtype=torch.complex64, generator=torch.Generator().manual_seed(1)) * blind
    hidden = ifft2c(spectrum).real
    hidden = 0.5 * float(batch.target.max()) * hidden / hidden.abs().max()
    seen = hidden + 0.3 * ifft2c(fft2c(batch.target) * m).real
    features = torch.cat([hidden, seen])
    ev = objective.evaluate(model, ctx, torch.zeros(2, dtype=torch.long), features, torch.ones_like(features).bool())
    assert float(ev.ip_loss[0]) < 1e-10 and not bool(ev.accepted[0])
    assert float(ev.ip_loss[1]) > 1e-4 and bool(ev.accepted[1])


# ----------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------
def test_irim_data_consistency_with_a_2d_mask():
    """The DC gradient ``F⁻¹ M F (η − x)`` with a 2-D mask mapped onto the image grid lives on the measured k-space
    only and equals ``F(η − x)`` there; an ``η`` whose measured k-space equals the input's gets no update; the
    chain with that mask inverts."""
    torch.manual_seed(0)
    mask = create_mask_func("gaussian2d", [4])(KSPACE[1], seed="v.h5", height=KSPACE[0]).mask
    model = IRIM(n_steps=1, n_latent=4, hidden_channels=[4], dilations=[1], head_channels=4).double()
    x = torch.randn(2, 1, *CROP, dtype=torch.float64)
    m = model.grid_mask(mask.reshape(1, 1, *KSPACE), 2, CROP[1], x)
    assert m.shape == (1, 1, *CROP) and m.dtype == torch.float64 and torch.equal(m, mask_on_grid(mask, CROP).double())
    eta = torch.randn(2, 1, *CROP, dtype=torch.float64)
    g = DataConsistencyUpdate.gradient(eta, x, m)
    kg = fft2c(torch.complex(g[:, :1], g[:, 1:]))
    diff = fft2c(eta - x)
    assert float((kg * (1 - m)).abs().max()) < 1e-12
    torch.testing.assert_close(kg * m, diff * m)
    H, W = CROP
    i, j = torch.arange(H).reshape(H, 1), torch.arange(W).reshape(1, W)
    blind = (m[0, 0] == 0) & (m[0, 0][(H - i) % H, (W - j) % W] == 0)  # unmeasured, and so is the mirror position
    null = ifft2c(fft2c(torch.randn(2, 1, H, W, dtype=torch.float64)) * blind).real  # real, unmeasured k-space only
    assert float(null.abs().max()) > 0.1
    assert float(DataConsistencyUpdate.gradient(x + null, x, m).abs().max()) < 1e-12
    h0 = model.initial_state(x) + 0.1 * torch.randn(2, 4, *CROP, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.invert_chain(model.run_chain(h0, x, m), x, m), h0)
        assert model(x, mask.reshape(1, 1, *KSPACE).expand(2, 1, *KSPACE)).shape == x.shape


class KspaceSpy(torch.nn.Module):
    """A k-space network (fastMRI's calling convention) that records its third argument and returns the RSS
    zero-filled image."""

    network_input = "kspace"

    def __init__(self):
        super().__init__()
        self.seen: list = []

    def forward(self, masked_kspace, mask, num_low_frequencies=None):
        self.seen.append((tuple(mask.shape), num_low_frequencies))
        return rss(ifft2c(torch.view_as_complex(masked_kspace.contiguous())), dim=1)[:, 0]


def test_training_passes_the_mask_functions_centre_columns_to_kspace_networks():
    """Training (reconstruct_batch) gives a k-space network the mask function's ``num_low_frequencies``, as the
    attacks do through their acquisition, and its 2-D mask as ``(B, 1, H, W, 1)``."""
    for kind in ("random", "gaussian2d"):
        masks = EpochMasks(create_mask_func(kind, [4], [0.16]), seed=3)
        ds = PhantomDataset(volumes=2, slices=1, shape=(32, 32), recon_size=(32, 32), mask_func=masks,
                            challenge="multicoil", num_coils=3, kspace=True)
        batch = collate_mri([ds[0], ds[1]])
        spy = KspaceSpy()
        out = reconstruct_batch(spy, batch)
        shape, low = spy.seen[-1]
        assert shape == ((2, 1, 1, 32, 1) if kind == "random" else (2, 1, 32, 32, 1))
        assert low.tolist() == [round(32 * 0.16)] * 2 and torch.equal(low, batch.num_low_frequencies)
        torch.testing.assert_close(batch.stats.invert(out), batch.input, atol=1e-4, rtol=1e-4)
        ctx = FnafObjective(reference=False).prepare(spy, batch, masks.inner)
        assert ctx.acquisition.num_low_frequencies.tolist() == low.tolist()
        own = FnafObjective(reference=False).prepare(spy, batch, None)  # the batch's own masks, on their own grid
        assert own.acquisition.num_low_frequencies.tolist() == low.tolist()
    ds = PhantomDataset(volumes=1, slices=1, shape=(32, 40), recon_size=(32, 32), crop=(32, 32), kspace=True,
                        challenge="multicoil", num_coils=3, mask_func=create_mask_func("random", [4], [0.16]))
    batch = collate_mri([ds[0]])  # masks on 40 k-space columns, truths on 32: their centre count does not carry over
    assert FnafObjective(reference=False).prepare(KspaceSpy(), batch, None).acquisition.num_low_frequencies is None


# ----------------------------------------------------------------------------------------------------------------
# Coil maps from a 2-D mask's calibration box
# ----------------------------------------------------------------------------------------------------------------
def test_coil_maps_from_the_calibration_box_and_a_box_too_small_for_espirit():
    """ESPIRiT calibrates on a 2-D mask's 12 × 12 box (48 × 48 multi-coil phantom, centre fraction 0.25): unit norm
    over coils on the object and, up to the per-pixel phase, the maps of the fully sampled coil images (measured
    mean |⟨ŝ, s_full⟩| 0.9986 — the same as from 12 ACS columns of a column mask; at 32 × 32, with an 8 × 8 box or
    8 columns, ESPIRiT's eigenvalues stay below its 0.95 crop either way). A box too small for its kernels is a one-line error."""
    mask_func = create_mask_func("gaussian2d", [4], [0.25])
    maps = {}
    for estimator in ("full", "espirit"):
        ds = PhantomDataset(volumes=1, slices=1, shape=(48, 48), recon_size=(48, 48), mask_func=mask_func,
                            challenge="multicoil", num_coils=4, coil_maps=estimator)
        sample = ds[0]
        maps[estimator] = sample.sens_maps
    inside = sample.target[0] > 0.3 * float(sample.target.max())
    assert maps["espirit"].shape == (4, 48, 48) and sample.attrs["coil_maps"] == "espirit"
    torch.testing.assert_close(rss(maps["espirit"], dim=0)[0][inside], torch.ones(int(inside.sum())), atol=1e-4,
                               rtol=0)
    agreement = (maps["espirit"].conj() * maps["full"]).sum(0).abs()[inside]
    assert float(agreement.mean()) > 0.99
    small = PhantomDataset(volumes=1, slices=1, shape=(40, 40), recon_size=(40, 40),
                           mask_func=create_mask_func("gaussian2d", [4]), challenge="multicoil", num_coils=4,
                           coil_maps="espirit")
    with pytest.raises(BlindspotError, match=r"calibration box is only 4x4; the ESPIRiT .*needs at least 7x7 .*--coil-maps, --mask-type") as info:
        small[0]
    assert "slice 0" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    physics = {"modality": "mri", "mask_type": "gaussian2d", "accelerations": [4.0], "center_fractions": [0.08],
               "crop": list(CROP), "phantom": PHANTOM}
    return tiny_mri_checkpoints(tmp_path_factory.mktemp("ckpt2d"), physics)


@pytest.mark.parametrize("kind", ["gaussian2d", "poisson2d"])
def test_fnaf_cli_with_2d_masks(checkpoints, tmp_path, kind):
    out = tmp_path / "run"
    assert main(["fnaf", "--model", str(checkpoints[1]), "--mask-type", kind, "--accelerations", "4",
                 "--phantom-volumes", "1", "--phantom-slices", "2", "--search", "rs", "--candidates", "2",
                 "--no-figures", "--out", str(out)]) == 0
    rows = read_jsonl(out / "records.jsonl")
    assert len(rows) == 2 and all(r["acceleration"] == 4.0 and r["search"] == "rs" for r in rows)
    assert all(np.isfinite(r["attack_loss"]) and r["ip_loss"] > 0 for r in rows)
    assert json.loads((out / "run.json").read_text())["settings"]["mask_type"] == kind


def test_audit_cli_with_a_2d_mask(checkpoints, tmp_path):
    out = tmp_path / "audit"
    assert main(["audit", "--model", str(checkpoints[0]), "--model", str(checkpoints[1]), "--mask-type",
                 "gaussian2d", "--accelerations", "4", "--phantom-volumes", "1", "--phantom-slices", "2",
                 "--search", "rs", "--candidates", "2", "--criteria", "recovery", "--no-figures", "--no-transfer",
                 "--no-beyond", "--invariance-images", "0", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["mask_type"] == "gaussian2d"
    assert set(results["attack_rates"]) == {"U-Net", "I-RIM"}
    assert all(r["4x"]["rs"]["n"] == 2 for r in results["attack_rates"].values())


def test_train_mri_cli_one_epoch_with_a_2d_mask(tmp_path):
    out = tmp_path / "train"
    assert main(["train", "mri", "--model", "irim", "--hparam", "n_steps=1", "--hparam", "n_latent=4",
                 "--hparam", "hidden_channels=[4]", "--hparam", "dilations=[1]", "--hparam", "head_channels=4",
                 "--mask-type", "poisson2d", "--accelerations", "4", "--phantom-shape", "32", "32",
                 "--phantom-recon-size", "32", "32", "--phantom-volumes", "2", "--phantom-val-volumes", "1",
                 "--phantom-slices", "2", "--epochs", "1", "--batch-size", "2", "--no-progress",
                 "--out", str(out)]) == 0
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["physics"]["mask_type"] == "poisson2d"
    epochs = [r for r in read_jsonl(out / "log.jsonl") if r.get("event") == "epoch"]
    assert len(epochs) == 1 and np.isfinite(epochs[0]["val"]["ssim"])


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, the option or file named
# ----------------------------------------------------------------------------------------------------------------
def _one_line_error(argv, capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "Traceback" not in captured.err, captured.err
    return err[0]


def test_a_centre_fraction_that_rounds_to_no_column_is_an_error(tmp_path, capsys):
    with pytest.raises(BlindspotError, match="--center-fractions: 0.01 of 40 columns rounds to no fully sampled"):
        create_mask_func("random", [4], [0.01])(40, seed=1)
    with pytest.raises(BlindspotError, match="--center-fractions: 0.01 of 32 rows"):
        create_mask_func("gaussian2d", [4], [0.01])(64, seed=1, height=32)
    line = _one_line_error(["fnaf", "--model", "zero-filled", "--phantom-shape", "32", "32", "--phantom-recon-size",
                            "32", "32", "--phantom-volumes", "1", "--phantom-slices", "1", "--accelerations", "8",
                            "--center-fractions", "0.01", "--mask-type", "gaussian2d", "--no-figures", "--out",
                            str(tmp_path / "o")], capsys)
    assert "--center-fractions" in line and "rounds to no fully sampled" in line


def test_a_crop_larger_than_the_kspace_is_an_error(tmp_path, capsys):
    k = _kspace((1, 24, 20))
    with pytest.raises(BlindspotError, match=r"--crop: 24 24 is larger than the 24x20 image of vol.h5"):
        KspaceTransform(create_mask_func("gaussian2d", [4]), crop=(24, 24))(k, None, "vol.h5", 0)
    path = tmp_path / "small.h5"
    write_singlecoil(path, slices=1, size=(32, 32), recon=(24, 24))
    line = _one_line_error(["fnaf", "--model", "zero-filled", "--data", str(path), "--crop", "30", "30",
                            "--mask-type", "poisson2d", "--accelerations", "4", "--no-figures", "--out",
                            str(tmp_path / "o")], capsys)
    assert line.endswith(f"--crop: 30 30 is larger than the 24x24 image of {path}"), line
