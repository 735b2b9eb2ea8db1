"""fastkd.integrations.torchdistill: registration, parity with the plain fastkd losses and with
torchdistill 1.1.x's own losses (float64, 1e-10), and the example configs training inside
torchdistill's DistillationBox on FakeData (CPU)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchdistill")
pytest.importorskip("torchvision")

from torchdistill.losses import mid_level as tdm  # noqa: E402
from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT  # noqa: E402
from torchdistill.models.registry import AUXILIARY_MODEL_WRAPPER_DICT  # noqa: E402

import fastkd  # noqa: E402
from fastkd import reference  # noqa: E402
from fastkd.integrations import torchdistill as ft  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "examples" / "torchdistill"
TOL = 1e-10
KEYS = ("fastkd.FKDLoss", "fastkd.SPKDLoss", "fastkd.RKDLoss", "fastkd.SRDLoss")
FUSED = [b for b in ("cpu",) if b in fastkd.available_backends()] + ["reference"]


def assert_close(actual, expected, scale=None):
    """|actual - expected| <= TOL * scale, scale from the expected values (not from roundoff)."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    if scale is None:
        scale = max(1.0, float(expected.abs().max()))
    err = float((actual - expected).abs().max())
    assert err <= TOL * scale, f"error {err:.3e} > {TOL:.0e} * {scale:.3e}"


def grad_scale(g):
    """Scale of a gradient: its largest entry, floored (B = 2 RKD angles: exactly zero)."""
    return max(float(g.abs().max()), 1e-6)


def io(**entries):
    """An io_dict as torchdistill's hooks fill it: {path: {'output': tensor}}."""
    return {path: {"output": value} for path, value in entries.items()}


def features(*shape, grad=True, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(*shape, dtype=torch.float64, generator=gen)
    return x.requires_grad_(grad)


# ----------------------------------------------------------------------------- import, registry


def test_import_without_torchdistill_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "fastkd.integrations.torchdistill")
    monkeypatch.setitem(sys.modules, "torchdistill.losses.registry", None)
    with pytest.raises(ImportError, match=r"pip install fastkd\[torchdistill\]"):
        importlib.import_module("fastkd.integrations.torchdistill")


def test_registered_under_namespaced_keys_without_touching_torchdistills():
    assert MIDDLE_LEVEL_LOSS_DICT["fastkd.FKDLoss"] is ft.FKDLoss
    assert MIDDLE_LEVEL_LOSS_DICT["fastkd.SPKDLoss"] is ft.SPKDLoss
    assert MIDDLE_LEVEL_LOSS_DICT["fastkd.RKDLoss"] is ft.RKDLoss
    assert MIDDLE_LEVEL_LOSS_DICT["fastkd.SRDLoss"] is ft.SRDLoss
    assert AUXILIARY_MODEL_WRAPPER_DICT["fastkd.SRDModelWrapper"] is ft.SRDModelWrapper
    for key in ("SPKDLoss", "RKDLoss", "SRDLoss"):
        assert MIDDLE_LEVEL_LOSS_DICT[key] is getattr(tdm, key)


def test_reimport_is_idempotent():
    before = dict(MIDDLE_LEVEL_LOSS_DICT)
    importlib.import_module("fastkd.integrations.torchdistill")
    assert MIDDLE_LEVEL_LOSS_DICT == before
    module = importlib.reload(ft)  # new class objects replace this module's own entries only
    assert set(MIDDLE_LEVEL_LOSS_DICT) == set(before)
    for key in KEYS:
        assert MIDDLE_LEVEL_LOSS_DICT[key] is getattr(module, key.split(".")[1])
    for key in set(before) - set(KEYS):
        assert MIDDLE_LEVEL_LOSS_DICT[key] is before[key]


def test_foreign_class_under_a_fastkd_key_is_not_replaced(monkeypatch):
    class Foreign(nn.Module):
        pass

    monkeypatch.setitem(MIDDLE_LEVEL_LOSS_DICT, "fastkd.FKDLoss", Foreign)
    with pytest.raises(RuntimeError, match="already registered"):
        ft._register(MIDDLE_LEVEL_LOSS_DICT, lambda *a, **k: None, ft.MID_LEVEL_LOSSES)
    assert MIDDLE_LEVEL_LOSS_DICT["fastkd.FKDLoss"] is Foreign


