"""Lesion bounding-box annotations: two CSV layouts (fastMRI+ style, and the seed authors' published annotation
files), a JSON equivalent, and their validation. The CSV layout is detected from the header row.

fastMRI+ style CSV layout::

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

The seed authors' layout (Calivà, Cheng et al.: the fastMRI knee annotations behind the seed's "real-world
abnormalities" table, ``singlecoil_bb_{train,val}.csv``, written by pandas)::

    filename,slice,numBBs,labels,coords
    file1000031,18,2,['Lat_Men' 'CartLatTib'],"[[ 57.33 112.72 165.78 188.89]
     [120.1  141.9   30.5   44.25]]"

* ``filename`` — the volume's name (without ``.h5``); ``slice`` — **1-based** slice number (slice ``1`` is index 0);
* ``numBBs`` — the number of boxes on that slice; ``labels`` — that many labels, written as NumPy / Python print a
  list of strings, each one of :data:`AUTHOR_LABELS`; ``coords`` — that many boxes ``[xmin xmax ymin ymax]`` as
  NumPy prints a float array (one box per bracket; spaces or commas; other columns, e.g. pandas' index, ignored).
* Coordinates are continuous pixel coordinates in ``[0, w]`` × ``[0, h]`` (pixel ``c`` spans ``[c, c + 1)``):
  ``x`` along columns, ``y`` along rows, on the ``reconstruction_esc`` slice **flipped along its row axis**. The
  authors' code reads ``np.flip(reconstruction_esc, axis=1)`` of the ``(slice, row, column)`` array, i.e. the image
  upside down: their row ``r'`` is blindspot's row ``h − 1 − r'`` and columns are unchanged. A box covers every
  pixel it overlaps — columns ``[⌊xmin⌋, ⌈xmax⌉)`` and flipped rows ``[⌊ymin⌋, ⌈ymax⌉)`` — so in blindspot's
  convention (rows from the top of the stored image) it covers rows ``[h − ⌈ymax⌉, h − ⌊ymin⌋)``. The flip is part
  of the format: these files are always read with ``origin="bottom"`` whatever ``origin`` is asked
  (:attr:`LesionAnnotations.origin`). (The authors display the box with matplotlib, pixel centres at whole numbers:
  half a pixel up and left of this reading; immaterial next to the 4-pixel ring of the preservation rule.)

JSON equivalent (fastMRI+ keys): a list of objects with the same keys, or ``{"lesions": [...]}``::

    {"lesions": [{"file": "file1000031", "slice": 17, "x": 120, "y": 141, "width": 12, "height": 9,
                  "label": "Meniscus Tear"}]}

Every problem — a missing column, a value that is not a whole number, a negative or empty box, a box that leaves the
image, an unknown file or slice, an unknown label or a box count that disagrees with ``numBBs`` — is a
:class:`~blindspot.errors.BlindspotError` naming the file and the row (``row 3``: the CSV line the row starts on /
the JSON list's 1-based position).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
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
#: The seed authors' annotation CSV: its columns and its 11 labels (cartilage, bone-marrow lesions and menisci by
#: compartment, and cysts).
AUTHOR_COLUMNS: tuple[str, ...] = ("filename", "slice", "numBBs", "labels", "coords")
AUTHOR_LABELS: tuple[str, ...] = ("CartMedFem", "CartLatFem", "CartMedTib", "CartLatTib", "BML_Med_Fem",
                                  "BML_Lat_Fem", "BML_Med_Tib", "BML_Lat_Tib", "Med_Men", "Lat_Men", "Cyst")


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
    #: the row origin the file's layout fixes (``"bottom"`` for the authors' CSV, drawn on the flipped image), or
    #: ``None`` when the caller's ``origin`` applies (fastMRI+ CSV, JSON).
    origin: str | None = None
    #: ``"fastmri+"``, ``"authors"`` or ``"json"``.
    layout: str = "fastmri+"

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
        ann = parse_annotations(rows, path)
        ann.layout = "json"
        return ann
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise BlindspotError(path, "empty annotation file (no header row)")
    reader.fieldnames = header
    authors = all(c in header for c in AUTHOR_COLUMNS)
    missing = [c for c in COLUMNS if c not in header]
    if missing and not authors:
        raise BlindspotError(path, f"header lacks column(s) {', '.join(missing)} (need {', '.join(COLUMNS)}, or the "
                                   f"authors' {', '.join(AUTHOR_COLUMNS)})")

    needed = AUTHOR_COLUMNS if authors else COLUMNS

    def rows_of() -> Iterable[tuple[str, Mapping[str, Any]]]:
        for row in reader:
            # the line the row starts on (a quoted field may span lines: the authors' multi-box coords)
            where = f"row {reader.line_num - sum(str(v).count(chr(10)) for v in row.values() if v)}"
            if None in row:
                raise BlindspotError(path, f"{where}: more fields than the header has columns")
            if all((v or "").strip() == "" for v in row.values()):
                continue  # a blank line
            if not _is_study_level(row) and any(row.get(c) is None for c in needed):
                raise BlindspotError(path, f"{where}: fewer fields than the header has columns")
            yield where, row

    try:
        if authors:
            return parse_author_annotations(rows_of(), path)
        return parse_annotations(rows_of(), path)
    except csv.Error as err:
        raise BlindspotError(path, f"row {reader.line_num}: malformed CSV ({err})") from None


_LABEL = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _author_labels(text: str, source: PathLike, where: str) -> list[str]:
    labels = [a or b for a, b in _LABEL.findall(text)]
    if not labels and text.strip() and "[" not in text and "'" not in text:
        labels = [text.strip()]  # a bare label
    if not labels:
        raise BlindspotError(source, f"{where}: labels {text.strip()!r} holds no quoted label")
    unknown = [lab for lab in labels if lab not in AUTHOR_LABELS]
    if unknown:
        raise BlindspotError(source, f"{where}: unknown label {unknown[0]!r} (the authors' labels: "
                                     f"{', '.join(AUTHOR_LABELS)})")
    return labels


def _author_coords(text: str, source: PathLike, where: str) -> list[tuple[float, float, float, float]]:
    inner = _BRACKET.findall(text)
    if not inner or text.count("[") - text.count("]") != 0:
        raise BlindspotError(source, f"{where}: coords {' '.join(text.split())!r} is not a list of "
                                     "[xmin xmax ymin ymax] boxes")
    boxes = []
    for part in inner:
        try:
            values = [float(v) for v in part.replace(",", " ").split()]
        except ValueError:
            raise BlindspotError(source, f"{where}: coords box [{part.strip()}] holds a value that is not a "
                                         "number") from None
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise BlindspotError(source, f"{where}: coords box [{' '.join(part.split())}] must be four finite "
                                         "numbers xmin xmax ymin ymax")
        boxes.append((values[0], values[1], values[2], values[3]))
    return boxes


def author_box(coords: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """One of the authors' ``[xmin xmax ymin ymax]`` float boxes (continuous pixel coordinates on the row-flipped
    image) → ``(x, y, width, height)`` whole pixels covering every pixel it overlaps, ``y`` still counted on the
    flipped image (from the bottom of blindspot's image; see the module docs)."""
    xmin, xmax, ymin, ymax = coords
    x0, y0 = math.floor(xmin), math.floor(ymin)
    return x0, y0, math.ceil(xmax) - x0, math.ceil(ymax) - y0


def parse_author_annotations(rows: Iterable[tuple[str, Mapping[str, Any]]], source: PathLike) -> LesionAnnotations:
    """Boxes from the authors' CSV rows (``filename, slice, numBBs, labels, coords``; see the module docs), with
    0-based slices and ``y`` counted on the flipped image (``origin="bottom"``)."""
    boxes = []
    for where, row in rows:
        missing = [c for c in AUTHOR_COLUMNS if row.get(c) is None or not str(row[c]).strip()]
        if missing:
            raise BlindspotError(source, f"{where}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} empty")
        file = str(row["filename"]).strip()
        s = _int_field(row["slice"], "slice", source, where)
        if s < 1:
            raise BlindspotError(source, f"{where}: slice must be >= 1 (the authors' slices are 1-based), got {s}")
        n = _int_field(row["numBBs"], "numBBs", source, where)
        labels = _author_labels(str(row["labels"]), source, where)
        coords = _author_coords(str(row["coords"]), source, where)
        if not (n == len(labels) == len(coords)):
            raise BlindspotError(source, f"{where}: numBBs is {n} but the row has {len(labels)} label(s) and "
                                         f"{len(coords)} box(es)")
        for label, c in zip(labels, coords):
            xmin, xmax, ymin, ymax = c
            if xmin < 0 or ymin < 0:
                raise BlindspotError(source, f"{where}: box [{xmin:g} {xmax:g} {ymin:g} {ymax:g}] is outside the "
                                             "image (negative)")
            if xmax <= xmin or ymax <= ymin:
                raise BlindspotError(source, f"{where}: box [{xmin:g} {xmax:g} {ymin:g} {ymax:g}] is empty "
                                             "(need xmin < xmax and ymin < ymax)")
            x, y, w, h = author_box(c)
            boxes.append(LesionBox(file, s - 1, x, y, w, h, label, where))
    return LesionAnnotations(boxes, str(source), 0, origin="bottom", layout="authors")


def author_rows(boxes: Sequence[LesionBox], heights: Mapping[str, int]) -> list[dict[str, Any]]:
    """Boxes (rows from the top, 0-based slices) → the authors' CSV rows, one per slice: 1-based ``slice``, boxes
    ``[xmin xmax ymin ymax]`` on the row-flipped image as NumPy prints them. ``heights``: image height per volume
    (:func:`volume_key` names). The inverse of :func:`parse_author_annotations` for whole-pixel boxes."""
    import numpy as np

    per: dict[tuple[str, int], list[LesionBox]] = {}
    for b in boxes:
        per.setdefault((volume_key(b.file), b.slice), []).append(b)
    out = []
    for (file, s), group in per.items():
        h = heights[file]
        coords = np.array([[b.x, b.x + b.width, h - b.y - b.height, h - b.y] for b in group], dtype=np.float64)
        out.append({"filename": file, "slice": s + 1, "numBBs": len(group),
                    "labels": str(np.array([b.label for b in group])), "coords": str(coords)})
    return out


def write_annotations(path: PathLike, boxes: Sequence[LesionBox], heights: Mapping[str, int] | None = None
                      ) -> Path:
    """Write boxes atomically as CSV (``.csv``, the fastMRI+ layout, or the authors' layout with
    ``heights={volume: image height}``, :func:`author_rows`) or JSON (``.json``, ``{"lesions": [...]}``)."""
    path = Path(path)
    rows = [b.as_row() for b in boxes]
    if path.suffix.lower() == ".json":
        return write_json(path, {"lesions": rows})
    columns: Sequence[str] = COLUMNS
    if heights is not None:
        rows, columns = author_rows(boxes, heights), AUTHOR_COLUMNS
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
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
            bottom of the image; converted here). A layout that fixes its origin (the authors' CSV,
            :attr:`LesionAnnotations.origin`) is read with its own whatever ``origin`` says.
    Raises:
        BlindspotError: naming the annotation file and row — unknown volume, slice out of range, box outside the
        image; or no boxes at all.
    """
    if origin not in ORIGINS:
        raise BlindspotError(None, f"unknown box origin {origin!r}; choose from {list(ORIGINS)}")
    origin = annotations.origin or origin
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
