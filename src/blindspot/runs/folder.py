"""The one run-folder helper: settings check, resume, log repair and the record log every long command keeps.

A run folder holds ``run.json`` (the command and the settings that change its records), ``records.jsonl`` (one JSON
line per finished unit of work, appended and synced after every batch: the durable log that ``--resume`` reads) and
whatever the command writes beside them (always atomically, see :mod:`blindspot.fileio`).

Rules (DESIGN.md §5): a folder that already holds records is continued only with ``resume`` and the same settings,
or replaced only with ``overwrite``; a path that is a file, or a folder that is some other command's run, is refused;
a partial last line left by a crash is dropped before appending.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import append_jsonl, read_json, read_jsonl, write_json
from blindspot.validate import check_output_folder

RUN_FILE = "run.json"
RECORDS = "records.jsonl"
#: Per-rank record files of a ``torchrun`` job (:mod:`blindspot.runs.ranks`).
RANK_DIR = "ranks"


def rank_files(folder: Path) -> list[Path]:
    """The per-rank record files in a run folder (of any earlier number of ranks), sorted by rank."""
    d = Path(folder) / RANK_DIR
    return sorted(d.glob("records-*.jsonl")) if d.is_dir() else []


def drop_partial_line(path: Path) -> None:
    """Drop a partial last line of a JSON-lines log left by a crash mid-append (nothing when the file is missing)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def plain_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as JSON values (tuples → lists), so a resumed run compares equal to the stored one."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}


class RunFolder:
    """A command's run folder, checked and prepared on construction.

    Args:
        path: the folder (created when missing).
        command: the command that owns it (``fnaf``, ``invariances``, ``audit``, …).
        settings: what changes the records; a resumed run must match them exactly.
        resume: continue the records already there.
        overwrite: start afresh, deleting the records (and the files the run wrote) already there.
        inputs: paths the run reads; the run folder may not be one of them or lie inside one (never write into the
            input data).
        writer: this process prepares the folder (clears it on ``overwrite``, writes ``run.json``, repairs the log);
            the other ranks of a ``torchrun`` job only check it (:func:`blindspot.runs.ranks.open_folder`).

    Records also count when they are only in the per-rank files of an interrupted ``torchrun`` job
    (:mod:`blindspot.runs.ranks`).
    """

    def __init__(self, path: PathLike, command: str, settings: Mapping[str, Any], resume: bool = False,
                 overwrite: bool = False, inputs: Iterable[PathLike | None] = (), writer: bool = True) -> None:
        self.path = Path(path)
        self.command = command
        self.settings = plain_settings(settings)
        self.resume = bool(resume)
        if resume and overwrite:
            raise BlindspotError(None, "give --resume or --overwrite, not both")
        check_output_folder(self.path, "--out", inputs=inputs)  # not a file, never in (or above) the input data
        run_json = self.path / RUN_FILE
        stored = read_json(run_json) if run_json.is_file() else None
        if stored is not None and stored.get("command") not in (None, command):
            raise BlindspotError(run_json, f"the run folder belongs to {stored.get('command')!r}, not {command!r}; "
                                           "choose another --out")
        has_records = self.records_path.exists() or bool(rank_files(self.path))
        if has_records and overwrite:
            if writer:
                self._clear()
            stored, has_records = None, False
        if has_records and not resume:
            raise BlindspotError(self.path, f"already holds {command} records; pass --resume to continue it, "
                                            "--overwrite to replace it, or choose another --out")
        if resume and stored is not None:
            old = stored.get("settings", {})
            diff = sorted(k for k in set(self.settings) | set(old) if old.get(k) != self.settings.get(k))
            if diff:
                raise BlindspotError(run_json, f"the run was made with other settings ({', '.join(diff)}); "
                                               "resume with the same ones or choose another --out")
        elif writer:
            write_json(run_json, {"command": command, "settings": self.settings})
        if resume and writer:
            self.repair_log()

    @property
    def records_path(self) -> Path:
        return self.path / RECORDS

    def file(self, *parts: str) -> Path:
        """A path inside the run folder."""
        return self.path.joinpath(*parts)

    def _clear(self) -> None:
        """Remove what an earlier run wrote here (only the folder's own entries; never follows links out)."""
        for entry in self.path.iterdir():
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
            elif entry.is_dir():
                shutil.rmtree(entry)

    def repair_log(self) -> None:
        """Drop a partial last line left by a crash mid-append, so later appends start on a fresh line."""
        drop_partial_line(self.records_path)

    def records(self) -> list[dict[str, Any]]:
        """The records already written (empty unless resuming)."""
        return read_jsonl(self.records_path) if self.resume else []

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append finished records (flushed and synced)."""
        append_jsonl(self.records_path, rows)
