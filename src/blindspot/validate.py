"""One validation layer for the numbers and paths a user gives: argparse types with physical limits, and path checks.

Low layer (it imports only :mod:`blindspot.errors`), so commands, runs and library code can all use it; each kind
of check lives here once.

* **Argument types** (``type=`` of ``argparse``): they raise :class:`argparse.ArgumentTypeError`, which the CLI prints
  as one line naming the option (``blindspot fnaf: error: argument --accelerations: …``). Every number must be
  finite; integers must be written as integers.
* **Limits** that mean something physically: an acceleration is at least 1 (fully sampled) and at most
  :data:`MAX_ACCELERATION`; fractions and doses lie in (0, 1]; image sides lie in
  [:data:`MIN_IMAGE_SIDE`, :data:`MAX_IMAGE_SIDE`]; one array (a phantom volume's k-space, a sinogram) may hold at most
  :data:`MAX_ARRAY_BYTES`.
* **Paths** (:func:`check_output_file`, :func:`check_output_folder`, :func:`check_writable_target`): results are
  written only as regular files, never over a device, FIFO or folder; nothing already there is replaced without
  ``--overwrite``; an output folder may not be, or lie inside, the input data. :func:`printable` renders any path
  (including names that are not UTF-8) as safe text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from blindspot.errors import BlindspotError, PathLike

#: Highest under-sampling factor accepted. Beyond it a 320-column image keeps fewer than 10 phase-encode columns and
#: the default centre fraction (0.32 / R) rounds to a single column or none, so no reconstruction is meaningful.
MAX_ACCELERATION = 32.0
#: The smallest image side (pixels) the tool attacks, trains or evaluates on, for images read from files and for the
#: sizes, crops and patches a user asks for: SSIM needs its 7×7 window, and a 1×1 or 4×4 "image" is no image to
#: reconstruct or attack (networks pad anything smaller than their own multiple, e.g. the U-Net's 16, internally).
MIN_IMAGE_SIDE = 8
#: Largest image side (a 4096² float32 image is 64 MiB; clinical CT is 512², fastMRI k-space 640×368).
MAX_IMAGE_SIDE = 4096
#: Widest layer (channels, hidden units) a command-line option may ask for (the same limit as a checkpoint's integer
#: hyper-parameters): wider networks are refused before their weights are allocated.
MAX_WIDTH = 4096
#: Most bytes one array may need (a phantom volume's k-space, a sinogram): larger requests are refused before
#: anything is allocated, instead of ending in an out-of-memory crash.
MAX_ARRAY_BYTES = 4 * 1024**3


# ------------------------------------------------------------------------------------------------------------------
# argparse types
# ------------------------------------------------------------------------------------------------------------------
def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           what: str = "") -> Callable[[str], float]:
    """An ``argparse`` type: a finite float within the bounds (open or closed); ``what`` says what the limit means."""
    bounds = _interval(lo, hi, lo_open, hi_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' + bounds if bounds else ''}{what}, "
                                             f"got {text!r}")
        return value

    parse.__name__ = f"number {bounds}".strip()
    return parse


def integer(lo: int | None = None, hi: int | None = None, *, what: str = "") -> Callable[[str], int]:
    """An ``argparse`` type: an integer (written as one: ``3``, not ``3.0``) in ``[lo, hi]``."""
    bounds = _interval(lo, hi, False, False)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}{what}, got {value}")
        return value

    parse.__name__ = f"integer {bounds}".strip()
    return parse


positive_int = integer(1)
non_negative_int = integer(0)
positive_float = number(0, lo_open=True)
non_negative_float = number(0)
finite_float = number()
#: A share of a set (validation, test, robust fraction): strictly between 0 and 1.
fraction = number(0, 1, lo_open=True, hi_open=True)
#: A fraction that may be whole (dose, centre fraction, region fraction, thresholds on kept energy): in (0, 1].
unit_fraction = number(0, 1, lo_open=True)
dose = number(0, 1, lo_open=True, what=" (fraction of the full dose)")
acceleration = number(1, MAX_ACCELERATION, what=" (1: fully sampled)")
image_side = integer(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE, what=" pixels")
#: Channels or hidden units of a network layer.
width = integer(1, MAX_WIDTH)


def side(minimum: int) -> Callable[[str], int]:
    """An image, crop or patch side of at least ``minimum`` pixels (and at most :data:`MAX_IMAGE_SIDE`)."""
    return integer(minimum, MAX_IMAGE_SIDE, what=" pixels")


def hparam(text: str) -> tuple[str, Any]:
    """``--hparam KEY=VALUE`` → ``(key, value)``; the value is parsed as JSON (numbers finite), else kept as text."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expects KEY=VALUE with KEY a name, got {text!r}")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except json.JSONDecodeError:
        value = raw
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{key}: {err}") from None
    if not _all_finite(value):
        raise argparse.ArgumentTypeError(f"{key}: {raw} is not a finite number")
    return key, value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    return True


