"""RKD distance (SPEC §2, RepDistiller convention) in Triton: tiled, O(B*D) memory.

Custom ops (``torch.compile(fullgraph=True)`` traces them through their fake kernels)::

    fastkd_triton::rkd_forward(student, teacher, precision="ieee") -> loss        # 0-dim
    fastkd_triton::rkd_backward(grad, student, teacher, teacher_grad, precision="ieee")
        -> (grad_student, grad_teacher)
    fastkd_triton::rkd_forward_backward(student, teacher, teacher_grad, precision="ieee")
        -> (loss, grad_student, grad_teacher)

``precision`` ("ieee" | "tf32x3" | "tf32", SPEC §6) is the ``input_precision`` of the float32
``tl.dot`` calls (:func:`fastkd.triton._common.dot_precision`); 16-bit and float64 ignore it.

student (B, Ds), teacher (B, Dt), B >= 2; float16/bfloat16/float32/float64, any strides (read
in place; a float64 call copies the other input to float64). The loss is float32, float64 if an
input is float64; gradients come back in each input's dtype, ``grad_teacher`` is empty (0,)
unless ``teacher_grad``. Registered as the ``triton`` backend of the ``rkd`` op; schemas equal
the compiled ``fastkd::rkd_*`` ones (:data:`fastkd.ops.rkd.SCHEMAS`), fakes and autograd come
from :mod:`fastkd.ops.rkd`.

Algorithm (the same three sweeps as the CPU kernel, ``csrc/cpu/rkd.cpp``), with
d_ij = sqrt(max(|f_i|^2 + |f_j|^2 - 2 f_i.f_j, 1e-12)) for i != j formed tile by tile from
``tl.dot`` of the raw features and the squared row norms:

1. Program (I, J >= I) sums d_S and d_T over the strictly upper entries of its tile: the means.
2. Program (I, J >= I) sums smooth_l1(x), h d_S and h d_T, x = d_S/mu_S - d_T/mu_T,
   h = smooth_l1'(x): the loss and c_X = sum_kl h_kl d_kl / (mu_X B (B - 1)).
3. Program (I, c) owns rows I and output columns c of one gradient and loops over all column
   blocks J: w_ij = dL/dd_ij * dd_ij/dq_ij, acc = sum_J W_IJ Y_J[:, c], r = sum_j w_ij, then
   grad y_i[c] = 4 g (r_i y_i[c] - acc_i[c]). All rows of the tile row are visited, so no two
   programs write the same output (no atomics).

Sweeps 1 and 2 write one partial per tile, reduced by ``torch.sum`` in a fixed order, and the
scalars between sweeps stay on the device (no host sync): results are deterministic. Block
sizes are FKD's heuristic (:func:`fastkd.triton._common.block_config`); as there, a gradient wider
than BLOCK_DO is split over several programs per row block that each recompute the distance
tiles. Precision as FKD's: float32 accumulation (float64 for float64 inputs), IEEE float32
dots whatever torch's TF32 flags say, and for 16-bit inputs the W tile is rounded to the input
dtype for the tensor cores in sweep 3 (float16: each row of W scaled into range first, as 1/d_ij
exceeds float16's range for near-duplicate or small-scale rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastkd.ops import rkd as rkd_ops
from fastkd.reference import loss_dtype
from fastkd.triton._common import (
    BACKEND,
    NAMESPACE,
    TL_DTYPES,
    _dot_tile,
    _mma,
    block_config,
    check_grad,
    check_triton_inputs,
    custom_op,
    device_guard,
    dot_precision,
    pow2,
    row_norms,
)
from fastkd.validation import check_pair

# RepDistiller's pdist clamp (csrc/include/fastkd/rkd_math.h). A tl.constexpr: @triton.jit code
# may read no other kind of global (the interpreter allows it, the compiler does not). Kernels
# compare against tl.full((), EPS, ACC): a bare Python float in a comparison is typed float32.
SQUARED_DISTANCE_EPS = tl.constexpr(1e-12)

# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _distance_tile(
    x_ptr,
    stride_r,
    stride_c,
    D,
    sq_ptr,
    rows_i,
    rows_j,
    mask_i,
    mask_j,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(q, d) on tile (rows_i, rows_j): q = |x_i|^2 + |x_j|^2 - 2 x_i.x_j, d = sqrt(max(q, eps))
    (a NaN q stays NaN). Padding entries are garbage: the caller masks them."""
    dot = _dot_tile(
        x_ptr, stride_r, stride_c, D, rows_i, rows_j, mask_i, mask_j,
        BLOCK_M, BLOCK_N, BLOCK_K, ACC, PRECISION,
    )  # fmt: skip
    sq_i = tl.load(sq_ptr + rows_i, mask=mask_i, other=0.0)
    sq_j = tl.load(sq_ptr + rows_j, mask=mask_j, other=0.0)
    q = sq_i[:, None] + sq_j[None, :] - 2.0 * dot
    eps = tl.full((), SQUARED_DISTANCE_EPS, ACC)
    d = tl.sqrt(tl.where(q < eps, eps, q))
    return q, d


