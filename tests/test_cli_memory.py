"""The CLI keeps freed heap memory for reuse (``blindspot.cli.keep_freed_memory``) only when asked to, and lets idle
OpenMP threads sleep (``blindspot.cli.yield_idle_threads``)."""

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


def test_idle_openmp_threads_sleep_unless_the_user_chose_a_policy(monkeypatch):
    """``OMP_WAIT_POLICY`` defaults to PASSIVE for blindspot's commands (a user's setting wins), and it is set before
    PyTorch loads its OpenMP runtime: ``blindspot.cli`` does not import torch."""
    import os
    import subprocess

    from blindspot.cli import yield_idle_threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    yield_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    yield_idle_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    code = "import sys, blindspot.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
