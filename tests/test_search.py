"""RS / FD / gradient searches, records, aggregation and replay (transferability)."""

from __future__ import annotations

import math

import pytest
import torch

from blindspot.attacks.features import FeatureSampler
from blindspot.attacks.records import (
    RECORD_COLUMNS,
    ip_table,
    load_features,
    save_features,
    summarize,
    table2,
    transfer_rate,
)
from blindspot.report.tables import ip_table_markdown, table2_markdown
from blindspot.attacks.search import (
    FiniteDifferenceSearch,
    GradientSearch,
    RandomSearch,
    ReplaySearch,
    build_search,
)
from blindspot.errors import BlindspotError
from blindspot.models.adapters import reconstruct
from blindspot.models.unet import Unet
from blindspot.physics.mri import create_mask_func
from test_fnaf import Blur, Identity, make_batch, phantoms

MF = create_mask_func("random", [4])


@pytest.fixture(scope="module")
def trained_unet():
    """A small U-Net trained for a few dozen steps to reconstruct the 48×48 phantoms from 4x zero-filled input."""
    torch.manual_seed(0)
    model = Unet(chans=8, num_pool_layers=2)
    batch = make_batch(phantoms(10), MF, prefix="train")
    x, y = batch.normalized()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = (reconstruct(model, x) - y).abs().mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first  # it learned something
    return model.eval()


def test_rs_is_deterministic_and_independent_of_batching_and_chunks():
    batch = make_batch(phantoms(4), MF)
    a = RandomSearch(n_candidates=7, seed=3)(Blur(2.0), batch, MF)
    b = RandomSearch(n_candidates=7, seed=3, chunk_size=5)(Blur(2.0), batch, MF)
    assert a.rows() == RandomSearch(n_candidates=7, seed=3)(Blur(2.0), batch, MF).rows()
    for k in ("center", "size", "intensity", "seed"):
        assert torch.equal(a.features.as_dict()[k], b.features.as_dict()[k])
    assert torch.allclose(a.evaluation.attack_loss, b.evaluation.attack_loss, rtol=1e-5)
    # an image attacked alone gets the same feature as inside the batch
    alone = make_batch(phantoms(4)[2:3], MF)
    alone.fname[0], alone.slice_num[0] = batch.fname[2], batch.slice_num[2]
    c = RandomSearch(n_candidates=7, seed=3)(Blur(2.0), alone, MF)
    assert torch.equal(c.features.center[0], a.features.center[2])
    # another seed, other features
    d = RandomSearch(n_candidates=7, seed=4)(Blur(2.0), batch, MF)
    assert not torch.equal(d.features.center, a.features.center)


def test_more_rs_candidates_never_find_a_lower_worst_loss(trained_unet):
    batch = make_batch(phantoms(6), MF)
    prev = None
    for n in (1, 3, 7, 15):
        res = RandomSearch(n_candidates=n, seed=1)(trained_unet, batch, MF)
        assert bool(res.evaluation.accepted.all())
        loss = res.evaluation.attack_loss
        if prev is not None:
            # a superset of candidates: the worst case can only grow (up to float round-off, as the same candidate
            # is reconstructed inside batches of another size)
            assert bool((loss >= prev * (1 - 1e-5)).all())
        prev = loss
        assert int(res.queries[0]) == n + 1  # n candidates + the clean reference


def test_fd_ascends_from_its_start_and_counts_its_queries(trained_unet):
    batch = make_batch(phantoms(4), MF)
    start = RandomSearch(n_candidates=1, seed=2)(trained_unet, batch, MF)
    fd = FiniteDifferenceSearch(seed=2)(trained_unet, batch, MF)
    assert bool((fd.evaluation.score >= start.evaluation.score).all())
    assert int(fd.queries[0]) == 1 + 2 * 5 + 1  # the seed's FD on walks: location only, 2 iterations (+ reference)
    # discs have an intensity range, so FD also probes the intensity: 1 + 2 × (2·3 + 1) queries
    fd_disc = FiniteDifferenceSearch(sampler=FeatureSampler("disc"), seed=2)(trained_unet, batch, MF)
    assert int(fd_disc.queries[0]) == 1 + 2 * 7 + 1
    hi = FeatureSampler("disc").intensities[1]
    assert bool((fd_disc.features.intensity <= hi * (batch.target.flatten(1).amax(1) + 1e-5)).all())
    # FD moves its features but keeps them in the region (the central crop's box)
    from blindspot.attacks.features import Region

    top, left, ch, cw = Region().box(48, 48)
    for res in (fd, fd_disc):
        c = res.features.center
        assert bool(((c[:, 0] >= top) & (c[:, 0] <= top + ch - 1) & (c[:, 1] >= left) & (c[:, 1] <= left + cw - 1)).all())
    assert bool((fd.features.center != start.features.center).any())