def test_built_from_config_dict_by_key():
    from torchdistill.losses.registry import get_mid_level_loss

    loss = get_mid_level_loss(
        {
            "key": "fastkd.SPKDLoss",
            "kwargs": {"student_output_path": "a", "teacher_output_path": "b", "reduction": "sum"},
        }
    )
    assert isinstance(loss, ft.SPKDLoss) and loss.reduction == "sum"


# ----------------------------------------------------------------------------- FKD


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("batch", [3, 17])
def test_fkd_matches_fastkd_and_reference(backend, batch):
    s = features(batch, 5, 3, 3)  # flattened to (B, 45), as torchdistill flattens
    t = features(batch, 31, grad=False)
    loss_mod = ft.FKDLoss("s", "t", kd_weight=0.7, fr_weight=0.3, backend=backend)
    got = loss_mod(io(s=s), io(t=t))
    (g_got,) = torch.autograd.grad(got, s)
    plain = fastkd.fkd_loss(s.flatten(1), t, 0.7, 0.3, backend=backend)
    (g_plain,) = torch.autograd.grad(plain, s)
    oracle = reference.fkd_loss(s.flatten(1), t, 0.7, 0.3)
    (g_oracle,) = torch.autograd.grad(oracle, s)
    assert got.dtype == torch.float64
    assert_close(got, plain)
    assert_close(got, oracle)
    assert_close(g_got, g_plain, grad_scale(g_oracle))
    assert_close(g_got, g_oracle, grad_scale(g_oracle))


def test_fkd_teacher_path_list_is_an_ensemble():
    s = features(9, 7)
    t1, t2 = features(9, 4, grad=False), features(9, 13, grad=False)
    loss_mod = ft.FKDLoss("s", ["t1", "t2"], student_module_io="input", teacher_module_io="input")
    student_io = {"s": {"input": s}}
    teacher_io = {"t1": {"input": t1}, "t2": {"input": t2}}
    got = loss_mod(student_io, teacher_io)
    assert_close(got, reference.fkd_loss(s, [t1, t2]))
    single = ft.FKDLoss("s", "t1", student_module_io="input", teacher_module_io="input")
    assert (
        abs(float(single(student_io, teacher_io).detach()) - float(got.detach())) > 1e-3
    )  # the list is used


# ----------------------------------------------------------------------------- SP


def test_sp_default_is_the_paper_and_compat_is_torchdistill():
    # The example: (8, 16) inputs, torchdistill ~0.0196 where the paper's rows give ~0.07.
    s, t = features(8, 16, seed=1), features(8, 16, grad=False, seed=2)
    td_value = tdm.SPKDLoss("s", "t", "batchmean")(io(s=s), io(t=t))
    paper = ft.SPKDLoss("s", "t", "batchmean")(io(s=s), io(t=t))
    compat = ft.SPKDLoss("s", "t", "batchmean", row_norm="torchdistill")(io(s=s), io(t=t))
    assert_close(compat, td_value)
    assert_close(paper, reference.sp_loss(s, t))
    paper, td_value = float(paper.detach()), float(td_value.detach())
    assert abs(paper - td_value) > 0.1 * paper  # the conventions differ


@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("shape", [(2, 3), (17, 4, 2, 2), (130, 5)])
def test_sp_compat_matches_torchdistill_values_and_gradients(reduction, shape):
    s = features(*shape)
    t = features(shape[0], 6, grad=False)
    theirs = tdm.SPKDLoss("s", "t", reduction)(io(s=s), io(t=t))
    (g_theirs,) = torch.autograd.grad(theirs, s)
    ours = ft.SPKDLoss("s", "t", reduction, row_norm="torchdistill")(io(s=s), io(t=t))
    (g_ours,) = torch.autograd.grad(ours, s)
    assert_close(ours, theirs)
    assert_close(g_ours, g_theirs, grad_scale(g_theirs))


