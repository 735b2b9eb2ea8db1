"""The CUDA FKD kernels (csrc/cuda/fkd.cu, unchanged) on the CPU emulator under AddressSanitizer +
UBSan match the float64 reference: forward, backward and forward-backward, every case of
tools/cuda_emulator/fkd.py."""

import pytest

from tools.cuda_emulator import fkd

from .cases import case_params, failures


@pytest.mark.parametrize("case", case_params(fkd.CASES))
def test_fkd_kernels_match_the_reference(emulator, case):
    out = fkd.run(emulator("fkd"), case)
    checks = fkd.verdicts(case, out)
    assert all(c.ok for c in checks), failures(checks)