def test_gradient_search_beats_rs_at_equal_queries(trained_unet):
    batch = make_batch(phantoms(8), MF)
    rs = RandomSearch(n_candidates=11, seed=5)(trained_unet, batch, MF)
    grad = GradientSearch(seed=5)(trained_unet, batch, MF)  # 4 random starts, 6 ascent steps, 1 final evaluation
    assert torch.equal(rs.queries, grad.queries)  # 12 forward passes per image each (with the reference)
    assert int(grad.gradients[0]) == 6
    # the ascent itself raises the loss of the start it was given well above it
    start = RandomSearch(n_candidates=4, seed=5)(trained_unet, batch, MF)
    assert bool((grad.evaluation.attack_loss >= 1.25 * start.evaluation.attack_loss).all())
    assert float(grad.evaluation.attack_loss.mean()) > float(rs.evaluation.attack_loss.mean())
    assert int((grad.evaluation.attack_loss > rs.evaluation.attack_loss).sum()) >= 5
    # the optimised feature stays inside its support and the allowed range
    vmax = batch.target.flatten(1).amax(1) - batch.target.flatten(1).amin(1)
    assert bool((grad.feature[~grad.support] == 0).all())
    assert float(grad.feature.min()) >= 0
    assert bool((grad.feature.flatten(1).amax(1) <= vmax + 1e-5).all())
    # and its records are reproducible, chunked or not
    again = GradientSearch(seed=5, chunk_size=3)(trained_unet, batch, MF)
    assert torch.allclose(again.evaluation.attack_loss, grad.evaluation.attack_loss, rtol=1e-4)


def test_rows_have_the_record_columns_and_summaries_match_them():
    batch = make_batch(phantoms(5), MF)
    res = RandomSearch(n_candidates=4)(Blur(3.0), batch, MF)
    rows = res.rows(model="blur")
    assert len(rows) == 5 and list(rows[0]) == list(RECORD_COLUMNS)
    assert rows[0]["model"] == "blur" and rows[0]["search"] == "rs" and rows[0]["queries"] == 5
    sm = summarize(rows)
    k = sum(r["success"] for r in rows)
    assert sm["n"] == 5 and sm["attack_rate"] == k / 5
    assert sm["ci_low"] <= sm["attack_rate"] <= sm["ci_high"]
    assert math.isclose(sm["mean_attack_loss"], sum(r["attack_loss"] for r in rows) / 5, rel_tol=1e-9)
    assert math.isclose(sm["mean_ip_loss"], sum(r["ip_loss"] for r in rows) / 5, rel_tol=1e-9)


def test_summaries_and_tables_on_known_counts():
    def row(success, accepted=True, loss=2e-3, ip=5e-4, acc=4.0, search="rs"):
        return {"key": "k", "acceleration": acc, "search": search, "success": success, "success_seed": success,
                "success_recovery": False, "accepted": accepted, "attack_loss": loss, "recovery": 0.9,
                "ip_loss": ip, "queries": 12, "criterion": "seed"}

    rows = [row(True)] * 84 + [row(False, loss=5e-4)] * 16
    sm = summarize(rows)
    assert sm["attack_rate"] == 0.84 and sm["attack_rate_recovery"] == 0.0 and sm["ip_acceptance"] == 1.0
    assert abs(sm["ci_low"] - 0.75585) < 1e-4 and abs(sm["ci_high"] - 0.89904) < 1e-4  # Wilson, n = 100
    assert math.isclose(sm["mean_attack_loss"], 0.84 * 2e-3 + 0.16 * 5e-4)
    summaries = {("U-Net", 4.0, "rs"): sm, ("U-Net", 4.0, "fd"): summarize([row(True)] * 3 + [row(False)])}
    t_rows, md = table2(summaries), table2_markdown(summaries)
    assert t_rows[0]["rs_attack_rate"] == 0.84 and t_rows[0]["fd_attack_rate"] == 0.75
    assert "| RS (Attack Rate %) | FD (Attack Rate %) | RS (MSE) | FD (MSE) |" in md
    assert "84.00 (75.58–89.90)" in md
    i_rows, imd = ip_table(summaries), ip_table_markdown(summaries)
    assert i_rows[0]["quantity"] == "Acceptance Rate (%)" and "IP Loss (MSE)" in imd
    # transfer: of the source's 2 successes, the target fails one
    src = [dict(row(True), key="a"), dict(row(True), key="b"), dict(row(False), key="c")]
    tgt = [dict(row(True), key="a"), dict(row(False), key="b"), dict(row(True), key="c")]
    tr = transfer_rate(src, tgt)
    assert tr["n_matched"] == 2 and tr["transfer_rate"] == 0.5 and abs(tr["target_rate_all"] - 2 / 3) < 1e-12