@pytest.mark.parametrize("algorithm", ["explicit", "dual"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_sp_l2_matches_fastkd_sp_loss(algorithm, reduction):
    s, t = features(40, 3), features(40, 2, grad=False)
    ours = ft.SPKDLoss("s", "t", reduction, algorithm=algorithm)(io(s=s), io(t=t))
    (g_ours,) = torch.autograd.grad(ours, s)
    plain = fastkd.sp_loss(s, t, algorithm=algorithm) * (1 if reduction == "batchmean" else 1600)
    (g_plain,) = torch.autograd.grad(plain, s)
    assert_close(ours, plain)
    assert_close(g_ours, g_plain, grad_scale(g_plain))


# ----------------------------------------------------------------------------- RKD


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(
    "factors", [(1.0, 0.0), (0.0, 2.0), (1.0, 2.0), (0.5, None)], ids=["dist", "angle", "both", "n"]
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(2, 3), (17, 4, 2, 2), (33, 9)])
def test_rkd_matches_torchdistill_values_and_gradients(backend, factors, reduction, shape):
    s = features(*shape)
    t = features(shape[0], 5, grad=False)
    dist_factor, angle_factor = factors
    # torchdistill fails on None (None * 0); fastkd drops the term as for 0.
    theirs_mod = tdm.RKDLoss("s", "t", dist_factor, angle_factor or 0.0, reduction)
    theirs = theirs_mod(io(s=s), io(t=t))
    (g_theirs,) = torch.autograd.grad(theirs, s)
    ours_mod = ft.RKDLoss("s", "t", dist_factor, angle_factor, reduction, backend=backend)
    ours = ours_mod(io(s=s), io(t=t))
    (g_ours,) = torch.autograd.grad(ours, s)
    assert ours.dtype == torch.float64
    assert_close(ours, theirs)
    assert_close(g_ours, g_theirs, grad_scale(g_theirs))


@pytest.mark.parametrize("backend", FUSED)
def test_rkd_distance_term_is_fastkds(backend):
    s, t = features(19, 6), features(19, 3, grad=False)
    ours = ft.RKDLoss("s", "t", 1.0, 0.0, "mean", backend=backend)(io(s=s), io(t=t))
    assert_close(ours, fastkd.rkd_distance_loss(s, t, backend=backend))
    assert_close(ours, reference.rkd_distance_loss(s, t))


@pytest.mark.parametrize("block", [1, 4, None])
def test_rkd_angle_blocks_agree_with_torchdistill(block):
    s, t = features(13, 7), features(13, 11, grad=False)
    theirs = tdm.RKDLoss("s", "t", 0.0, 1.0, "mean").compute_rkd_angle_loss(t, s)
    (g_theirs,) = torch.autograd.grad(theirs, s)
    ours = ft.rkd_angle_loss(s, t, block=block)
    (g_ours,) = torch.autograd.grad(ours, s)
    assert_close(ours, theirs)
    assert_close(g_ours, g_theirs, grad_scale(g_theirs))


def test_rkd_angle_with_far_off_centre_features_float32():
    # Features far from the origin: the Gram form would cancel without centring.
    s = (torch.randn(24, 16) * 0.1 + 50.0).requires_grad_(True)
    t = torch.randn(24, 8) * 0.1 + 50.0
    theirs = tdm.RKDLoss("s", "t", 0.0, 1.0, "mean").compute_rkd_angle_loss(t.double(), s.double())
    ours = ft.rkd_angle_loss(s, t)
    assert ours.dtype == torch.float32
    assert abs(float(ours) - float(theirs)) <= 1e-4 * float(theirs)


def test_rkd_teacher_gets_no_gradient_as_in_torchdistill():
    s, t = features(6, 4), features(6, 4)
    ft.RKDLoss("s", "t", 1.0, 2.0, "mean")(io(s=s), io(t=t)).backward()
    assert t.grad is None and s.grad is not None


# ----------------------------------------------------------------------------- SRD


def torchdistill_srd(zs, zt, s_logits, t_logits, bn_s, bn_t, exponent, temperature):
    """torchdistill's SRDLoss on its norm layers' outputs (SRDModelWrapper's norm_layer)."""
    loss = tdm.SRDLoss(
        "norm_layer", "output", "norm_layer", "output", ".", "output", ".", "output",
        exponent=exponent, temperature=temperature, reduction="batchmean",
    )  # fmt: skip
    student_io = {"norm_layer": {"output": bn_s(zs)}, ".": {"output": s_logits}}
    teacher_io = {"norm_layer": {"output": bn_t(zt)}, ".": {"output": t_logits}}
    return loss(student_io, teacher_io)


def fastkd_srd(**kwargs):
    return ft.SRDLoss(
        "norm_layer", "input", "norm_layer", "input", ".", "output", ".", "output", **kwargs
    )


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("exponent", [4.0, 3.0])
@pytest.mark.parametrize("shape", [(2, 3), (17, 9), (33, 5, 2, 2)])
def test_srd_matches_torchdistill_given_the_same_batch_norm(backend, exponent, shape):
    batch, width = shape[0], shape[1]
    bn_s = nn.BatchNorm1d(width, eps=1e-4, affine=False).double()
    bn_t = nn.BatchNorm1d(width, eps=1e-4, affine=False).double()
    ours_mod = fastkd_srd(exponent=exponent, temperature=2.0, backend=backend)
    for _ in range(3):  # train mode: batch statistics, running ones updated alike
        zs, zt = features(*shape), features(*shape, grad=False)
        s_logits, t_logits = features(batch, 10), features(batch, 10, grad=False)
        pooled_s, pooled_t = ft._pooled(zs), ft._pooled(zt)  # SRDModelWrapper's pooling
        theirs = torchdistill_srd(pooled_s, pooled_t, s_logits, t_logits, bn_s, bn_t, exponent, 2.0)
        g_theirs = torch.autograd.grad(theirs, (zs, s_logits))
        ours = ours_mod({"norm_layer": {"input": zs}, ".": {"output": s_logits}},
                        {"norm_layer": {"input": zt}, ".": {"output": t_logits}})  # fmt: skip
        g_ours = torch.autograd.grad(ours, (zs, s_logits))
        assert_close(ours, theirs)
        for a, b in zip(g_ours, g_theirs, strict=True):
            assert_close(a, b, grad_scale(b))
    srd = ours_mod.srd
    for mine, theirs_buf in (
        (srd.running_mean_s, bn_s.running_mean),
        (srd.running_var_s, bn_s.running_var),
        (srd.running_mean_t, bn_t.running_mean),
        (srd.running_var_t, bn_t.running_var),
    ):
        assert_close(mine, theirs_buf)
    ours_mod.eval(), bn_s.eval(), bn_t.eval()  # eval: the same running statistics
    zs, zt = features(*shape, grad=False), features(*shape, grad=False)
    s_logits, t_logits = features(batch, 10), features(batch, 10, grad=False)
    theirs = torchdistill_srd(
        ft._pooled(zs), ft._pooled(zt), s_logits, t_logits, bn_s, bn_t, exponent, 2.0
    )
    ours = ours_mod({"norm_layer": {"input": zs}, ".": {"output": s_logits}},
                    {"norm_layer": {"input": zt}, ".": {"output": t_logits}})  # fmt: skip
    assert_close(ours, theirs)


@pytest.mark.parametrize("backend", FUSED)
def test_srd_logsum_part_is_fastkds_srd_loss(backend):
    zs, zt = features(11, 6), features(11, 6, grad=False)
    ours_mod = ft.SRDLoss(
        "z", "output", "z", "output", None, "output", None, "output",
        exponent=4.0, feat_factor=1.0, num_features=6, backend=backend,
    )  # fmt: skip
    ours = ours_mod(io(z=zs), io(z=zt))
    (g_ours,) = torch.autograd.grad(ours, zs)
    plain = fastkd.srd_loss(zs, zt, 4.0, backend=backend)
    (g_plain,) = torch.autograd.grad(plain, zs)
    oracle = reference.srd_loss(zs, zt, 4.0)
    assert_close(ours, plain)
    assert_close(ours, oracle)
    assert_close(g_ours, g_plain, grad_scale(g_plain))


def test_srd_default_factor_is_torchdistills_two():
    zs, zt = features(7, 5), features(7, 5, grad=False)
    kwargs = {"exponent": 4.0, "num_features": 5}
    ours = ft.SRDLoss("z", "output", "z", "output", None, "o", None, "o", **kwargs)
    assert_close(ours(io(z=zs), io(z=zt)), 2.0 * reference.srd_loss(zs, zt, 4.0))


def test_srd_lazy_statistics_match_eager_ones():
    zs, zt = features(9, 4), features(9, 4, grad=False)
    lazy = ft.SRDLoss("z", "output", "z", "output", None, "o", None, "o", exponent=4.0)
    eager = ft.SRDLoss(
        "z", "output", "z", "output", None, "o", None, "o", exponent=4.0, num_features=4
    )
    assert lazy.srd is None and eager.srd is not None
    assert_close(lazy(io(z=zs), io(z=zt)), eager(io(z=zs), io(z=zt)))
    assert lazy.srd.running_mean_s.dtype == torch.float64  # built like the features
    assert eager.srd.running_var_s.dtype == torch.float32
    torch.testing.assert_close(lazy.srd.running_var_s.float(), eager.srd.running_var_s)


def test_srd_model_wrapper_pools_like_torchdistills_and_has_no_norm_layer():
    from torchdistill.models.wrapper import SRDModelWrapper as TDWrapper

    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    common = {"input_module": {"path": "x", "io": "output"}, "device": torch.device("cpu")}
    common.update(device_ids=None, distributed=False)
    ours = ft.SRDModelWrapper(teacher_model=model, **common)
    theirs = TDWrapper(teacher_model=model, norm_kwargs={"num_features": 4}, **common)
    z = torch.randn(5, 4, 3, 2)
    seen = {}
    ours.projector.register_forward_hook(lambda m, i, o: seen.setdefault("ours", o))
    theirs.norm_layer.register_forward_hook(lambda m, i, o: seen.setdefault("theirs", i[0]))
    ours.secondary_forward(io(x=z))
    theirs.secondary_forward(io(x=z))
    assert torch.equal(seen["ours"], seen["theirs"])
    assert not any(isinstance(m, nn.BatchNorm1d) for m in ours.modules())
    with pytest.raises(ValueError, match="no norm layer"):
        ft.SRDModelWrapper(teacher_model=model, norm_kwargs={"num_features": 4}, **common)
    student = ft.SRDModelWrapper(
        student_model=model, linear_kwargs={"in_features": 4, "out_features": 6}, **common
    )
    assert isinstance(student.projector, nn.Linear)


# ----------------------------------------------------------------------------- bad input


def test_missing_hook_names_the_path():
    loss = ft.FKDLoss("layer4", "layer4")
    with pytest.raises(KeyError, match="layer4.*forward_hook"):
        loss(io(fc=torch.randn(4, 3)), io(layer4=torch.randn(4, 3)))
    with pytest.raises(KeyError, match="'input'"):
        ft.FKDLoss("a", "a", student_module_io="input")(io(a=torch.randn(4, 3)), io(a=None))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ft.SPKDLoss("a", "b", "mean"), "reduction"),
        (lambda: ft.SPKDLoss("a", "b", row_norm="l1"), "row_norm"),
        (lambda: ft.RKDLoss("a", "b", 1.0, 2.0, "batchmean"), "reduction"),
        (lambda: ft.FKDLoss("a", "b", algorithm="fast"), "algorithm"),
        (lambda: ft.FKDLoss("a", [], kd_weight=1.0), "empty"),
        (lambda: ft.FKDLoss("a", "b", kd_weight=math.nan), "kd_weight"),
    ],
)
def test_bad_configuration_is_a_clear_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_tensors_are_clear_errors():
    with pytest.raises(ValueError, match="B >= 2"):
        ft.rkd_angle_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="batch size"):
        ft.rkd_angle_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(TypeError, match="floating"):
        ft.sp_loss_l1_rows(torch.ones(4, 3, dtype=torch.long), torch.randn(4, 3))
    with pytest.raises(ValueError, match="block"):
        ft.rkd_angle_loss(torch.randn(4, 3), torch.randn(4, 3), block=0)
    with pytest.raises(ValueError, match="student"):
        ft.FKDLoss("s", "t")(io(s=torch.randn(1, 3)), io(t=torch.randn(1, 3)))


