"""Each emulator driver is built once per session (and cached in build/cuda_emulator across
sessions, rebuilt when a source changes)."""

from __future__ import annotations

import functools
import shutil

import pytest

from tools.cuda_emulator import build as emu

from .cases import SANITIZE


@functools.cache
def _built(op: str):
    return emu.build(op, SANITIZE)


@pytest.fixture(scope="session")
def emulator():
    """emulator(op) -> path of the built driver of op ("fkd", "srd", "rkd")."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++ to build the emulator")
    return _built