def hparam_dict(items: Iterable[str | tuple[str, Any]] | None) -> dict[str, Any]:
    """``--hparam`` values (strings or parsed pairs) as a dict; a bad item is a one-line error naming ``--hparam``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if isinstance(item, str):
            try:
                item = hparam(item)
            except argparse.ArgumentTypeError as err:
                raise BlindspotError("--hparam", str(err)) from None
        key, value = item
        out[key] = value
    return out


def check_hparam_types(hparams: dict[str, Any], defaults: dict[str, Any], source: str = "--hparam") -> None:
    """Each value must have the type of the constructor's default (``int`` for ``int``, a number for ``float``, a
    list for a list or tuple, …), and each key must be a known hyper-parameter; one line naming ``source``."""
    kinds = {bool: "true or false", int: "an integer", float: "a number", str: "text", list: "a list",
             tuple: "a list"}
    for key, value in hparams.items():
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise BlindspotError(source, f"unknown hyper-parameter {key!r} (known: {known})")
        default = defaults[key]
        if default is None:
            continue
        want = type(default)
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool),
            str: isinstance(value, str),
            list: isinstance(value, list),
            tuple: isinstance(value, list),
        }.get(want, True)
        if not ok:
            raise BlindspotError(source, f"{key} must be {kinds.get(want, want.__name__)}, got {value!r}")


# ------------------------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------------------------
def check_array_bytes(shape: Sequence[int], itemsize: int, what: str) -> int:
    """Refuse an array of ``shape`` × ``itemsize`` bytes above :data:`MAX_ARRAY_BYTES` (before allocating it);
    ``what`` names the options that set the shape. Returns the byte count."""
    n = int(itemsize)
    for s in shape:
        n *= int(s)
    if n > MAX_ARRAY_BYTES:
        dims = "x".join(str(int(s)) for s in shape)
        raise BlindspotError(what, f"would need an array of {dims} ({n / 1024**3:.1f} GiB), beyond the limit of "
                                   f"{MAX_ARRAY_BYTES / 1024**3:.0f} GiB")
    return n


def check_crop(crop: Sequence[int] | None, shape: Sequence[int], source: PathLike | None,
               option: str = "--crop") -> None:
    """A crop ``(h, w)`` must fit inside the image ``shape`` ``(..., H, W)`` (a larger crop is an error, never silently
    the image size). ``source`` names the image (a file, or the option that set its size)."""
    if crop is None:
        return
    h, w = int(crop[0]), int(crop[1])
    H, W = int(shape[-2]), int(shape[-1])
    if h > H or w > W:
        of = f" of {printable(source)}" if source is not None else ""
        raise BlindspotError(option, f"{h} {w} is larger than the {H}x{W} image{of}")


# ------------------------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------------------------
def printable(path: PathLike | bytes) -> str:
    """``path`` as text that can always be printed or encoded as UTF-8 (bytes that are not UTF-8 become ``\\xNN``)."""
    if isinstance(path, bytes):
        return path.decode("utf-8", "backslashreplace")
    text = os.fspath(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_writable_target(path: PathLike) -> Path:
    """``path`` may be (re)written as a regular file: it is absent or a regular file (links followed), and its folder
    is a folder. Returns the path to write (a link's target, so the link is kept). Never names a temporary file."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise BlindspotError(path, err.strerror or str(err)) from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise BlindspotError(path, f"is {_kind(st.st_mode)}; results are written only as regular files")
    if path.is_symlink():
        path = path.resolve()
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise BlindspotError(parent, "is not a folder, so nothing can be written inside it")
            break
    return path


def check_output_file(path: PathLike | None, option: str, overwrite: bool = False) -> Path | None:
    """An output file option (``--json``, ``--panel``, ``--boxes``): refuse a special file or folder, and an existing
    file unless ``overwrite``. ``None`` passes through."""
    if path is None:
        return None
    path = Path(path)
    check_writable_target(path)
    if path.exists() and not overwrite:
        raise BlindspotError(path, f"already exists; pass --overwrite to replace it, or choose another {option}")
    return path


def same_or_inside(path: PathLike, folder: PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (links resolved)."""
    here, there = Path(path).resolve(), Path(folder).resolve()
    return here == there or there in here.parents


def check_output_folder(path: PathLike | None, option: str = "--out", inputs: Iterable[PathLike | None] = (),
                        results: Iterable[str] = (), overwrite: bool = False) -> Path | None:
    """An output folder option: not an existing file; not equal to, inside or above any of ``inputs`` (never write
    into, or clear, the input data); and, unless ``overwrite``, holding none of ``results`` (names of files a previous
    run wrote)."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BlindspotError(path, f"exists and is not a folder; choose another {option}")
    for src in inputs:
        if src is None or not Path(src).exists():
            continue
        if Path(src).is_dir() and same_or_inside(path, src):
            raise BlindspotError(path, f"is or lies inside the input data {printable(src)}; choose another {option}")
        if same_or_inside(src, path):
            raise BlindspotError(path, f"holds the input data {printable(src)}; choose another {option}")
    if not overwrite:
        found = [name for name in results if (path / name).exists()]
        if found:
            raise BlindspotError(path, f"already holds results ({', '.join(found)}); pass --overwrite to replace them, "
                                       f"or choose another {option}")
    return path
