"""FNAF-robust training: the examples are drawn as the attack draws them, the loss is the usual loss plus the weighted
attack loss, the worst-of-k search picks the worst candidate, training runs through the CLI, and under two gloo
processes both ranks stay in sync."""

import json
import os
import socket
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from blindspot.attacks.features import FeatureSampler, Region, candidate_keys
from blindspot.attacks.fnaf import FnafObjective
from blindspot.cli import main
from blindspot.data.sample import collate_mri
from blindspot.errors import BlindspotError
from blindspot.models.registry import build_model
from blindspot.training.distributed import DistContext
from blindspot.training.engine import seed_everything
from blindspot.training.mri import mri_loss
from blindspot.physics.mri import CartesianUndersampling, NormStats, normalize, resample_mask
from blindspot.training.robust import RobustConfig, fnaf_robust_loss, make_examples

TINY_UNET = {"chans": 4, "num_pool_layers": 2}


def _batch(n=4, size=(32, 32), seed=0):
    from helpers_mri import TinyMRIDataset

    ds = TinyMRIDataset(volumes=n, slices=1, size=size, seed=seed)
    return collate_mri([ds[i] for i in range(len(ds))])


def _ctx(step=0, seed=0):
    g = torch.Generator().manual_seed(1234 + step)
    return SimpleNamespace(seed=seed, step=step, generator=g, device=torch.device("cpu"))


def _model(arch="unet"):
    seed_everything(0)
    if arch == "unet":
        return build_model("unet", **TINY_UNET)
    return build_model("irim", n_steps=2, n_latent=6, hidden_channels=[6], dilations=[2], head_channels=4)


def test_config_rejects_bad_settings():
    for bad in (dict(fraction=1.5), dict(families=("square",)), dict(weight=-1.0), dict(search="bfgs"),
                dict(candidates=0)):
        with pytest.raises(BlindspotError):
            RobustConfig(**bad)


def test_examples_follow_the_attack_and_rs_keeps_the_worst():
    batch, model = _batch(), _model()
    objective = FnafObjective(reference=False, fuse_reference=False)
    cfg = RobustConfig(fraction=0.5, search="rs", candidates=5)
    ex = make_examples(model, batch, cfg, objective, torch.Generator().manual_seed(3), seed=7)
    assert len(ex.chosen) == 2 and ex.feature.shape == (2, 1, 32, 32)
    assert (ex.feature >= 0).all() and ex.support.any()
    assert torch.equal(ex.feature > 0, ex.support & (ex.feature > 0))  # values only inside the support
    # the same seed gives the same examples
    again = make_examples(model, batch, cfg, objective, torch.Generator().manual_seed(3), seed=7)
    assert torch.equal(ex.feature, again.feature) and torch.equal(ex.chosen, again.chosen)
    # the kept feature is the worst of the 5 candidates the attack's sampler draws for that image
    ctx = ex.ctx
    keys = candidate_keys(ctx.image_keys, torch.arange(5))
    feats = FeatureSampler("walk", ((10, 99), (0, 0))).sample(keys, ctx.region, ctx.dynamic_range)  # the seed's
    assert torch.equal(feats.size, cfg.sampler("walk").sample(keys, ctx.region, ctx.dynamic_range).size)
    v, s = feats.render(ctx.shape)
    with torch.no_grad():
        ev = objective.evaluate(model, ctx, torch.arange(2).repeat_interleave(5), v, s)
        kept = objective.evaluate(model, ctx, torch.arange(2), ex.feature, ex.support)
    worst = ev.attack_loss.reshape(2, 5).amax(1)
    torch.testing.assert_close(kept.attack_loss, worst)
    # the features start inside the attack's region (the central crop)
    top, left, h, w = Region().box(32, 32)
    centres = feats.center.reshape(2, 5, 2)
    assert ((centres[..., 0] >= top) & (centres[..., 0] < top + h)).all()
    assert ((centres[..., 1] >= left) & (centres[..., 1] < left + w)).all()


