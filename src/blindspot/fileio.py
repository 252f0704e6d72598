"""Atomic, incremental result files (JSON, JSON lines, CSV) so long runs can stop and resume without losing work.

Every whole-file write goes to a temporary file in the same folder and is renamed over the target, so a reader (or
a crash) never sees half a file. Only regular files are written: a folder, device or FIFO in the way is a one-line
error (:func:`blindspot.validate.check_writable_target`). Row files (JSON lines, CSV) are appended one flushed line
at a time; a partial last line left by a crash is ignored when read back.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from blindspot.errors import BlindspotError, PathLike
from blindspot.validate import check_writable_target


def _file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask (``mkstemp`` would give 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def temporary_sibling(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` (same folder, so a rename over ``path`` is atomic), with the permissions
    a plainly created file would have: ``(fd, name)``. ``path`` must be absent or a regular file, and the folder
    writable (:class:`~blindspot.errors.BlindspotError` naming ``path``, never the temporary file)."""
    path = check_writable_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise BlindspotError(path, f"cannot be written ({err.strerror or err})") from None
    if hasattr(os, "fchmod"):
        os.fchmod(fd, _file_mode())
    return fd, tmp


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + rename); creates parent folders.

    Only a regular file is ever replaced: a folder, device, FIFO or socket at ``path`` is a
    :class:`~blindspot.errors.BlindspotError` (the rename would otherwise put a regular file in its place); a link is
    followed, so the link stays and its target is rewritten. Errors name ``path``, never the temporary file.
    """
    path = check_writable_target(path)
    fd, tmp = temporary_sibling(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise BlindspotError(path, f"cannot be written ({err.strerror or err})") from None
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text (file names that are not UTF-8 are written as ``\\udcNN`` escapes)."""
    return atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))


def _jsonable(value: Any) -> Any:
    """Turn tensors, NumPy values and non-finite floats into plain JSON (NaN/Inf become ``null``)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def file_sha256(path: PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BlindspotError(path, f"not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise BlindspotError(path, "not valid JSON (not UTF-8 text)") from None


def append_jsonl(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows as JSON lines, each flushed and synced before returning."""
    path = check_writable_target(path)  # opening a FIFO to append would block; a device would swallow the rows
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(_jsonable(row)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a truncated last line (a crash mid-write) is dropped, other bad lines are errors."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise BlindspotError(path, "not a JSON-lines file (not UTF-8 text)") from None
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # unterminated last line: the write was cut off
                break
            raise BlindspotError(path, f"line {i + 1} is not valid JSON") from None
    return rows


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write rows as CSV atomically; columns default to the union of keys in first-seen order."""
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _jsonable(v) for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue())