@triton.jit
def _both_sides(
    s_ptr,
    s_stride_r,
    s_stride_c,
    s_width,
    t_ptr,
    t_stride_r,
    t_stride_c,
    t_width,
    sq_ptr,
    B,
    rows_i,
    rows_j,
    mask_i,
    mask_j,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Student and teacher (q, d) tiles; ``sq_ptr`` holds 2 rows of B squared norms."""
    qs, ds = _distance_tile(
        s_ptr, s_stride_r, s_stride_c, s_width, sq_ptr, rows_i, rows_j, mask_i, mask_j,
        BLOCK_M, BLOCK_N, BLOCK_K, ACC, PRECISION,
    )  # fmt: skip
    qt, dt = _distance_tile(
        t_ptr, t_stride_r, t_stride_c, t_width, sq_ptr + B, rows_i, rows_j, mask_i, mask_j,
        BLOCK_M, BLOCK_N, BLOCK_K, ACC, PRECISION,
    )  # fmt: skip
    return qs, ds, qt, dt


@triton.jit
def _smooth_l1_grad(x):
    return tl.where(x <= -1.0, -1.0, tl.where(x >= 1.0, 1.0, x))


@triton.jit
def _rkd_sums_kernel(
    s_ptr,
    s_stride_r,
    s_stride_c,
    s_width,
    t_ptr,
    t_stride_r,
    t_stride_c,
    t_width,
    sq_ptr,
    B,
    scal_ptr,
    out_ptr,
    LOSS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (I, J): sums over the tile's entries with j > i, written to out[k, I * nb + J]
    (k = 0, 1, 2; nothing for J < I). Without LOSS: d_S, d_T. With LOSS: smooth_l1(x),
    h d_S, h d_T, using 1/mu_S, 1/mu_T from scal_ptr[0:2]."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_j >= pid_i:
        rows_i = pid_i * BLOCK + tl.arange(0, BLOCK)
        rows_j = pid_j * BLOCK + tl.arange(0, BLOCK)
        mask_i = rows_i < B
        mask_j = rows_j < B
        upper = mask_i[:, None] & mask_j[None, :] & (rows_j[None, :] > rows_i[:, None])
        qs, ds, qt, dt = _both_sides(
            s_ptr, s_stride_r, s_stride_c, s_width, t_ptr, t_stride_r, t_stride_c, t_width,
            sq_ptr, B, rows_i, rows_j, mask_i, mask_j, BLOCK, BLOCK, BLOCK_K, ACC, PRECISION,
        )  # fmt: skip
        tiles = tl.num_programs(0) * tl.num_programs(1)
        slot = pid_i * tl.num_programs(1) + pid_j
        if LOSS:
            x = ds * tl.load(scal_ptr).to(ACC) - dt * tl.load(scal_ptr + 1).to(ACC)
            h = _smooth_l1_grad(x)
            ax = tl.abs(x)
            ell = tl.where(ax < 1.0, 0.5 * x * x, ax - 0.5)
            tl.store(out_ptr + slot, tl.sum(tl.where(upper, ell, 0.0)))
            tl.store(out_ptr + tiles + slot, tl.sum(tl.where(upper, h * ds, 0.0)))
            tl.store(out_ptr + 2 * tiles + slot, tl.sum(tl.where(upper, h * dt, 0.0)))
        else:
            tl.store(out_ptr + slot, tl.sum(tl.where(upper, ds, 0.0)))
            tl.store(out_ptr + tiles + slot, tl.sum(tl.where(upper, dt, 0.0)))


@triton.jit
def _rkd_grad_kernel(
    s_ptr,
    s_stride_r,
    s_stride_c,
    s_width,
    t_ptr,
    t_stride_r,
    t_stride_c,
    t_width,
    sq_ptr,
    B,
    scal_ptr,
    y_ptr,
    y_stride_r,
    y_stride_c,
    y_width,
    out_ptr,
    out_stride_r,
    out_stride_c,
    TEACHER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (I, c): rows I, columns c of the gradient of y (the student, or the teacher if
    TEACHER). scal_ptr: [1/mu_S, 1/mu_T, c_S, c_T, grad * 4 / B^2]."""
    pid_i = tl.program_id(0)
    rows_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_i = rows_i < B
    cols = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    cmask = (cols < y_width)[None, :]
    y_col_off = cols.to(tl.int64)[None, :] * y_stride_c  # int64: cols * stride_c may pass 2^31
    eps = tl.full((), SQUARED_DISTANCE_EPS, ACC)
    inv_mu_s = tl.load(scal_ptr).to(ACC)
    inv_mu_t = tl.load(scal_ptr + 1).to(ACC)
    if TEACHER:
        c_y = tl.load(scal_ptr + 3).to(ACC)
        coef = -inv_mu_t
    else:
        c_y = tl.load(scal_ptr + 2).to(ACC)
        coef = inv_mu_s
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC)
    row_sum = tl.zeros((BLOCK_M,), ACC)
    for j0 in range(0, B, BLOCK_N):
        rows_j = j0 + tl.arange(0, BLOCK_N)
        mask_j = rows_j < B
        off = mask_i[:, None] & mask_j[None, :] & (rows_j[None, :] != rows_i[:, None])
        qs, ds, qt, dt = _both_sides(
            s_ptr, s_stride_r, s_stride_c, s_width, t_ptr, t_stride_r, t_stride_c, t_width,
            sq_ptr, B, rows_i, rows_j, mask_i, mask_j, BLOCK_M, BLOCK_N, BLOCK_K, ACC, PRECISION,
        )  # fmt: skip
        h = _smooth_l1_grad(ds * inv_mu_s - dt * inv_mu_t)
        if TEACHER:
            q, d = qt, dt
        else:
            q, d = qs, ds
        # B^2 dL/dd_ij times dd_ij/dq_ij = 1/(2 d_ij); scal[4] = grad * 4 / B^2 scales it all
        w = tl.where(off & (q >= eps), (h - c_y) * coef * 0.5 / d, 0.0)
        row_sum += tl.sum(w, axis=1)
        y_j = tl.load(
            y_ptr + rows_j.to(tl.int64)[:, None] * y_stride_r + y_col_off,
            mask=mask_j[:, None] & cmask,
            other=0.0,
        )
        if y_j.dtype == tl.float16:
            # 1/d reaches 1e6 for near-duplicate or small rows, past float16's 65504: scale each
            # row of W into range for the tensor cores and back (the row scale commutes with
            # the product, so only float16's relative rounding remains).
            w_max = tl.max(tl.abs(w), axis=1)
            row_scale = tl.where(w_max > 0.0, w_max, 1.0)
            part = tl.dot((w / row_scale[:, None]).to(tl.float16), y_j)
            acc += part * row_scale[:, None]
        else:
            acc = _mma(w.to(y_j.dtype), y_j, acc, PRECISION)
    scale = tl.load(scal_ptr + 4).to(ACC)
    mask = mask_i[:, None] & cmask
    row_off = rows_i.to(tl.int64)[:, None]
    y_i = tl.load(y_ptr + row_off * y_stride_r + y_col_off, mask=mask, other=0.0)
    out = scale * (row_sum[:, None] * y_i.to(ACC) - acc)
    out_ptrs = out_ptr + row_off * out_stride_r + cols[None, :] * out_stride_c
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