def test_gradient_search_increases_the_attack_loss():
    batch, model = _batch(), _model()
    objective = FnafObjective(reference=False, fuse_reference=False)
    base = make_examples(model, batch, RobustConfig(fraction=1.0, search="rs", candidates=2), objective,
                         torch.Generator().manual_seed(0), seed=1)
    grad = make_examples(model, batch, RobustConfig(fraction=1.0, search="grad", candidates=2, grad_steps=3), objective,
                         torch.Generator().manual_seed(0), seed=1)
    with torch.no_grad():
        a = objective.evaluate(model, base.ctx, base.image_idx, base.feature, base.support).attack_loss
        b = objective.evaluate(model, grad.ctx, grad.image_idx, grad.feature, grad.support).attack_loss
    assert torch.equal(base.support, grad.support)
    assert b.mean() > a.mean()


@pytest.mark.parametrize("arch", ["unet", "irim"])
def test_loss_is_usual_on_the_replaced_batch_plus_weighted_attack_loss(arch):
    batch, model = _batch(), _model(arch)
    usual = mri_loss("l1")
    ctx = _ctx(step=5)
    plain, _ = usual(model, batch, ctx)
    zero = fnaf_robust_loss(usual, RobustConfig(fraction=0.0))(model, batch, _ctx(step=5))[0]
    torch.testing.assert_close(zero, plain)
    w1, ex1 = fnaf_robust_loss(usual, RobustConfig(fraction=0.5, weight=1.0))(model, batch, _ctx(step=5))
    w3, ex3 = fnaf_robust_loss(usual, RobustConfig(fraction=0.5, weight=3.0))(model, batch, _ctx(step=5))
    torch.testing.assert_close(w1, ex1["base_loss"] + ex1["fnaf_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w3, ex3["base_loss"] + 3.0 * ex3["fnaf_loss"], rtol=1e-5, atol=1e-6)
    # the usual loss is that of the batch whose chosen rows are the perturbed pairs, built here by hand: the zero-filled
    # image of y + δ' under the image's own mask, normalised with its own statistics (the seed's normalisation)
    objective = FnafObjective(reference=False, fuse_reference=False)
    ex = make_examples(model, batch, RobustConfig(fraction=0.5), objective, _ctx(step=5).generator,
                       (0 * 1_000_003 + 5) & 0x7FFFFFFF)
    inputs, targets = batch.input.clone(), batch.target.clone()
    means, stds = batch.stats.mean.clone(), batch.stats.std.clone()
    for k, row in enumerate(ex.chosen.tolist()):
        y_p = batch.target[row : row + 1] + ex.feature[k : k + 1]
        x_p = CartesianUndersampling(resample_mask(batch.mask[row], 32).reshape(32))(y_p)
        _, st = normalize(x_p)
        inputs[row], targets[row], means[row], stds[row] = x_p[0], y_p[0], st.mean[0], st.std[0]
    assert not torch.equal(inputs, batch.input)
    by_hand = replace(batch, input=inputs, target=targets, stats=NormStats(means, stds, batch.stats.clamp))
    with torch.no_grad():
        expected, _ = usual(model, by_hand, ctx)
        direct = objective.evaluate(model, ex.ctx, ex.image_idx, ex.feature, ex.support).attack_loss.mean()
    torch.testing.assert_close(ex1["base_loss"], expected, rtol=1e-4, atol=1e-6)
    # the attack loss is the attack's L_atk of the examples, recomputed independently
    torch.testing.assert_close(ex1["fnaf_loss"], direct, rtol=1e-4, atol=1e-6)
    w1.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _counting(model):
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append((i[0].shape[0], torch.is_grad_enabled())))
    return calls


def test_a_robust_step_runs_the_network_once_on_the_usual_batch():
    """No forward pass beyond a standard step's: ``draw`` calls the network once, on B images; ``rs`` adds only its
    gradient-free scoring of the candidates."""
    batch, model = _batch(), _model()
    calls = _counting(model)
    loss, _ = fnaf_robust_loss(mri_loss("l1"), RobustConfig(fraction=0.5, search="draw"))(model, batch, _ctx(step=1))
    assert calls == [(4, True)]
    calls.clear()
    fnaf_robust_loss(mri_loss("l1"), RobustConfig(fraction=0.5, search="rs", candidates=3))(model, batch, _ctx(step=1))
    assert [c for c in calls if c[1]] == [(4, True)]
    assert sum(n for n, grad in calls if not grad) == 2 * 3  # 2 chosen images × 3 candidates, without gradients


def test_alternate_mixing_is_a_clean_step_then_a_feature_step():
    batch, model = _batch(), _model()
    usual = mri_loss("l1")
    loss_fn = fnaf_robust_loss(usual, RobustConfig(fraction=1.0, search="draw", mixing="alternate"))
    for step in (0, 2):
        torch.testing.assert_close(loss_fn(model, batch, _ctx(step=step))[0], usual(model, batch, _ctx(step=step))[0])
    loss, extras = loss_fn(model, batch, _ctx(step=1))
    assert "fnaf_loss" in extras and float(extras["fnaf_loss"]) > 0
    with pytest.raises(BlindspotError):
        RobustConfig(mixing="sometimes")


def test_training_on_the_attack_loss_lowers_it():
    """A few robust steps with a large weight lower the attack loss of fixed features (known direction)."""
    batch, model = _batch(n=4), _model()
    objective = FnafObjective(reference=False, fuse_reference=False)
    ex = make_examples(model, batch, RobustConfig(fraction=1.0, search="draw"), objective,
                       torch.Generator().manual_seed(0), seed=9)

    def atk():
        with torch.no_grad():
            return objective.evaluate(model, ex.ctx, ex.image_idx, ex.feature, ex.support).attack_loss.mean().item()

    before = atk()
    loss_fn = fnaf_robust_loss(mri_loss("l1"), RobustConfig(fraction=1.0, search="draw", weight=20.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(25):
        opt.zero_grad()
        loss, _ = loss_fn(model, batch, _ctx(step=step))
        loss.backward()
        opt.step()
    assert atk() < 0.7 * before


def test_train_mri_cli_robust(tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "mri", "--model", "unet", "--hparam", "chans=4", "--hparam", "num_pool_layers=2",
               "--phantom-shape", "32", "32", "--phantom-recon-size", "32", "32", "--phantom-volumes", "2",
               "--phantom-val-volumes", "1", "--phantom-slices", "2", "--epochs", "1", "--batch-size", "2",
               "--robust", "--robust-search", "grad", "--robust-families", "walk", "disc", "--robust-weight", "2",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["robust"]["families"] == ["walk", "disc"] and summary["robust"]["weight"] == 2.0
    epoch = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"epoch"' in line][-1]
    assert epoch["train"]["fnaf_loss"] > 0 and 0 <= epoch["train"]["fnaf_lost"] <= 1
    assert main(["train", "mri", "--robust", "--robust-fraction", "2", "--out", str(tmp_path / "bad")]) == 2


# ---- two processes ---------------------------------------------------------------------------------------------
def _worker(rank, world, port, out_root, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from helpers_mri import TinyMRIDataset

    from blindspot.physics.mri import create_mask_func
    from blindspot.training.engine import TrainConfig
    from blindspot.training.mri import EpochDataset, EpochMasks, train_mri

    dist = DistContext.from_env(device="cpu")
    try:
        masks = EpochMasks(create_mask_func("random", [4], [0.08]), seed=1)
        train = EpochDataset(TinyMRIDataset(volumes=4, slices=1, mask_func=masks, seed=0), masks)
        seed_everything(3)
        model = build_model("unet", **TINY_UNET)
        config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, seed=2, progress=False, log_every=1)
        loss_fn = fnaf_robust_loss(mri_loss("l1"), RobustConfig(fraction=0.5, search="grad", grad_steps=1))
        train_mri(model, "unet", TINY_UNET, train, None, config, out_root, dist=dist, loss_fn=loss_fn)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        queue.put((rank, flat.tolist()))
    finally:
        dist.shutdown()


def test_two_process_robust_training_stays_in_sync(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(got[1]))
    assert (tmp_path / "last.pt").exists()
