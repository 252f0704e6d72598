"""Attacks under ``torchrun`` (2 CPU processes, gloo) write exactly what one process writes; a job that loses a rank
fails (no hang) and ``--resume`` — here with one process, another world size — finishes it to the same records; the
clean reference shared by the searches of a batch (and the batched transfer replay) gives the records of independent
searches.

The torchrun jobs are real: ``python -m torch.distributed.run --nproc_per_node 2 -m blindspot.cli …``; the failing
rank is killed (SIGKILL) as soon as its first record is on disk, with two of its three batches still to do.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers_mri import tiny_mri_checkpoints
from blindspot.attacks.fnaf import FnafObjective
from blindspot.attacks.records import load_features
from blindspot.attacks.search import GradientSearch, RandomSearch, ReplaySearch, replay_together
from blindspot.cli import main
from blindspot.models.adapters import as_network
from blindspot.runs.fnaf import attack_setting, mri_settings

PHYSICS = {"modality": "mri", "mask_type": "random", "accelerations": [4.0], "center_fractions": [0.08],
           "crop": [32, 32], "phantom": {"shape": [32, 32], "recon_size": [32, 32]}}
FNAF = ["--phantom-volumes", "3", "--phantom-slices", "2", "--accelerations", "4", "--batch-size", "1",
        "--candidates", "3", "--no-figures", "--device", "cpu"]  # 6 batches of one image: 3 per rank


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_mri_checkpoints(tmp_path_factory.mktemp("ckpt"), PHYSICS)


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory):
    """The FNAF run of one process."""
    one = tmp_path_factory.mktemp("one") / "run"
    assert main(["fnaf", "--model", str(checkpoints[0]), "--out", str(one), *FNAF]) == 0
    assert len((one / "records.jsonl").read_text().splitlines()) == 6  # 6 images, once each
    return one


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), "-m", "blindspot.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's child process that runs ``rank`` (from its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_fnaf_under_torchrun_writes_what_one_process_writes(checkpoints, reference, tmp_path):
    unet, _ = checkpoints
    one, two = reference, tmp_path / "two"
    rc, out = _finish(_torchrun(["fnaf", "--model", str(unet), "--out", str(two), *FNAF]))
    assert rc == 0, out[-3000:]
    for name in ("records.jsonl", "records.csv", "summary.json", "table2.csv", "ip_table.csv"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert not (two / "ranks").exists()
    feats = sorted(p.relative_to(one) for p in (one / "features").rglob("*.pt"))
    assert feats == sorted(p.relative_to(two) for p in (two / "features").rglob("*.pt"))
    assert all((one / p).read_bytes() == (two / p).read_bytes() for p in feats)


def test_a_dead_rank_fails_the_job_and_resume_finishes_it(checkpoints, reference, tmp_path):
    unet, _ = checkpoints
    one, cut = reference, tmp_path / "cut"
    proc = _torchrun(["fnaf", "--model", str(unet), "--out", str(cut), *FNAF])
    rank1 = cut / "ranks" / "records-00001.jsonl"
    deadline = time.monotonic() + 180
    while not (rank1.exists() and rank1.read_text().endswith("\n")):
        assert proc.poll() is None, "the job ended before rank 1 wrote a record"
        assert time.monotonic() < deadline, "rank 1 wrote no record"
        time.sleep(0.005)
    pid = _worker_pid(proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # rank 1 dies with 2 of its 3 batches to go: torchrun stops rank 0 and fails
    rc, out = _finish(proc, timeout=180)
    assert rc != 0
    assert not (cut / "records.jsonl").exists()  # nothing was merged
    done_before = sum(len(f.read_text().splitlines()) for f in (cut / "ranks").glob("records-*.jsonl"))
    assert 1 <= done_before < 6
    # resume with one process (another world size): the records of one uninterrupted process, byte for byte
    assert main(["fnaf", "--model", str(unet), "--out", str(cut), *FNAF, "--resume"]) == 0
    assert (cut / "records.jsonl").read_bytes() == (one / "records.jsonl").read_bytes()
    assert (cut / "records.csv").read_bytes() == (one / "records.csv").read_bytes()
    assert not (cut / "ranks").exists()


def test_audit_under_torchrun_writes_what_one_process_writes(checkpoints, tmp_path):
    unet, irim = checkpoints
    args = ["audit", "--model", str(unet), "--model", str(irim), "--names", "U", "I", "--accelerations", "4",
            "--search", "rs", "--candidates", "2", "--phantom-volumes", "1", "--phantom-slices", "2",
            "--batch-size", "1", "--no-figures", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one)]) == 0
    rc, out = _finish(_torchrun([*args, "--out", str(two)]))
    assert rc == 0, out[-3000:]
    assert out.count("report: ") == 1 and out.count("audit finished") == 1, out[-3000:]  # rank 0 alone prints
    for name in ("records.jsonl", "records.csv", "table1.csv", "table2.csv", "ip_table.csv", "transfer.csv",
                 "tables.md"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    # 2 images x 2 models x 2 criteria, each once; and the transfer both ways under both criteria
    assert len((one / "records.jsonl").read_text().splitlines()) == 8
    assert len((one / "transfer.csv").read_text().splitlines()) == 1 + 4
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    r1.pop("timings_s"), r2.pop("timings_s")
    assert r1 == r2


def test_searches_share_one_clean_reference_per_image_and_keep_their_records(checkpoints, tmp_path):
    """The oracle: each search run on its own (its own reference pass, as before sharing). Records agree exactly in
    every discrete field and to float rounding elsewhere (the reference is computed in another search's batch)."""
    from blindspot.models.loading import load_model

    model = load_model(str(checkpoints[0]), torch.device("cpu"), warn=False)
    (setting,) = mri_settings(None, [4.0], volumes=1, slices=3, seed=5, shape=(32, 32), recon_size=(32, 32))
    searches = [RandomSearch(n_candidates=3, objective=FnafObjective(criterion=c)) for c in ("seed", "recovery")]
    searches.append(GradientSearch(steps=1, init_candidates=2, objective=FnafObjective(criterion="recovery")))

    calls = {"images": 0}
    net = as_network(model.network)
    forward = net.module.forward

    def counting(*a, **k):
        calls["images"] += int(a[0].shape[0])
        return forward(*a, **k)

    net.module.forward = counting
    shared = attack_setting(net, searches, setting, batch_size=3, features_dir=tmp_path / "f")
    shared_calls, calls["images"] = calls["images"], 0
    alone = [r for batch in setting.loader(3) for s in searches for r in s(net, batch, setting.physics).rows(net.name)]
    alone_calls = calls["images"]
    net.module.forward = forward
    # RS 3 (shared by both criteria: the same candidates) + grad (2 starts + 1 step + last iterate) per image, plus
    # one reference; alone: RS 3 + RS 3 + grad 4 and three references
    assert shared_calls == 3 * (3 + 4 + 1) and alone_calls == 3 * (3 + 3 + 4 + 3)
    assert [(r["key"], r["search"], r["criterion"]) for r in shared] == \
        [(r["key"], r["search"], r["criterion"]) for r in alone]
    for a, b in zip(shared, alone):
        for k, v in a.items():
            if isinstance(v, float):
                assert v == pytest.approx(b[k], rel=1e-4, abs=1e-7, nan_ok=True), k
            else:
                assert v == b[k], k

    # the transfer replay: every saved search replayed in shared calls gives each replay's own records
    saved = load_features(tmp_path / "f")
    replays = [ReplaySearch(saved=saved, source_search=s, objective=FnafObjective(criterion=c))
               for s in ("rs", "grad") for c in ("seed", "recovery")]
    batch = next(iter(setting.loader(3)))
    ctx = replays[0].prepare(net, batch, setting.physics)
    together = [r.rows(net.name) for r in replay_together(net, ctx, replays)]
    for rep, rows in zip(replays, together):
        own = rep(net, batch, setting.physics).rows(net.name)
        assert [r["key"] for r in rows] == [r["key"] for r in own] and len(own) == 3
        for a, b in zip(rows, own):
            assert {k: v for k, v in a.items() if not isinstance(v, float)} == \
                {k: v for k, v in b.items() if not isinstance(v, float)}
            assert a["attack_loss"] == pytest.approx(b["attack_loss"], rel=1e-5)
            assert a["recovery"] == pytest.approx(b["recovery"], rel=1e-4, abs=1e-6)
