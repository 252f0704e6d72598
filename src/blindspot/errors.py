"""The one error type for a user's bad input.

A :class:`BlindspotError` carries the offending file (or other source) and a one-line description of the problem.
The command-line interface prints ``blindspot: error: <source>: <problem>`` and exits with code 2, never a
traceback. Library code raises it for anything a user can get wrong (a file, a shape, a flag); genuine bugs stay
ordinary exceptions.
"""

from __future__ import annotations

import os
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]


class BlindspotError(Exception):
    """A user's input cannot be used.

    Args:
        source: the file, folder or argument at fault (``None`` when there is none).
        problem: one line saying what is wrong, e.g. ``"missing key 'kspace'"``.
    """

    exit_code = 2

    def __init__(self, source: PathLike | None, problem: str) -> None:
        self.source = None if source is None else os.fspath(source)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return self.problem if self.source is None else f"{self.source}: {self.problem}"
