"""The ``blindspot`` command.

Each sub-command lives in a module of :mod:`blindspot.commands` that exposes ``register(subparsers)``; registering
adds an ``argparse`` parser whose ``func(args) -> int`` runs it. A user's bad input raises
:class:`~blindspot.errors.BlindspotError`, printed here as one line with exit code 2. Every parser (sub-commands
included) is a :class:`OneLineParser`: a malformed command line is one line too (``blindspot fnaf: error: argument
--accelerations: …; see blindspot fnaf --help``), exit code 2, without the usage dump.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import io
import sys
from typing import Sequence

from blindspot import __version__
from blindspot.errors import BlindspotError
from blindspot.validate import printable

# Order is the order of `blindspot --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "blindspot.commands.demo",
    "blindspot.commands.data",
    "blindspot.commands.train",
    "blindspot.commands.evaluate",
    "blindspot.commands.fnaf",
    "blindspot.commands.audit",
    "blindspot.commands.invariances",
    "blindspot.commands.lesions",
    "blindspot.commands.beyond",
)


class UsageError(Exception):
    """A malformed command line: ``prog`` (e.g. ``blindspot fnaf``) and argparse's one-line ``message``."""

    def __init__(self, prog: str, message: str) -> None:
        self.prog, self.message = prog, " ".join(str(message).split())
        super().__init__(f"{prog}: error: {self.message}")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line naming the (sub-)command, with no usage dump.

    ``add_subparsers`` gives sub-commands the parent's class, so one override covers every parser. Arguments a
    sub-command does not know are reported by that sub-command (``blindspot fnaf: error: unrecognized arguments``),
    not by the top-level parser.
    """

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self.prog, message)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self.prog != TOP_PROG:  # a sub-command: its own unknown arguments are its error
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


TOP_PROG = "blindspot"
OUT_OF_MEMORY = "out of memory; results written so far are kept (try a smaller --batch-size or --chunk-size)"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=TOP_PROG,
        description="Find what medical-image reconstruction and denoising networks cannot see, and help fix it.",
    )
    parser.add_argument("--version", action="version", version=f"blindspot {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # a sub-command whose module is not part of this build
                continue
            raise
        module.register(subparsers)
    return parser


def _printable_streams() -> None:
    """Let stdout and stderr print any text, file names that are not UTF-8 included (as ``\\xNN`` escapes)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError, io.UnsupportedOperation):
            pass


#: With ``BLINDSPOT_MALLOC=keep``: blocks up to this size come from the heap, and up to this much free memory at its top
#: is kept (256 MiB).
KEEP_FREED_BYTES = 1 << 28


def keep_freed_memory() -> bool:
    """With ``BLINDSPOT_MALLOC=keep``, let glibc keep freed memory for reuse instead of returning it to the kernel after
    every large tensor (opt-in: it trades memory for speed).

    glibc serves blocks above a dynamic threshold (at most 32 MiB) with ``mmap`` and unmaps them on ``free``; the
    attacks allocate and free large tensors for every candidate batch, so the kernel zero-fills fresh pages each time
    (the quiet ``make demo`` spent 167 s of its CPU time in the kernel, 43 million page faults). Raising the mmap and
    trim thresholds to :data:`KEEP_FREED_BYTES` made a small audit (4 images at 128×128, random search) 27% faster with
    the same records (system time 8.0 → 2.3 s, peak resident memory 854 → 891 MB) and ``make demo`` 286 → 226 s, but
    the demo's peak resident memory rose from 2.0 to 4.5 GB (heap fragmentation), hence opt-in. ``make demo`` sets it.
    Returns whether the thresholds were changed (never without glibc).
    """
    if os.environ.get("BLINDSPOT_MALLOC", "").lower() != "keep":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)) and bool(
            libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES))
    except (OSError, AttributeError):
        return False


def yield_idle_threads() -> None:
    """Let OpenMP's idle threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), unless the user set the
    policy. Must run before PyTorch is imported: its OpenMP runtime reads the variable once, when it loads.

    With the runtime's default, threads that wait for work spin; on a machine shared with other jobs they take the
    cores the working threads need. Measured (``blindspot worst-case --model unet --phantom-volumes 1
    --phantom-slices 4``, two threads, ``farm-bench -n 3``, paired): at load average ≈ 6, 188 s median with the default
    and 69 s with ``PASSIVE`` (CPU 51 s against 18 s); beside three busy-looping processes, 50.8 s with the default and
    32.2 s with this function's default (CPU 37.5 s against 19.0 s); on a quiet machine the same wall time (ratio
    0.996) and 10 % less CPU time.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    yield_idle_threads()
    keep_freed_memory()
    _printable_streams()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(f"{printable(err.prog)}: error: {printable(err.message)}; see {err.prog} --help", file=sys.stderr)
        return 2
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command (``args.func``); its errors end as one line on stderr and an exit status."""
    try:
        return int(args.func(args) or 0)
    except BlindspotError as err:
        print(f"blindspot: error: {printable(err.message)}", file=sys.stderr)
        return err.exit_code
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError) as err:
        where = f"{printable(err.filename)}: " if err.filename is not None else ""
        print(f"blindspot: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blindspot: interrupted; results written so far are kept", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"blindspot: error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # PyTorch's allocators: OutOfMemoryError (CUDA) or a plain RuntimeError (CPU)
        if type(err).__name__ != "OutOfMemoryError" and "can't allocate memory" not in str(err):
            raise
        print(f"blindspot: error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
