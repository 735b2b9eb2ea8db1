"""The layered layout (docs/architecture.md): schemas that cannot drift between the compiled and
the Triton ops, a registry with no import cycle, the old module paths, one keyword set."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest
import torch

import fastkd
from fastkd import _extension, registry, validation
from fastkd.ops import _common as ops_common
from fastkd.ops import fkd as fkd_ops
from fastkd.ops import rkd as rkd_ops
from fastkd.ops import srd as srd_ops

OP_NAMES = sorted({*fkd_ops.SCHEMAS, *rkd_ops.SCHEMAS, *srd_ops.SCHEMAS})
needs_extension = pytest.mark.skipif(not _extension.loaded(), reason="fastkd._C not built")


@needs_extension
@pytest.mark.parametrize("name", OP_NAMES)
def test_compiled_schema_is_the_declared_one(name):
    schemas = {**fkd_ops.SCHEMAS, **rkd_ops.SCHEMAS, **srd_ops.SCHEMAS}
    got = ops_common.schema_of(getattr(torch.ops.fastkd, name))
    want = str(torch._C.parse_schema(f"x::{name}{schemas[name]}")).split("::", 1)[1]
    assert got == want


@needs_extension
@pytest.mark.parametrize("name", OP_NAMES)
def test_triton_schema_equals_compiled_schema(name):
    pytest.importorskip("triton")
    importlib.import_module("fastkd.triton")
    compiled = ops_common.schema_of(getattr(torch.ops.fastkd, name))
    triton_schema = ops_common.schema_of(getattr(torch.ops.fastkd_triton, name))
    assert triton_schema == compiled


def test_registry_imports_no_backend():
    # A fresh interpreter runs the registry's file on its own (fastkd/__init__ would import
    # everything): it must import no fastkd module, the backends register themselves.
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('reg', {registry.__file__!r}); "
        "m = importlib.util.module_from_spec(spec); sys.modules['reg'] = m; "
        "spec.loader.exec_module(m); "
        "print(sorted(k for k in sys.modules if k.startswith('fastkd')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_reference_backend_lists_every_declared_op():
    report = fastkd.available_backends()
    assert report["reference"]["ops"] == sorted(registry.OPS)
    for backend in ("cpu", "cuda", "triton"):
        assert set(report[backend]["ops"]) <= set(registry.OPS)


def test_register_kernels_rejects_unknown_names():
    with pytest.raises(ValueError, match="OPS"):
        registry.register_kernels("nope", "cpu", abs, abs)
    with pytest.raises(ValueError, match="backend"):
        registry.register_kernels("fkd", "reference", abs, abs)


OLD_PATHS = {
    "fastkd.fkd": {
        "FKDFunction": fastkd.FKDFunction,
        "FKDLoss": fastkd.FKDLoss,
        "fkd_loss": fastkd.fkd_loss,
        "choose_algorithm": fastkd.losses.fkd.choose_algorithm,
        "DUAL_RATIO": fastkd.losses.fkd.DUAL_RATIO,
    },
    "fastkd.dual": {"FKDDualFunction": fastkd.FKDDualFunction},
    "fastkd.srd": {"SRDFunction": fastkd.SRDFunction, "SRDLoss": fastkd.SRDLoss},
    "fastkd.relational": {
        "sp_loss": fastkd.sp_loss,
        "SPLoss": fastkd.SPLoss,
        "rkd_distance_loss": fastkd.rkd_distance_loss,
        "RKDDistanceLoss": fastkd.RKDDistanceLoss,
        "RKDFunction": fastkd.RKDFunction,
    },
    "fastkd.backends": {
        "resolve_backend": fastkd.resolve_backend,
        "available_backends": fastkd.available_backends,
        "BackendUnavailableError": fastkd.BackendUnavailableError,
        "register_kernels": registry.register_kernels,
    },
    "fastkd._validate": {
        "check_features": validation.check_features,
        "check_teachers": validation.check_teachers,
        "check_finite_number": validation.check_finite_number,
    },
    "fastkd._ops": {"fkd": fkd_ops, "rkd": rkd_ops, "srd": srd_ops},
}


@pytest.mark.parametrize("path", sorted(OLD_PATHS))
def test_old_module_paths_yield_the_same_objects(path):
    module = importlib.import_module(path)
    assert getattr(fastkd, path.rsplit(".", 1)[1]) is module
    for name, obj in OLD_PATHS[path].items():
        assert getattr(module, name) is obj, f"{path}.{name}"


def test_old_resolve_backend_keeps_the_dynamo_marker():
    from fastkd.backends import resolve_backend

    assert resolve_backend._dynamo_marked_constant is True


LOSSES = [
    (fastkd.fkd_loss, fastkd.FKDLoss, {}),
    (fastkd.sp_loss, fastkd.SPLoss, {}),
    (fastkd.rkd_distance_loss, fastkd.RKDDistanceLoss, {}),
    (fastkd.srd_loss, fastkd.SRDLoss, {"student_dim": 3, "teacher_dim": 3}),
]


@pytest.mark.parametrize("functional, module, args", LOSSES, ids=["fkd", "sp", "rkd", "srd"])
def test_every_loss_takes_backend_and_algorithm(functional, module, args):
    torch.manual_seed(0)
    s, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    ref = functional(s, t, backend="reference", algorithm="auto")
    assert ref.shape == () and torch.isfinite(ref)
    with pytest.raises(ValueError, match="algorithm"):
        functional(s, t, algorithm="bogus")
    loss_module = module(**args, backend="reference", algorithm="auto")
    assert "backend='reference'" in repr(loss_module) and "algorithm='auto'" in repr(loss_module)
    with pytest.raises(ValueError, match="algorithm"):
        module(**args, algorithm="bogus")
    torch.testing.assert_close(loss_module(s, t), ref, rtol=1e-12, atol=0)
    # The keyword set is the same on every loss: the distributed keywords too.
    for fn in (functional, type(loss_module).__init__):
        params = inspect.signature(fn).parameters
        assert "backend" in params  # SRDLoss has taken it positionally since 0.1
        for name in ("algorithm", "global_batch", "process_group"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn, name)


def test_sp_auto_uses_the_fkd_cost_model():
    from fastkd.losses import _common, sp

    width = 3 + 4
    batch = int(_common.DUAL_RATIO * width)
    assert sp.choose_algorithm("auto", batch, 3, 4) == "dual"
    assert sp.choose_algorithm("auto", batch - 1, 3, 4) == "explicit"
    assert fastkd.losses.fkd.choose_algorithm("auto", batch, 3, 4) == "dual"
    assert fastkd.losses.fkd.choose_algorithm("auto", batch - 1, 3, 4) == "tiled"


def test_validation_messages_name_the_argument():
    with pytest.raises(TypeError, match="^x must be a torch.Tensor"):
        validation.check_tensor([1.0], "x")
    with pytest.raises(TypeError, match="^x must be a floating tensor"):
        validation.check_tensor(torch.zeros(2, dtype=torch.long), "x")
    with pytest.raises(ValueError, match="^x must be finite"):
        validation.check_real(torch.tensor(float("nan")), "x")
    with pytest.raises(TypeError, match="^x must be a real number"):
        validation.check_finite_number(torch.tensor(1.0), "x")  # a tensor weight: graph break
    assert validation.check_real(torch.tensor([2.5]), "x") == 2.5
    with pytest.raises(ValueError, match="^x contains NaN or Inf"):
        validation.check_finite_tensor(torch.tensor([1.0, float("inf")]), "x")
    with pytest.raises(ValueError, match="momentum must be in"):
        validation.check_momentum(1.5)
    flat = validation.check_features(torch.zeros(3, 2, 5), "x", flatten=True)
    assert flat.shape == (3, 10)
    with pytest.raises(ValueError, match="2-D"):
        validation.check_features(torch.zeros(3, 2, 5), "x")


def test_triton_input_checks(monkeypatch):
    x = torch.zeros(2, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert validation.check_triton_inputs({"student": x, "teacher": x}) is True
    with pytest.raises(TypeError, match="teacher is bfloat16"):
        validation.check_triton_inputs({"student": x, "teacher": x.bfloat16()})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="student is on cpu.*CUDA tensors"):
        validation.check_triton_inputs({"student": x})


def test_device_guard_is_a_no_op_off_cuda():
    pytest.importorskip("triton")
    from fastkd.triton._common import device_guard

    current = torch.cuda.current_device() if torch.cuda.is_available() else None
    with device_guard(torch.zeros(1)):
        if current is not None:
            assert torch.cuda.current_device() == current


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_guard_selects_the_inputs_gpu():
    pytest.importorskip("triton")
    from fastkd.triton._common import device_guard

    with torch.cuda.device(0), device_guard(torch.zeros(1, device="cuda:1")):
        assert torch.cuda.current_device() == 1
