"""Lesion bounding-box annotations: the fastMRI+ style CSV, a JSON equivalent, and their validation.

CSV layout (the source document's published annotations, fastMRI+ knee style)::

    file,slice,x,y,width,height,label
    file1000031,17,120,141,12,9,Meniscus Tear

* ``file`` — the volume's name, with or without the ``.h5`` suffix (``file1000031`` and ``file1000031.h5`` are the
  same volume); for a folder with sub-folders, the path relative to the folder.
* ``slice`` — the slice index inside the volume (0-based).
* ``x``, ``y`` — the box's top-left corner in pixels of the volume's reconstruction image (``(h, w)``, the
  ``reconstruction_esc`` / ``reconstruction_rss`` crop; 320×320 for fastMRI knee); ``x`` counts columns from the
  left, ``y`` rows from the top. ``width``, ``height`` — the box's size in pixels. The box covers rows
  ``[y, y + height)`` and columns ``[x, x + width)``.
* ``label`` — free text (``cartilage``, ``meniscus``, …); tables group lesions by it.

Extra columns are allowed and ignored (fastMRI+ files carry ``study_level``); a row whose ``study_level`` is
``Yes`` is a volume-level finding without a box, and is counted in :attr:`LesionAnnotations.study_level` rather
than read as a box. fastMRI+ draws its boxes on the image flipped upside down; read such files with
``origin="bottom"`` (``y`` then counts from the bottom row: the box covers rows ``[h − y − height, h − y)``).

JSON equivalent: a list of objects with the same keys, or ``{"lesions": [...]}``::

    {"lesions": [{"file": "file1000031", "slice": 17, "x": 120, "y": 141, "width": 12, "height": 9,
                  "label": "Meniscus Tear"}]}

Every problem — a missing column, a value that is not a whole number, a negative or empty box, a box that leaves the
image, an unknown file or slice — is a :class:`~blindspot.errors.BlindspotError` naming the file and the row
(``row 3``: the CSV's line number / the JSON list's 1-based position).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from blindspot.errors import BlindspotError, PathLike
from blindspot.fileio import atomic_write_text, write_json

#: The columns every annotation row needs, in the order written.
COLUMNS: tuple[str, ...] = ("file", "slice", "x", "y", "width", "height", "label")
ORIGINS = ("top", "bottom")


def volume_key(name: str) -> str:
    """The name a volume is matched by: ``name`` without a trailing ``.h5`` / ``.hdf5`` suffix."""
    name = str(name).strip()
    for suffix in (".h5", ".hdf5"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class LesionBox:
    """One annotated lesion.

    Attributes:
        file: the volume's name as written in the annotation file.
        slice: slice index.
        x, y: top-left corner (column, row) in pixels of the reconstruction image, rows counted from the top.
        width, height: box size, pixels (≥ 1).
        label: lesion label.
        row: where it came from (``"row 3"``), for messages.
    """

    file: str
    slice: int
    x: int
    y: int
    width: int
    height: int
    label: str
    row: str = ""

    @property
    def key(self) -> str:
        """``"<volume>:<slice>"``, the identity of the slice the lesion is on (volume without ``.h5``)."""
        return f"{volume_key(self.file)}:{self.slice}"

    def as_row(self) -> dict[str, Any]:
        """The CSV / JSON row (without ``row``)."""
        d = asdict(self)
        d.pop("row")
        return d


@dataclass
class LesionAnnotations:
    """The boxes read from one file, plus the number of box-less volume-level rows skipped (``study_level``)."""

    boxes: list[LesionBox]
    source: str
    study_level: int = 0

    def labels(self) -> list[str]:
        """Distinct labels in order of first appearance."""
        return list(dict.fromkeys(b.label for b in self.boxes))


def _int_field(value: Any, column: str, source: PathLike, where: str) -> int:
    if isinstance(value, bool):
        raise BlindspotError(source, f"{where}: {column} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip() if value is not None else ""
    if not text:
        raise BlindspotError(source, f"{where}: {column} is empty")
    try:
        number = float(text)
    except ValueError:
        raise BlindspotError(source, f"{where}: {column} must be a whole number, got {text!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise BlindspotError(source, f"{where}: {column} must be a whole number, got {text!r}")
    return int(number)


def _box_from_mapping(row: Mapping[str, Any], source: PathLike, where: str) -> LesionBox:
    missing = [c for c in COLUMNS if c not in row or row[c] is None]
    if missing:
        raise BlindspotError(source, f"{where}: missing {', '.join(missing)}")
    file = str(row["file"]).strip()
    if not file:
        raise BlindspotError(source, f"{where}: file is empty")
    label = str(row["label"]).strip()
    if not label:
        raise BlindspotError(source, f"{where}: label is empty")
    s, x, y, w, h = (_int_field(row[c], c, source, where) for c in ("slice", "x", "y", "width", "height"))
    if s < 0:
        raise BlindspotError(source, f"{where}: slice must be >= 0, got {s}")
    if x < 0 or y < 0:
        raise BlindspotError(source, f"{where}: box corner ({x}, {y}) is outside the image (negative)")
    if w < 1 or h < 1:
        raise BlindspotError(source, f"{where}: box must be at least 1x1 pixels, got width {w}, height {h}")
    return LesionBox(file, s, x, y, w, h, label, where)


def _is_study_level(row: Mapping[str, Any]) -> bool:
    return str(row.get("study_level", "") or "").strip().lower() in ("yes", "true", "1")


def parse_annotations(rows: Iterable[tuple[str, Mapping[str, Any]]], source: PathLike) -> LesionAnnotations:
    """Boxes from ``(where, row)`` pairs (``where`` names the row in messages); see the module docs."""
    boxes, study = [], 0
    for where, row in rows:
        if _is_study_level(row):
            study += 1
            continue
        boxes.append(_box_from_mapping(row, source, where))
    return LesionAnnotations(boxes, str(source), study)


def read_annotations(path: PathLike) -> LesionAnnotations:
    """Read a bounding-box CSV (``.csv``) or its JSON equivalent (``.json``); rows are checked but not yet matched
    against volumes (see :func:`validate_annotations`).

    Raises:
        BlindspotError: missing or unreadable file, missing columns, malformed rows (naming the row).
    """
    path = Path(path)
    if not path.is_file():
        raise BlindspotError(path, "no such annotation file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise BlindspotError(path, f"cannot read annotations ({type(err).__name__}: {err})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise BlindspotError(path, f"not valid JSON (line {err.lineno}: {err.msg})") from None
        if isinstance(data, dict):
            if "lesions" not in data:
                raise BlindspotError(path, "JSON object has no 'lesions' list")
            data = data["lesions"]
        if not isinstance(data, list):
            raise BlindspotError(path, "JSON annotations must be a list of boxes or {\"lesions\": [...]}")
        rows = []
        for i, item in enumerate(data, start=1):
            if not isinstance(item, dict):
                raise BlindspotError(path, f"row {i}: expected an object with {', '.join(COLUMNS)}")
            rows.append((f"row {i}", item))
        return parse_annotations(rows, path)
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise BlindspotError(path, "empty annotation file (no header row)")
    reader.fieldnames = header
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise BlindspotError(path, f"header lacks column(s) {', '.join(missing)} (need {', '.join(COLUMNS)})")

    def rows_of() -> Iterable[tuple[str, Mapping[str, Any]]]:
        for row in reader:
            where = f"row {reader.line_num}"
            if None in row:
                raise BlindspotError(path, f"{where}: more fields than the header has columns")
            if all((v or "").strip() == "" for v in row.values()):
                continue  # a blank line
            if not _is_study_level(row) and any(row.get(c) is None for c in COLUMNS):
                raise BlindspotError(path, f"{where}: fewer fields than the header has columns")
            yield where, row

    try:
        return parse_annotations(rows_of(), path)
    except csv.Error as err:
        raise BlindspotError(path, f"row {reader.line_num}: malformed CSV ({err})") from None


def write_annotations(path: PathLike, boxes: Sequence[LesionBox]) -> Path:
    """Write boxes atomically as CSV (``.csv``, the module's layout) or JSON (``.json``, ``{"lesions": [...]}``)."""
    path = Path(path)
    rows = [b.as_row() for b in boxes]
    if path.suffix.lower() == ".json":
        return write_json(path, {"lesions": rows})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def validate_annotations(
    annotations: LesionAnnotations,
    volumes: Mapping[str, tuple[int, tuple[int, int]]],
    origin: str = "top",
) -> list[LesionBox]:
    """Match boxes to volumes and check them; returns the boxes with rows counted from the top.

    Args:
        annotations: from :func:`read_annotations`.
        volumes: ``{volume name: (number of slices, (h, w) of the reconstruction image)}``; names are matched
            with and without the ``.h5`` suffix (:func:`volume_key`).
        origin: ``"top"`` (rows counted from the top, as stored) or ``"bottom"`` (fastMRI+: counted from the
            bottom of the image; converted here).
    Raises:
        BlindspotError: naming the annotation file and row — unknown volume, slice out of range, box outside the
        image; or no boxes at all.
    """
    if origin not in ORIGINS:
        raise BlindspotError(None, f"unknown box origin {origin!r}; choose from {list(ORIGINS)}")
    src = annotations.source
    index = {volume_key(name): value for name, value in volumes.items()}
    out = []
    for b in annotations.boxes:
        key = volume_key(b.file)
        if key not in index:
            known = sorted(index)
            hint = f" (known: {', '.join(known[:3])}{', …' if len(known) > 3 else ''})" if known else ""
            raise BlindspotError(src, f"{b.row}: unknown file {b.file!r}{hint}")
        slices, (h, w) = index[key]
        if b.slice >= slices:
            raise BlindspotError(src, f"{b.row}: slice {b.slice} is out of range for {b.file} ({slices} slices)")
        if b.x + b.width > w or b.y + b.height > h:
            raise BlindspotError(
                src,
                f"{b.row}: box x={b.x}, y={b.y}, width={b.width}, height={b.height} leaves the {h}x{w} image of "
                f"{b.file}",
            )
        y = b.y if origin == "top" else h - b.y - b.height
        out.append(LesionBox(b.file, b.slice, b.x, y, b.width, b.height, b.label, b.row))
    if not out:
        raise BlindspotError(src, "holds no lesion boxes")
    return out


def boxes_tensor(boxes: Sequence[LesionBox], device: torch.device | str = "cpu") -> Tensor:
    """``(L, 4)`` int64 tensor of ``(x, y, width, height)`` per box, pixels."""
    return torch.tensor([[b.x, b.y, b.width, b.height] for b in boxes], dtype=torch.int64,
                        device=device).reshape(-1, 4)
