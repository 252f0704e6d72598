"""A corpus of bad command lines for every command (issue 17): each ends with exit code 2, exactly one line on stderr
naming the option or file at fault, no traceback, and nothing outside the run folder changed.

Each case builds its inputs in ``tmp_path`` (three small NumPy images, a plain file, a FIFO, a link to ``/dev/null``,
…), snapshots the whole tree (kind, size and modification time of every entry), runs ``blindspot.cli.main`` in
process, and compares the snapshot afterwards. Almost every case fails before a model is built or data are read, so
the corpus is fast. A few cases run the real ``blindspot`` process to check the exit-code path.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from blindspot.cli import main
from blindspot.validate import printable

S = 40


@dataclass
class Ctx:
    """Inputs shared by the cases, all inside ``root`` (the test's ``tmp_path``)."""

    root: Path
    imgs: Path  # three 40x40 NumPy "knee" images
    file: Path  # a plain text file
    fifo: Path  # a named pipe
    devnull: Path  # a link to /dev/null (writing through it must never replace the device)
    folder: Path  # an empty folder
    run: Path  # the run folder a case may write into (absent at the start)

    @property
    def fnaf(self) -> list[str]:
        return ["fnaf", "--model", "zero-filled", "--data", str(self.imgs), "--crop", str(S), str(S),
                "--no-figures", "--out", str(self.run)]

    @property
    def evaluate(self) -> list[str]:
        return ["evaluate", "--data", str(self.imgs), "--crop", str(S), str(S), "--accelerations", "4",
                "--out", str(self.run)]

    @property
    def train_mri(self) -> list[str]:
        return ["train", "mri", "--epochs", "1", "--phantom-volumes", "1", "--phantom-val-volumes", "1",
                "--phantom-shape", "32", "32", "--phantom-recon-size", "32", "32", "--phantom-slices", "1",
                "--out", str(self.run)]

    @property
    def train_ct(self) -> list[str]:
        return ["train", "ct", "--model", "cnn10", "--data", str(self.folder), "--out", str(self.run)]

    @property
    def inv(self) -> list[str]:
        return ["invariances", "--model", "gaussian-ri", "--phantoms", "1", "--size", "32", "--iterations", "2",
                "--out", str(self.run)]

    @property
    def audit(self) -> list[str]:
        return ["audit", "--model", "zero-filled", "--data", str(self.imgs), "--crop", str(S), str(S),
                "--out", str(self.run)]

    @property
    def lesions(self) -> list[str]:
        return ["lesions", "--model", "zero-filled", "--data", str(self.folder), "--boxes", str(self.file),
                "--out", str(self.run)]

    @property
    def phantoms(self) -> list[str]:
        return ["data", "phantoms", "--volumes", "1", "--slices", "1", "--shape", "32", "32", "--recon-size",
                "32", "32", "--out", str(self.run)]

    @property
    def ct_phantoms(self) -> list[str]:
        return ["data", "ct-phantoms", "--patients", "1", "--min-slices", "1", "--max-slices", "1", "--size", "32",
                "--out", str(self.run)]

    @property
    def lesion_phantoms(self) -> list[str]:
        return ["data", "lesion-phantoms", "--volumes", "1", "--slices", "1", "--shape", "32", "32",
                "--recon-size", "32", "32", "--out", str(self.run), "--boxes", str(self.root / "boxes.csv")]


def make_ctx(root: Path) -> Ctx:
    imgs = root / "imgs"
    imgs.mkdir()
    r = np.arange(S)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    for i in range(3):
        img = ((yy - 20 - i) ** 2 / 14**2 + (xx - 20) ** 2 / 11**2 <= 1) * 1.0
        np.save(imgs / f"knee{i}.npy", img.astype(np.float32))
    file = root / "notes.txt"
    file.write_text("not data\n")
    fifo = root / "pipe"
    os.mkfifo(fifo)
    devnull = root / "devnull"
    devnull.symlink_to(os.devnull)
    folder = root / "empty"
    folder.mkdir()
    return Ctx(root, imgs, file, fifo, devnull, folder, root / "run")


def _existing_results(c: Ctx) -> None:
    c.run.mkdir()
    (c.run / "run.json").write_text("{}\n")


def _phantom_file(c: Ctx) -> None:
    """A one-slice phantom volume in the run folder (a later call asks for two slices)."""
    assert main(c.phantoms) == 0


def _h5_in_run(c: Ctx) -> None:
    c.run.mkdir()
    (c.run / "file_phantom_000000.h5").write_bytes(b"someone's data")


# Each case: (argv, text the one stderr line must contain: the option or file at fault) from the context; optional
# set-up run before the snapshot.
Case = Callable[[Ctx], tuple[list[str], str]]
CASES: dict[str, tuple[Case, Callable[[Ctx], None] | None]] = {
    # fnaf: physics, thresholds, sizes, search budgets
    "fnaf-acceleration-0": (lambda c: ([*c.fnaf, "--accelerations", "0"], "--accelerations"), None),
    "fnaf-acceleration-nan": (lambda c: ([*c.fnaf, "--accelerations", "nan"], "--accelerations"), None),
    "fnaf-acceleration-1000": (lambda c: ([*c.fnaf, "--accelerations", "1000"], "--accelerations"), None),
    "fnaf-acceleration-negative": (lambda c: ([*c.fnaf, "--accelerations", "4", "-8"], "--accelerations"), None),
    "fnaf-center-fraction-1.5": (lambda c: ([*c.fnaf, "--center-fractions", "1.5"], "--center-fractions"), None),
    "fnaf-loss-threshold-nan": (lambda c: ([*c.fnaf, "--loss-threshold", "nan"], "--loss-threshold"), None),
    "fnaf-loss-threshold-negative": (lambda c: ([*c.fnaf, "--loss-threshold", "-1"], "--loss-threshold"), None),
    "fnaf-loss-threshold-inf": (lambda c: ([*c.fnaf, "--loss-threshold", "inf"], "--loss-threshold"), None),
    "fnaf-recovery-threshold-5": (lambda c: ([*c.fnaf, "--recovery-threshold", "5"], "--recovery-threshold"), None),
    "fnaf-threshold-pixels-negative": (lambda c: ([*c.fnaf, "--threshold-pixels", "-5"], "--threshold-pixels"), None),
    "fnaf-ip-threshold-negative": (lambda c: ([*c.fnaf, "--ip-threshold", "-1"], "--ip-threshold"), None),
    "fnaf-crop-4": (lambda c: ([*c.fnaf, "--crop", "4", "4"], "--crop"), None),
    "fnaf-crop-1": (lambda c: ([*c.fnaf, "--crop", "1", "1"], "--crop"), None),
    "fnaf-crop-huge": (lambda c: ([*c.fnaf, "--crop", "100000", "100000"], "--crop"), None),
    "fnaf-crop-not-int": (lambda c: ([*c.fnaf, "--crop", "40.5", "40"], "--crop"), None),
    "fnaf-crop-larger-than-images": (lambda c: ([*c.fnaf, "--crop", "1000", "1000"],
                                                "1000 1000 is larger than the 40x40 image of"), None),
    "fnaf-crop-larger-than-phantoms": (lambda c: (["fnaf", "--model", "zero-filled", "--phantom-shape", "40", "40",
                                                   "--phantom-recon-size", "32", "32", "--phantom-volumes", "1",
                                                   "--phantom-slices", "1", "--crop", "64", "64", "--no-figures",
                                                   "--out", str(c.run)],
                                                  "64 64 is larger than the 32x32 image of the phantoms'"), None),
    "evaluate-crop-larger-than-images": (lambda c: ([*c.evaluate, "--crop", "64", "40"],
                                                    "64 40 is larger than the 40x40 image of"), None),
    "fnaf-region-fraction-2": (lambda c: ([*c.fnaf, "--region-fraction", "2"], "--region-fraction"), None),
    "fnaf-candidates-0": (lambda c: ([*c.fnaf, "--candidates", "0"], "--candidates"), None),
    "fnaf-batch-size-0": (lambda c: ([*c.fnaf, "--batch-size", "0"], "--batch-size"), None),
    "fnaf-limit-0": (lambda c: ([*c.fnaf, "--limit", "0"], "--limit"), None),
    "fnaf-dilation-negative": (lambda c: ([*c.fnaf, "--dilation", "-1"], "--dilation"), None),
    "fnaf-grad-step-nan": (lambda c: ([*c.fnaf, "--grad-step-size", "nan"], "--grad-step-size"), None),
    "fnaf-dose-0": (lambda c: ([*c.fnaf, "--dose", "0"], "--dose"), None),
    "fnaf-dose-1.5": (lambda c: ([*c.fnaf, "--dose", "1.5"], "--dose"), None),
    "fnaf-size-1": (lambda c: ([*c.fnaf, "--size", "1"], "--size"), None),
    "fnaf-seed-negative": (lambda c: ([*c.fnaf, "--seed", "-1"], "--seed"), None),
    "fnaf-intensity-reversed": (lambda c: ([*c.fnaf, "--intensity", "100", "30"], "--intensity"), None),
    "fnaf-intensity-nan": (lambda c: ([*c.fnaf, "--intensity", "nan", "1"], "--intensity"), None),
    "fnaf-unknown-option": (lambda c: ([*c.fnaf, "--bogus"], "blindspot fnaf: error: unrecognized arguments"), None),
    "fnaf-missing-value": (lambda c: ([*c.fnaf, "--accelerations"], "--accelerations"), None),
    # fnaf: --arch/--hparam
    "fnaf-hparam-no-equals": (lambda c: ([*c.fnaf, "--arch", "unet", "--hparam", "chans"], "--hparam"), None),
    "fnaf-hparam-nan": (lambda c: ([*c.fnaf, "--arch", "unet", "--hparam", "chans=NaN"], "--hparam"), None),
    "fnaf-hparam-wrong-type": (lambda c: ([*c.fnaf, "--arch", "unet", "--hparam", "chans=abc"], "--hparam"), None),
    "fnaf-hparam-unknown": (lambda c: ([*c.fnaf, "--arch", "unet", "--hparam", "nosuch=1"], "--hparam"), None),
    "fnaf-hparam-huge": (lambda c: ([*c.fnaf, "--arch", "unet", "--hparam", "chans=100000"], "--hparam"), None),
    # fnaf: output paths
    "fnaf-out-is-data": (lambda c: ([*c.fnaf, "--out", str(c.imgs)], str(c.imgs)), None),
    "fnaf-out-inside-data": (lambda c: ([*c.fnaf, "--out", str(c.imgs / "run")], str(c.imgs / "run")), None),
    "fnaf-out-holds-data": (lambda c: ([*c.fnaf, "--out", str(c.root)], str(c.root)), None),
    "fnaf-out-is-file": (lambda c: ([*c.fnaf, "--out", str(c.file)], str(c.file)), None),
    "fnaf-out-is-replay": (lambda c: ([*c.fnaf, "--out", str(c.folder), "--replay", str(c.folder)], str(c.folder)),
                           None),
    # evaluate
    "evaluate-acceleration-0": (lambda c: ([*c.evaluate, "--accelerations", "0"], "--accelerations"), None),
    "evaluate-batch-size-0": (lambda c: ([*c.evaluate, "--batch-size", "0"], "--batch-size"), None),
    "evaluate-out-is-data": (lambda c: ([*c.evaluate, "--out", str(c.imgs)], str(c.imgs)), None),
    "evaluate-out-is-file": (lambda c: ([*c.evaluate, "--out", str(c.file)], str(c.file)), None),
    "evaluate-phantom-shape-4": (lambda c: (["evaluate", "--phantom-shape", "4", "4", "--out", str(c.run)],
                                            "--phantom-shape"), None),
    "evaluate-phantom-memory": (lambda c: (["evaluate", "--phantom-shape", "4096", "4096", "--phantom-slices", "9999",
                                            "--accelerations", "4", "--out", str(c.run)], "--phantom-slices"), None),
    # train mri / ct
    "train-mri-num-workers-negative": (lambda c: ([*c.train_mri, "--num-workers", "-1"], "--num-workers"), None),
    "train-mri-epochs-0": (lambda c: ([*c.train_mri, "--epochs", "0"], "--epochs"), None),
    "train-mri-lr-nan": (lambda c: ([*c.train_mri, "--lr", "nan"], "--lr"), None),
    "train-mri-lr-gamma-2": (lambda c: ([*c.train_mri, "--lr-gamma", "2"], "--lr-gamma"), None),
    "train-mri-val-fraction-1": (lambda c: ([*c.train_mri, "--val-fraction", "1"], "--val-fraction"), None),
    "train-mri-robust-fraction-0": (lambda c: ([*c.train_mri, "--robust-fraction", "0"], "--robust-fraction"), None),
    "train-mri-hparam-type": (lambda c: ([*c.train_mri, "--hparam", "chans=abc"], "--hparam"), None),
    "train-mri-hparam-huge": (lambda c: ([*c.train_mri, "--hparam", "chans=100000"], "--hparam"), None),
    "train-mri-hparam-negative": (lambda c: ([*c.train_mri, "--hparam", "chans=-3"], "--hparam"), None),
    "train-mri-out-is-file": (lambda c: ([*c.train_mri, "--out", str(c.file)], str(c.file)), None),
    "train-mri-out-inside-data": (lambda c: ([*c.train_mri, "--data", str(c.imgs), "--out", str(c.imgs / "r")],
                                             str(c.imgs / "r")), None),
    "train-ct-dose-0": (lambda c: ([*c.train_ct, "--dose", "0"], "--dose"), None),
    "train-ct-patch-4": (lambda c: ([*c.train_ct, "--patch-size", "4"], "--patch-size"), None),
    "train-ct-val-fraction-1": (lambda c: ([*c.train_ct, "--val-fraction", "1"], "--val-fraction"), None),
    "train-ct-hparam-huge": (lambda c: ([*c.train_ct, "--hparam", "chans1=999999"], "--hparam"), None),
    "train-ct-critic-huge": (lambda c: ([*c.train_ct, "--critic-hidden", "1000000000"], "--critic-hidden"), None),
    "invariances-generator-memory": (lambda c: (["invariances", "train-generator", "--model", "gaussian-ri",
                                                 "--train-batch", "100000", "--patch", "4096", "--out", str(c.run)],
                                                "--train-batch"), None),
    "invariances-generator-channels-huge": (lambda c: (["invariances", "train-generator", "--model", "gaussian-ri",
                                                        "--channels", "99999999", "--out", str(c.run)], "--channels"),
                                            None),
    "train-ct-out-is-data": (lambda c: ([*c.train_ct, "--out", str(c.folder)], str(c.folder)), None),
    # invariances (and its sub-commands)
    "invariances-alpha-nan": (lambda c: ([*c.inv, "--alpha", "nan"], "--alpha"), None),
    "invariances-alpha-0": (lambda c: ([*c.inv, "--alpha", "0"], "--alpha"), None),
    "invariances-dose-0": (lambda c: ([*c.inv, "--dose", "0"], "--dose"), None),
    "invariances-iterations-0": (lambda c: ([*c.inv, "--iterations", "0"], "--iterations"), None),
    "invariances-lr-negative": (lambda c: ([*c.inv, "--lr", "-1"], "--lr"), None),
    "invariances-acceleration-0.5": (lambda c: ([*c.inv, "--acceleration", "0.5"], "--acceleration"), None),
    "invariances-out-is-file": (lambda c: ([*c.inv, "--out", str(c.file)], str(c.file)), None),
    "invariances-generator-patch-4": (lambda c: (["invariances", "train-generator", "--model", "gaussian-ri",
                                                  "--patch", "4", "--out", str(c.run)], "--patch"), None),
    "invariances-sample-out-in-generator": (lambda c: (["invariances", "sample", "--generator", str(c.folder),
                                                        "--out", str(c.folder / "s")], str(c.folder / "s")), None),
    # audit, lesions
    "audit-acceleration-nan": (lambda c: ([*c.audit, "--accelerations", "nan"], "--accelerations"), None),
    "audit-ct-size-2": (lambda c: ([*c.audit, "--ct-size", "2"], "--ct-size"), None),
    "audit-lesion-threshold-2": (lambda c: ([*c.audit, "--lesion-threshold", "2"], "--lesion-threshold"), None),
    "audit-out-is-data": (lambda c: ([*c.audit, "--out", str(c.imgs)], str(c.imgs)), None),
    "lesions-acceleration-0": (lambda c: ([*c.lesions, "--acceleration", "0"], "--acceleration"), None),
    "lesions-threshold-5": (lambda c: ([*c.lesions, "--threshold", "5"], "--threshold"), None),
    "lesions-results-exist": (lambda c: (c.lesions, "--overwrite"), _existing_results),
    "lesions-out-is-data": (lambda c: ([*c.lesions, "--out", str(c.folder)], str(c.folder)), None),
    # data phantoms / ct-phantoms / lesion-phantoms
    "phantoms-shape-1": (lambda c: ([*c.phantoms, "--shape", "1", "1"], "--shape"), None),
    "phantoms-volumes-0": (lambda c: ([*c.phantoms, "--volumes", "0"], "--volumes"), None),
    "phantoms-coils-single-coil": (lambda c: ([*c.phantoms, "--challenge", "singlecoil", "--coils", "4"], "--coils"),
                                   None),
    "phantoms-memory": (lambda c: ([*c.phantoms, "--slices", "99999", "--shape", "4096", "4096"], "--slices"), None),
    "phantoms-other-data-kept": (lambda c: ([*c.phantoms, "--slices", "2"], "file_phantom_000000.h5"), _phantom_file),
    "phantoms-panel-exists": (lambda c: ([*c.phantoms, "--panel", str(c.file)], str(c.file)), None),
    "phantoms-panel-fifo": (lambda c: ([*c.phantoms, "--panel", str(c.fifo)], str(c.fifo)), None),
    "phantoms-recon-larger-than-shape": (lambda c: ([*c.phantoms, "--recon-size", "64", "64"], "--recon-size"), None),
    "train-mri-recon-larger-than-shape": (lambda c: ([*c.train_mri, "--phantom-recon-size", "64", "64"],
                                                     "--phantom-recon-size"), None),
    "phantoms-out-is-file": (lambda c: ([*c.phantoms, "--out", str(c.file)], str(c.file)), None),
    "ct-phantoms-i0-0": (lambda c: ([*c.ct_phantoms, "--i0", "0"], "--i0"), None),
    "ct-phantoms-dose-0": (lambda c: ([*c.ct_phantoms, "--doses", "0"], "--doses"), None),
    "ct-phantoms-dose-1.5": (lambda c: ([*c.ct_phantoms, "--doses", "0.25", "1.5"], "--doses"), None),
    "ct-phantoms-size-1": (lambda c: ([*c.ct_phantoms, "--size", "1"], "--size"), None),
    "ct-phantoms-slices-reversed": (lambda c: ([*c.ct_phantoms, "--min-slices", "5", "--max-slices", "2"],
                                               "--min-slices"), None),
    "ct-phantoms-angles-memory": (lambda c: ([*c.ct_phantoms, "--angles", "999999999"], "--angles"), None),
    "ct-phantoms-into-other-data": (lambda c: ([*c.ct_phantoms, "--out", str(c.imgs)], str(c.imgs)), None),
    "ct-phantoms-out-is-file": (lambda c: ([*c.ct_phantoms, "--out", str(c.file)], str(c.file)), None),
    "lesion-phantoms-h5-exists": (lambda c: (c.lesion_phantoms, "--overwrite"), _h5_in_run),
    "lesion-phantoms-boxes-exist": (lambda c: ([*c.lesion_phantoms, "--boxes", str(c.file)], str(c.file)), None),
    "lesion-phantoms-lesions-negative": (lambda c: ([*c.lesion_phantoms, "--lesions", "-1"], "--lesions"), None),
    # data inspect --json
    "inspect-json-fifo": (lambda c: (["data", "inspect", str(c.imgs), "--json", str(c.fifo)], str(c.fifo)), None),
    "inspect-json-devnull": (lambda c: (["data", "inspect", str(c.imgs), "--json", str(c.devnull)], str(c.devnull)),
                             None),
    "inspect-json-folder": (lambda c: (["data", "inspect", str(c.imgs), "--json", str(c.folder)], str(c.folder)),
                            None),
    "inspect-json-exists": (lambda c: (["data", "inspect", str(c.imgs), "--json", str(c.file)], "--overwrite"), None),
    "inspect-json-under-a-file": (lambda c: (["data", "inspect", str(c.imgs), "--json", str(c.file / "x.json")],
                                             str(c.file)), None),
    "inspect-json-inside-data": (lambda c: (["data", "inspect", str(c.imgs), "--json", str(c.imgs / "s.json")],
                                            str(c.imgs / "s.json")), None),
    "inspect-crop-2": (lambda c: (["data", "inspect", str(c.imgs), "--crop", "2", "2"], "--crop"), None),
    # the command line itself
    "unknown-command": (lambda c: (["bogus"], "invalid choice: 'bogus'"), None),
    "demo-ct-images-negative": (lambda c: (["demo", "--ct-images", "-1", "--out", str(c.run)], "--ct-images"), None),
}

try:  # the beyond-FNAF commands (hallucinations, worst-case, …) share their options; one case each
    from blindspot.commands.beyond import COMMANDS as BEYOND
except ImportError:  # not part of this build
    BEYOND = {}
for _name in BEYOND:
    CASES[f"{_name}-acceleration-0"] = (lambda c, n=_name: ([n, "--model", "zero-filled", "--out", str(c.run),
                                                            "--accelerations", "0"], "--accelerations"), None)
    CASES[f"{_name}-dose-nan"] = (lambda c, n=_name: ([n, "--model", "cnn10", "--out", str(c.run), "--dose", "nan"],
                                                      "--dose"), None)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Kind, size and modification time of every entry under ``root`` (links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def _outside(tree: dict, run: Path) -> dict:
    return {p: v for p, v in tree.items() if not (p == str(run) or p.startswith(str(run) + os.sep))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_command_line_is_one_line_exit_2(tmp_path, case, capsys):
    ctx = make_ctx(tmp_path)
    build, setup = CASES[case]
    if setup is not None:
        setup(ctx)
    argv, named = build(ctx)
    capsys.readouterr()
    before = snapshot(tmp_path)
    devnull_before = os.stat(os.devnull)
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("blindspot") and ": error: " in lines[0]
    assert named in lines[0], lines[0]
    assert ".tmp" not in lines[0]  # never a hidden temporary file
    after = snapshot(tmp_path)
    assert _outside(after, ctx.run) == _outside(before, ctx.run)
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode) and os.stat(os.devnull).st_ino == devnull_before.st_ino


def test_corpus_covers_every_command():
    fake = Ctx(*(Path("/nonexistent") / n for n in ("root", "imgs", "file", "fifo", "devnull", "folder", "run")))
    commands = {" ".join(build(fake)[0][:2]) for build, _ in CASES.values()}
    assert len(CASES) >= 55
    for command in ("fnaf", "evaluate", "train mri", "train ct", "invariances", "audit", "lesions", "data phantoms",
                    "data ct-phantoms", "data lesion-phantoms", "data inspect", "demo"):
        assert any(c.startswith(command) for c in commands), command


def test_argparse_error_names_the_sub_command(capsys):
    assert main(["data", "inspect"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("blindspot data inspect: error: ")
    assert "see blindspot data inspect --help" in err and "usage" not in err


def test_writers_refuse_special_files_and_name_no_temporary_file(tmp_path):
    from blindspot.errors import BlindspotError
    from blindspot.fileio import append_jsonl, write_csv, write_json

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "null"
    link.symlink_to(os.devnull)
    for target in (fifo, link, tmp_path):
        for write in (lambda p: write_json(p, {"a": 1}), lambda p: write_csv(p, [{"a": 1}]),
                      lambda p: append_jsonl(p, [{"a": 1}])):
            with pytest.raises(BlindspotError) as info:
                write(target)
            assert info.value.source == str(target) and "regular files" in info.value.problem
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null", "pipe"]  # no temporary file left behind
    # a link to a regular file keeps the link and rewrites its target
    real = tmp_path / "real.json"
    real.write_text("{}")
    alias = tmp_path / "alias.json"
    alias.symlink_to(real)
    write_json(alias, {"b": 2})
    assert alias.is_symlink() and '"b": 2' in real.read_text()


def test_a_file_name_that_is_not_utf8_is_printed_safely(tmp_path):
    """A bad file whose name is not UTF-8: one line with the name escaped, through the real process (exit code,
    stdout/stderr encodings)."""
    folder = tmp_path / "data"
    folder.mkdir()
    name = os.fsdecode(b"bad\xffname.npy")
    (folder / name).write_bytes(b"not a numpy file")
    proc = subprocess.run([sys.executable, "-m", "blindspot.cli", "data", "inspect", str(folder)], timeout=300,
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    err = proc.stderr.decode("utf-8")
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert printable(folder / name) in err and "\\xff" in err


def test_exit_code_through_the_process(tmp_path):
    """The real process (one start-up costs ~4 s of CPU: the in-process corpus above covers the cases)."""
    ctx = make_ctx(tmp_path)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "blindspot.cli", *ctx.fnaf, "--accelerations", "nan"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("blindspot fnaf: error: argument --accelerations: ")
    assert snapshot(tmp_path) == before


def test_out_of_memory_is_one_line_and_other_errors_stay_tracebacks(tmp_path, monkeypatch, capsys):
    import blindspot.commands.data_inspect as inspect_command

    def oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(inspect_command, "run", oom)
    assert main(["data", "inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err and "--batch-size" in err

    def bug(args):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(inspect_command, "run", bug)
    with pytest.raises(RuntimeError, match="a genuine bug"):
        main(["data", "inspect", str(tmp_path)])