def test_saved_features_replay_to_the_same_scores(tmp_path, trained_unet):
    batch = make_batch(phantoms(4), MF)
    res = GradientSearch(steps=3)(trained_unet, batch, MF)
    path = save_features(tmp_path / "feats" / "batch_00000.pt", res, model="unet")
    assert path.with_suffix(".json").exists()
    saved = load_features(tmp_path / "feats")
    assert len(saved) == 4 and saved.searches() == ["grad"]
    replay = ReplaySearch(saved=saved)
    assert replay.name == "replay-grad"
    same = replay(trained_unet, batch, MF)
    assert torch.allclose(same.evaluation.attack_loss, res.evaluation.attack_loss, rtol=1e-4, atol=1e-9)
    tr = transfer_rate(res.rows(), same.rows())
    assert tr["n_matched"] == int(res.evaluation.success_seed.sum())
    if tr["n_matched"]:
        assert tr["transfer_rate"] == 1.0
    # another model: the features carry over as images
    other = replay(Identity(), batch, MF)
    assert len(other) == 4 and torch.equal(other.feature, res.feature)
    # images without saved features are left out
    more = make_batch(phantoms(5), MF)
    assert len(replay(trained_unet, more, MF)) == 4


def test_bad_saved_features_and_configurations_are_user_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(BlindspotError, match="junk.pt"):
        load_features(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(BlindspotError, match="not a blindspot-fnaf-features"):
        load_features(tmp_path / "other.pt")
    with pytest.raises(BlindspotError):
        load_features(tmp_path / "missing")
    with pytest.raises(BlindspotError):
        build_search("bfs")
    with pytest.raises(BlindspotError):
        RandomSearch(n_candidates=0)
    with pytest.raises(BlindspotError):
        FiniteDifferenceSearch(coordinates=("angle",))
    with pytest.raises(BlindspotError):
        GradientSearch(step_size=0)


def test_rs_under_both_criteria_shares_one_set_of_model_calls():
    """RS draws the same candidates under either criterion: on one context the second criterion re-uses the first's
    scores (no model call) and picks exactly what it picks on a context of its own."""
    from blindspot.attacks.fnaf import FnafObjective

    class Counting(Blur):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return super().forward(x)

    batch = make_batch(phantoms(3), MF)
    net = Counting(2.0)
    seed_rs = RandomSearch(n_candidates=5, seed=1, objective=FnafObjective(criterion="seed", reference=True))
    rec_rs = RandomSearch(n_candidates=5, seed=1, objective=FnafObjective(criterion="recovery"))
    assert seed_rs.context_key() == rec_rs.context_key()
    ctx = seed_rs.prepare(net, batch, MF)
    a = seed_rs.run(net, ctx)
    calls = Counting.calls
    b = rec_rs.run(net, ctx)
    assert Counting.calls == calls  # scored once
    alone = rec_rs(net, batch, MF)
    assert b.rows() == alone.rows()
    assert a.rows() == seed_rs(net, batch, MF).rows()
    assert torch.isfinite(a.evaluation.recovery).all()  # the seed criterion's evaluation carries the recovery too
    assert not torch.equal(a.evaluation.score, b.evaluation.score)  # each scored under its own criterion
