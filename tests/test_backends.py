"""Backend selection: explicit, inspectable, never a silent fallback."""

import pytest
import torch

import fastkd
from fastkd.registry import BackendUnavailableError, resolve_backend

CPU = torch.device("cpu")


def test_available_backends_reports_every_backend_with_a_reason():
    report = fastkd.available_backends()
    assert set(report) == {"reference", "cpu", "cuda", "triton"}
    for info in report.values():
        assert isinstance(info["available"], bool) and info["detail"]
    assert report["reference"]["available"]
    assert report["cpu"]["available"], report["cpu"]["detail"]
    assert "fkd" in report["cpu"]["ops"]
    if not torch.cuda.is_available():
        assert not report["cuda"]["available"]


def test_auto_picks_the_compiled_cpu_kernel_on_cpu_tensors():
    assert resolve_backend("fkd", "auto", CPU) == "cpu"
    assert resolve_backend("fkd", None, CPU) == "cpu"
    # No fused kernel for SP: auto means the reference, explicitly named.
    assert resolve_backend("sp", "auto", CPU) == "reference"


def test_environment_override(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "reference")
    assert resolve_backend("fkd", None, CPU) == "reference"
    assert resolve_backend("fkd", "cpu", CPU) == "cpu"  # the argument wins
    monkeypatch.setenv("FASTKD_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTKD_BACKEND"):
        resolve_backend("fkd", None, CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_unavailable_backend_is_an_error_not_a_fallback():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        fastkd.fkd_loss(s, t, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="no kernel for 'sp'"):
        fastkd.sp_loss(s, t, backend="cpu")


def test_backend_name_is_validated():
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("fkd", "gpu", CPU)
    with pytest.raises(TypeError, match="backend"):
        resolve_backend("fkd", 3, CPU)


def test_reference_backend_runs_the_oracle():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    got = fastkd.fkd_loss(s, t, 1.0, 0.5, backend="reference")
    assert got.item() == fastkd.reference.fkd_loss(s, t, 1.0, 0.5).item()
