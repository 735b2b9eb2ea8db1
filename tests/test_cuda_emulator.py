"""The CUDA FKD, SRD and RKD kernels (csrc/cuda/fkd.cu, srd.cu and rkd.cu, unchanged) run on the
CPU emulator in csrc/cuda/emulator under AddressSanitizer + UBSan and must match the float64
reference: the one place CI without a GPU executes the device code itself, not only the shared
per-element math."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EMULATOR = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "emulator"
CHECK = EMULATOR / "check.py"
CHECK_SRD = EMULATOR / "check_srd.py"
CHECK_RKD = EMULATOR / "check_rkd.py"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulator")
@pytest.mark.parametrize(
    "checker,timeout",
    [(CHECK, 900), (CHECK_SRD, 600), (CHECK_RKD, 600)],
    ids=["fkd", "srd", "rkd"],
)
def test_cuda_kernels_match_reference_on_the_emulator(checker, timeout):
    run = subprocess.run(
        [sys.executable, str(checker), "--quick"], capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "all cases match the reference" in run.stdout
    assert "BAD " not in run.stdout and "FAILED" not in run.stdout