class _Problem:
    """Inputs in compute form, squared row norms, launch settings and the sweep scalars."""

    def __init__(self, student: Tensor, teacher: Tensor, precision: str):
        check_pair(student, teacher, flatten=False)
        interpret = check_triton_inputs({"student": student, "teacher": teacher})
        self.grad_dtypes = (student.dtype, teacher.dtype)
        self.out_dtype = self.acc = loss_dtype(student, teacher)
        if self.acc == torch.float64:  # fp64 dots need fp64 on both operands
            student, teacher = student.to(torch.float64), teacher.to(torch.float64)
        self.student, self.teacher = student, teacher
        self.batch = b = student.shape[0]
        self.interpret = interpret
        dtype = max((student, teacher), key=lambda t: t.element_size()).dtype
        # The op argument, never torch's global TF32 flag (SPEC §6).
        self.precision = dot_precision(precision, self.acc)
        widths = [student.shape[1], teacher.shape[1]]
        self.cfg = block_config(b, widths, dtype, interpret, op="rkd", precision=self.precision)
        self.sq = torch.empty((2, b), dtype=self.acc, device=student.device)
        scratch = torch.empty(b, dtype=self.acc, device=student.device)
        for row, x in enumerate((student, teacher)):
            row_norms(x, self.acc, interpret, inv=scratch, sumsq=self.sq[row])

    def _args(self) -> tuple:
        s, t = self.student, self.teacher
        return (
            s, s.stride(0), s.stride(1), s.shape[1], t, t.stride(0), t.stride(1), t.shape[1],
            self.sq, self.batch,
        )  # fmt: skip

    def _sums(self, scal: Tensor, loss: bool) -> Tensor:
        """(3,) sums over the strictly upper entries (see _rkd_sums_kernel)."""
        nb = triton.cdiv(self.batch, self.cfg["BLOCK"])
        out = torch.zeros((3, nb * nb), dtype=self.acc, device=self.sq.device)
        _rkd_sums_kernel[(nb, nb)](
            *self._args(), scal, out, LOSS=loss, BLOCK=self.cfg["BLOCK"],
            BLOCK_K=self.cfg["BLOCK_K"], ACC=TL_DTYPES[self.acc], PRECISION=self.precision,
            num_warps=self.cfg["num_warps"],
        )  # fmt: skip
        return out.sum(1)

    def loss_and_scalars(self) -> tuple[Tensor, Tensor]:
        """The 0-dim loss and scal = [1/mu_S, 1/mu_T, c_S, c_T] (device tensors, no sync)."""
        b = self.batch
        pairs = float(b) * (b - 1)  # ordered off-diagonal pairs; the sums cover half of them
        inv_mu = pairs / (2.0 * self._sums(self.sq, loss=False)[:2])  # scal unread here
        sums = self._sums(inv_mu, loss=True)
        c = 2.0 * sums[1:] * inv_mu / pairs
        loss = 2.0 * sums[0] / (float(b) * b)
        return loss.to(self.out_dtype), torch.cat([inv_mu, c])

    def gradient(self, teacher: bool, scal: Tensor, grad: Tensor, dtype: torch.dtype) -> Tensor:
        """Gradient of the teacher (or the student) times ``grad`` (0-dim), in ``dtype``."""
        b, cfg = self.batch, self.cfg
        scal = torch.cat([scal, (grad.to(self.acc) * (4.0 / (float(b) * b))).reshape(1)])
        y = self.teacher if teacher else self.student
        out = torch.empty(y.shape, dtype=dtype, device=y.device)
        block_do = min(cfg["BLOCK_DO"], max(16, pow2(y.shape[1])))
        grid = (triton.cdiv(b, cfg["BLOCK"]), triton.cdiv(y.shape[1], block_do))
        _rkd_grad_kernel[grid](
            *self._args(), scal, y, y.stride(0), y.stride(1), y.shape[1],
            out, out.stride(0), out.stride(1), TEACHER=teacher, BLOCK_M=cfg["BLOCK"],
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_DO=block_do,
            ACC=TL_DTYPES[self.acc], PRECISION=self.precision, num_warps=cfg["num_warps"],
        )  # fmt: skip
        return out

    def gradients(self, scal: Tensor, grad: Tensor, teacher_grad: bool) -> tuple[Tensor, Tensor]:
        """(grad_student, grad_teacher or an empty (0,) tensor) in the inputs' dtypes."""
        s_dtype, t_dtype = self.grad_dtypes
        grad_s = self.gradient(False, scal, grad, s_dtype)
        if not teacher_grad:
            return grad_s, self.teacher.new_empty((0,), dtype=t_dtype)
        return grad_s, self.gradient(True, scal, grad, t_dtype)


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


