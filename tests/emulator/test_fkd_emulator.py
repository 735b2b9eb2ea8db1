"""The CUDA FKD kernels (csrc/cuda/fkd.cu, unchanged) on the CPU emulator under AddressSanitizer +
UBSan match the float64 reference: forward, backward and forward-backward, every case of
tools/cuda_emulator/fkd.py."""

import dataclasses

import pytest
import torch

from tools.cuda_emulator import fkd

from .cases import case_params, failures


@pytest.mark.parametrize("case", case_params(fkd.CASES))
def test_fkd_kernels_match_the_reference(emulator, case):
    out = fkd.run(emulator("fkd"), case)
    checks = fkd.verdicts(case, out)
    assert all(c.ok for c in checks), failures(checks)


def test_precision_reaches_the_kernels(emulator):
    """The driver's PRECISION selects the TF32 kernels: tf32 rounds operands to 10 mantissa bits
    (a loss error far above float32 roundoff), tf32x3 recovers float32 accuracy, and the
    default float32 path differs from both in its bits."""
    base = fkd.Case(3, 7, (64,), fkd.F32, teachers_grad=True)
    ref_loss, _ = fkd.expected(base)
    err = {}
    outs = {}
    for precision in fkd.PRECISIONS:
        case = dataclasses.replace(base, precision=precision)
        outs[precision] = fkd.run(emulator("fkd"), case)
        err[precision] = abs(outs[precision].loss.double().item() / ref_loss.item() - 1)
    assert err["tf32"] > 1e-6 > err["tf32x3"], err
    assert err["ieee"] < 1e-6, err
    assert not torch.equal(outs["tf32"].grads[0], outs["tf32x3"].grads[0])
    assert not torch.equal(outs["ieee"].grads[0], outs["tf32x3"].grads[0])


def test_precision_is_for_float32_cases():
    with pytest.raises(ValueError, match="float32"):
        fkd.Case(3, 7, (64,), fkd.F16, precision="tf32")
