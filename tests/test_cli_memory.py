"""The CLI keeps freed heap memory for reuse (``blindspot.cli.keep_freed_memory``) only when asked to."""

import ctypes.util
import sys

import pytest

from blindspot.cli import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="glibc's mallopt is Linux-only")
def test_thresholds_are_raised_only_when_asked(monkeypatch):
    monkeypatch.delenv("BLINDSPOT_MALLOC", raising=False)
    assert keep_freed_memory() is False
    monkeypatch.setenv("BLINDSPOT_MALLOC", "keep")
    assert keep_freed_memory() is True
