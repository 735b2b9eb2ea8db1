"""What only a GPU can show (issue 12): run by ``FASTKD_BUILD_CUDA=1 make test-gpu`` on a CUDA
machine (TRITON_INTERPRET=0), skipped elsewhere.

* torch's new TF32 API (``fp32_precision = "tf32"``) set: the fp32 kernels still run, in IEEE
  float32 (they no longer read ``allow_tf32``, which raises once the new API is used).
* A training step captured in a CUDA graph and replayed (no host sync, no host-to-device copy
  inside the losses).
* Inputs on a second device while the current device is the first (when two exist).
* Strided inputs whose column offsets pass 2^31 elements, and an SRD batch with B * D > 2^31
  (where memory allows).
"""

from __future__ import annotations

import os

import pytest
import torch

import fastkd
from fastkd import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        reason="Triton must run compiled (TRITON_INTERPRET=0)",
    ),
]

BACKENDS = ["cuda", "triton"]
LOSSES = ["fkd", "rkd", "srd"]


def _backend_or_skip(backend: str, op: str) -> None:
    info = fastkd.available_backends().get(backend, {})
    if not info.get("available") or op not in info.get("ops", ()):
        pytest.skip(f"{backend} backend has no {op} here: {info.get('detail')}")


def _loss(op: str, student, teacher, backend: str):
    if op == "fkd":
        return fastkd.fkd_loss(student, teacher, 1.0, 0.5, backend=backend)
    if op == "rkd":
        return fastkd.rkd_distance_loss(student, teacher, backend=backend)
    return fastkd.srd_loss(student, teacher, 4.0, training=True, backend=backend)


def _reference(op: str, student, teacher):
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double()
    if op == "fkd":
        loss = reference.fkd_loss(s, [t], 1.0, 0.5)
    elif op == "rkd":
        loss = reference.rkd_distance_loss(s, t)
    else:
        loss = reference.srd_loss(s, t, 4.0, reference.SRD_EPS, True)
    loss.backward()
    return loss.detach(), s.grad


def _inputs(op: str, batch=96, width=40, dtype=torch.float32, device="cuda", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    student = torch.randn(batch, width, generator=g, dtype=torch.float64)
    teacher = torch.randn(batch, width if op == "srd" else width + 7, generator=g)
    return student.to(device, dtype), teacher.to(device, dtype)


@pytest.mark.parametrize("op", ["fkd", "rkd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_under_the_new_tf32_api(backend, op):
    """Finding 3: ``allow_tf32`` raises in torch 2.14 once ``fp32_precision`` was set; the
    kernels no longer read it and stay IEEE float32 whatever the global flags say."""
    _backend_or_skip(backend, op)
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        student, teacher = _inputs(op)
        student.requires_grad_()
        loss = _loss(op, student, teacher, backend)
        loss.backward()
    finally:
        matmul.fp32_precision = old
    ref_loss, ref_grad = _reference(op, student, teacher)
    # IEEE float32 accuracy: TF32 (10-bit mantissa) would be ~1e-3 off
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(student.grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("op", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_in_a_cuda_graph(backend, op):
    """Finding 4: a training step (loss, backward, SGD update) is captured once and replayed;
    the replay matches eager steps. Any host sync or host-to-device copy inside the loss
    makes the capture fail."""
    _backend_or_skip(backend, op)
    student0, teacher = _inputs(op, seed=1)
    weight = torch.nn.Parameter(torch.eye(student0.shape[1], device="cuda"))
    opt = torch.optim.SGD([weight], lr=0.1)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = _loss(op, student0 @ weight, teacher, backend)
        loss.backward()
        opt.step()
        return loss

    eager_weight = weight.detach().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile kernels, allocate gradients
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        weight.copy_(eager_weight)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    with torch.no_grad():
        weight.copy_(eager_weight)  # capture does not run the step
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append(static_loss.item())
    replay_weight = weight.detach().clone()

    with torch.no_grad():
        weight.copy_(eager_weight)
    eager = [step().item() for _ in range(3)]
    torch.testing.assert_close(torch.tensor(replayed), torch.tensor(eager), rtol=1e-5, atol=0)
    torch.testing.assert_close(replay_weight, weight.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("op", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_on_the_second_device(backend, op):
    """Finding 5: tensors on cuda:1 while cuda:0 is current must launch on cuda:1."""
    _backend_or_skip(backend, op)
    student, teacher = _inputs(op, device="cuda:1", seed=2)
    student.requires_grad_()
    with torch.cuda.device(0):
        loss = _loss(op, student, teacher, backend)
        loss.backward()
    assert loss.device == student.grad.device == torch.device("cuda:1")
    ref_loss, ref_grad = _reference(op, student, teacher)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(student.grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * scale)


def _free_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.parametrize("op", ["fkd", "rkd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_column_offsets_past_int32(backend, op):
    """Finding 6: a float16 view whose columns are 2^30 elements apart (column 2 at element
    2^31): int32 ``cols * stride_c`` would wrap. 4 GiB of device memory, 9 elements used."""
    _backend_or_skip(backend, op)
    if _free_bytes() < 6 * 2**30:
        pytest.skip("needs 6 GiB of free device memory")
    big = torch.zeros(2**31 + 16, dtype=torch.float16, device="cuda")
    student = big.as_strided((3, 3), (1, 2**30))
    g = torch.Generator().manual_seed(3)
    values = torch.randn(3, 3, generator=g).to("cuda", torch.float16)
    student.copy_(values)
    teacher = torch.randn(3, 4, generator=g).to("cuda", torch.float16)
    student.requires_grad_()
    loss = _loss(op, student, teacher, backend)
    loss.backward()
    ref_loss, ref_grad = _reference(op, values, teacher)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    grad = student.grad.double()
    torch.testing.assert_close(grad, ref_grad, rtol=4e-3, atol=4e-3 * ref_grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_srd_batch_past_int32_elements(backend):
    """SRD on (B, D) = (2^16 + 3, 2^15) float16: B * D > 2^31 elements per input (4 GiB
    each). SRD is columnwise up to the global sum S = exp(loss): the gradient of the last
    columns (past element 2^31) equals that of a run on those columns alone times
    S_cols / S = exp(loss_cols - loss)."""
    _backend_or_skip(backend, "srd")
    batch, width = 2**16 + 3, 2**15
    if _free_bytes() < 20 * 2**30:
        pytest.skip("needs 20 GiB of free device memory")
    g = torch.Generator(device="cuda").manual_seed(4)
    student = torch.randn(batch, width, generator=g, device="cuda", dtype=torch.float16)
    teacher = torch.randn(batch, width, generator=g, device="cuda", dtype=torch.float16)
    student.requires_grad_()
    loss = fastkd.srd_loss(student, teacher, 2.0, training=True, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    cols = slice(width - 3, width)
    part_s = student.detach()[:, cols].float().contiguous().requires_grad_()
    part_t = teacher[:, cols].float().contiguous()
    part = fastkd.srd_loss(part_s, part_t, 2.0, training=True, backend=backend)
    part.backward()
    want = part_s.grad.double() * torch.exp(part.double() - loss.double())
    got = student.grad[:, cols].double()
    torch.testing.assert_close(got, want, rtol=5e-3, atol=5e-3 * want.abs().max().item())
