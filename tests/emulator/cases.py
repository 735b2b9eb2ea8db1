"""Which emulator cases run: the quick ones always (CI), every case with FASTKD_EMULATOR=full
(they are also marked slow). FASTKD_EMULATOR_SANITIZE=thread builds the drivers under
ThreadSanitizer instead of AddressSanitizer + UBSan."""

from __future__ import annotations

import os

import pytest

FULL = os.environ.get("FASTKD_EMULATOR", "").lower() == "full"
SANITIZE = os.environ.get("FASTKD_EMULATOR_SANITIZE", "address")


def case_params(cases):
    """pytest params of a checker's CASES, with the case ids."""
    slow = [
        pytest.mark.slow,
        pytest.mark.skipif(not FULL, reason="full emulator set: FASTKD_EMULATOR=full"),
    ]
    return [pytest.param(c, id=c.id, marks=[] if c.quick else slow) for c in cases]


def failures(checks) -> str:
    """The failed comparisons, for an assertion message."""
    return ", ".join(str(c) for c in checks if not c.ok)