@pytest.mark.parametrize(
    ("cls", "fn", "kwargs"),
    [
        (ft.FKDLoss, fastkd.fkd_loss, {}),
        (ft.SPKDLoss, fastkd.sp_loss, {}),
        (ft.RKDLoss, fastkd.rkd_distance_loss, {"angle_factor": 0.0}),
    ],
)
def test_global_batch_is_passed_only_where_fastkd_accepts_it(cls, fn, kwargs):
    if "global_batch" in inspect.signature(fn).parameters:
        loss = cls("s", "t", global_batch=True, **kwargs)
        assert loss.collective == {"global_batch": True}
    else:
        with pytest.raises(NotImplementedError, match="global_batch"):
            cls("s", "t", global_batch=True, **kwargs)
    assert cls("s", "t", **kwargs).collective == {}


# ----------------------------------------------------------------------------- example configs


def load_example_driver():
    spec = importlib.util.spec_from_file_location("fastkd_td_train", CONFIG_DIR / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# config file -> (criterion sub-term, class in ft, fastkd callable that the term must reach)
CONFIGS = {
    "fkd_resnet18_from_resnet34.yaml": ("fkd", "FKDLoss", "fkd_loss"),
    "spkd_resnet18_from_resnet34.yaml": ("spkd", "SPKDLoss", "sp_loss"),
    "rkd_resnet18_from_resnet34.yaml": ("rkd_da", "RKDLoss", "rkd_distance_loss"),
    "srd_resnet18_from_resnet34.yaml": ("srd_loss", "SRDLoss", "srd_loss"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_example_config_trains_in_a_torchdistill_distillation_box(name, monkeypatch):
    import torchvision
    from torchvision.transforms import ToTensor

    driver = load_example_driver()
    term, class_name, fastkd_fn = CONFIGS[name]
    cls = getattr(ft, class_name)  # looked up now: a reload replaces the classes
    config = driver.load_config(str(CONFIG_DIR / name))  # torchdistill's loader + dependencies
    # Keep CI short: one fixed batch of 8 tiny images instead of the config's FakeData.
    (dataset_id,) = config["datasets"]
    config["datasets"][dataset_id] = torchvision.datasets.FakeData(
        size=8, image_size=(3, 16, 16), num_classes=10, transform=ToTensor()
    )
    train = config["train"]
    train["train_data_loader"]["kwargs"]["batch_size"] = 8
    train["train_data_loader"]["sampler"]["class_or_func"] = torch.utils.data.SequentialSampler
    # A fixed objective: the distillation term alone under plain gradient descent decreases.
    del train["criterion"]["kwargs"]["sub_terms"]["ce"]
    train["optimizer"]["kwargs"].update(lr=0.01, momentum=0.0, weight_decay=0.0)
    calls = []
    target = getattr(fastkd, fastkd_fn)
    if fastkd_fn == "srd_loss":  # fastkd.SRDLoss (the module) runs the SRD kernels
        original = fastkd.SRDLoss.forward
        monkeypatch.setattr(
            fastkd.SRDLoss, "forward", lambda self, *a: calls.append(1) or original(self, *a)
        )
    else:
        monkeypatch.setattr(fastkd, fastkd_fn, lambda *a, **k: calls.append(1) or target(*a, **k))

    torch.manual_seed(0)
    device = torch.device("cpu")
    box, _, _ = driver.build_box(config, device)
    criterion, weight = box.criterion.term_dict[term]
    assert type(criterion) is cls
    values = []
    criterion.register_forward_hook(lambda m, i, out: values.append(float(out.detach())))
    losses = driver.train_steps(box, device, steps=3)
    assert len(values) == 3 and all(math.isfinite(v) for v in losses)
    assert losses == pytest.approx([weight * v for v in values])  # the only term
    assert len(calls) == 3  # the fastkd loss computed every step
    assert values[-1] < values[0], values  # the same batch every step