@custom_op("rkd_forward", rkd_ops.SCHEMAS)
def rkd_forward(student: Tensor, teacher: Tensor, precision: str = "ieee") -> Tensor:
    """RKD distance loss (SPEC §2) by the Triton kernels (sweeps 1 and 2); see the module
    docstring. student (B, Ds), teacher (B, Dt); ``precision``: the float32 dots (SPEC §6).
    Returns the 0-dim loss, float32 (float64 if an input is float64)."""
    with device_guard(student):
        return _Problem(student, teacher, precision).loss_and_scalars()[0]


@custom_op("rkd_backward", rkd_ops.SCHEMAS)
def rkd_backward(
    grad: Tensor, student: Tensor, teacher: Tensor, teacher_grad: bool, precision: str = "ieee"
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`rkd_forward` times ``grad`` (one-element tensor, read on the device):
    (grad_student like student, grad_teacher like teacher, or (0,) unless ``teacher_grad``)."""
    check_grad(grad, student)
    with device_guard(student):
        problem = _Problem(student, teacher, precision)
        _, scal = problem.loss_and_scalars()
        return problem.gradients(scal, grad.reshape(()), teacher_grad)


@custom_op("rkd_forward_backward", rkd_ops.SCHEMAS)
def rkd_forward_backward(
    student: Tensor, teacher: Tensor, teacher_grad: bool, precision: str = "ieee"
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss and its gradients for a unit upstream gradient, from one run of the three sweeps:
    (loss, grad_student, grad_teacher), as :func:`rkd_forward` and :func:`rkd_backward`."""
    with device_guard(student):
        problem = _Problem(student, teacher, precision)
        loss, scal = problem.loss_and_scalars()
        one = torch.ones((), dtype=problem.acc, device=student.device)
        return loss, *problem.gradients(scal, one, teacher_grad)


rkd_ops.register(NAMESPACE, (BACKEND,))
