"""FKD (SPEC §1) in Triton: tiled kernel-space forward and backward, O(B*D) memory.

Custom ops (``torch.compile(fullgraph=True)`` traces them through their fake kernels)::

    fastkd_triton::fkd_forward(student, teachers, kd_weight, fr_weight) -> loss     # 0-dim
    fastkd_triton::fkd_backward(grad, student, teachers, kd_weight, fr_weight, teachers_grad)
        -> (grad_student, grad_teachers)
    fastkd_triton::fkd_forward_backward(student, teachers, kd_weight, fr_weight, teachers_grad)
        -> (loss, grad_student, grad_teachers)     # one sweep: the training-step path

Each op also takes ``precision="ieee"`` last ("ieee" | "tf32x3" | "tf32", SPEC §6): the
``input_precision`` of the float32 ``tl.dot`` calls (:func:`fastkd.triton._common.dot_precision`).

Schemas equal the compiled ``fastkd::fkd_*`` ones (``csrc/ops.cpp``,
:data:`fastkd.ops.fkd.SCHEMAS`); fakes and autograd come from :mod:`fastkd.ops.fkd`.

student (B, Ds), teachers a list of E tensors (B, Dt_e); float16/bfloat16/float32/float64, any
strides (read in place; only a float64 call copies the other inputs to float64). The loss is
float32, float64 if any input is float64; gradients come back in each input's dtype,
``grad_teachers`` is ``[]`` unless ``teachers_grad``.
Registered as the ``triton`` backend of the ``fkd`` op of :mod:`fastkd.registry`.

Algorithm (names as in SPEC §1, A = normalize(student), That_e = normalize(teacher_e)):

* Row norms: one small kernel per input writes 1 / max(||x_i||, eps) (and, for the student,
  ||x_i||^2 for the feature regulariser).
* Forward: program (I, J), J >= I, forms the tile of rho_S - rho_T for row blocks I and J with
  ``tl.dot`` over BLOCK_K chunks of the *raw* features, scaled afterwards by the inverse norms
  (rho_ij = (x_i . x_j) inv_i inv_j: 16-bit inputs go to the tensor cores unmodified, products
  are exact in the fp32 accumulator). The squared difference is summed, weighted 2 off the
  diagonal and 1 on it; padding rows have inverse norm 0 and so contribute nothing.
* Backward: program (I, c) owns rows I and output columns c (BLOCK_DO wide) of one gradient.
  It loops over all column blocks J, recomputes the difference tile and accumulates
  acc = sum_J diff_IJ A_J[:, c] plus the row dot r_i = sum_j diff_ij K_ij, K the kernel of the
  tensor being differentiated (r_i = G_i . A_i / scale, so the chain rule through normalize()
  needs no other program's columns). Then
  d x_i[c] = scale (acc_i - r_i A_i[c]) inv_i (+ 2 fr_weight x_i[c] / (B Ds) for the student),
  scale = grad * kd_weight * 4 / B^2 (times -1/E for a teacher).
* Forward-backward: the student-gradient kernel above also sums diff^2 per row block (over
  all J, so no symmetry weights), which gives the loss without the forward pass.

Feature-width tiling trade-off: the accumulator is BLOCK_M x BLOCK_DO in registers, so a
gradient wider than BLOCK_DO (128 on GPU, 64 for float64) is split over ceil(D / BLOCK_DO)
programs per row block, each recomputing the difference tiles: backward cost
~ B^2 (ceil(D/BLOCK_DO) (Ds + Dt) + D) instead of B^2 (Ds + Dt + D). For D <= 128 there is
no recomputation; for Ds = Dt = 512 it is ~3x the ideal flops. The alternative (difference
tiles of a panel of rows written to an O(rows * B) workspace, then a GEMM) would trade that
for extra memory traffic; it is not implemented.

Ensembles: teachers are passed to the kernels as a tuple (the kernels are specialised, loops
unrolled, per ensemble size and dtypes; no concatenated copy). At most ``MAX_TEACHER_SLOTS``
(6 for float32, 4 for float64 or mixed-dtype inputs: :func:`max_teacher_slots`)
slots: beyond that, the remaining teachers are normalised and concatenated into one extra slot
(O(B * sum Dt) memory), whose kernel tile is the sum of theirs. A teacher whose gradient is
computed always gets its own slot.

Determinism: by default the forward writes one partial sum per tile and ``torch.sum`` reduces
them in a fixed order, so two runs give bit-identical losses. Setting the module-level
``DETERMINISTIC = False`` (read at each call, a setting rather than an op argument so the schema
stays that of ``csrc/ops.cpp``) accumulates with atomics instead, whose order varies. The
backward has no cross-program reduction and is always deterministic.

Precision: accumulation in float32 (float64 if any input is float64: every input is then
upcast to float64 and ``tl.dot`` runs in float64). float32 dots follow the ``precision`` op
argument (SPEC §6): "ieee" (FMA units), "tf32x3" or "tf32" (tensor cores), never torch's global
TF32 flags; 16-bit dots go to the tensor cores unmodified. In the backward
the difference tile and the normalised column tile are rounded to the input dtype for 16-bit
inputs (tensor cores), which costs about one rounding of that dtype on the gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastkd.ops import fkd as fkd_ops
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
from fastkd.validation import check_features, check_finite_number, check_teachers

# Teacher tuple slots compiled into one kernel; further teachers share a concatenated slot.
MAX_TEACHER_SLOTS = 8
# Fewer slots for wider or mixed inputs: each unrolled slot keeps pointers and strides in
# registers, and the backward spills inside its loop from 8 float32 slots, 6 float64 slots
# or 5 mixed-dtype slots (a float16 student with float32 teachers): numbers from the full
# sweep of tools/gpu_static (python -m tools.gpu_static --sweep full). The slots a call
# gets: max_teacher_slots(dtype, mixed), with the launch code below; MAX_TEACHER_SLOTS caps
# every dtype.
_SLOTS_BY_DTYPE = {torch.float32: 6, torch.float64: 4}
_MIXED_SLOTS = 4


# Forward reduction: True sums per-tile partials in a fixed order (bit-identical runs), False
# accumulates with atomics. Read at every call.
DETERMINISTIC = True


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _kernel_tile(
    x_ptr,
    stride_r,
    stride_c,
    D,
    inv_ptr,
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
    """Tile (rows_i, rows_j) of normalize(x) normalize(x)^T; 0 on padding rows/columns."""
    gram = _dot_tile(
        x_ptr, stride_r, stride_c, D, rows_i, rows_j, mask_i, mask_j,
        BLOCK_M, BLOCK_N, BLOCK_K, ACC, PRECISION,
    )  # fmt: skip
    inv_i = tl.load(inv_ptr + rows_i, mask=mask_i, other=0.0)
    inv_j = tl.load(inv_ptr + rows_j, mask=mask_j, other=0.0)
    return gram * inv_i[:, None] * inv_j[None, :]


@triton.jit
def _difference_tile(
    s_ptr,
    s_stride_r,
    s_stride_c,
    s_width,
    t_ptrs,
    t_strides_r,
    t_strides_c,
    t_widths,
    inv_ptr,
    B,
    t_weight,
    rows_i,
    rows_j,
    mask_i,
    mask_j,
    NUM_T: tl.constexpr,
    TARGET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Tile (rows_i, rows_j) of rho_S - t_weight * sum_e rho_e, and the kernel tile of slot
    TARGET (0: the student, e + 1: teacher slot e). ``inv_ptr`` holds (1 + NUM_T) rows of B
    inverse norms, student first."""
    rho = _kernel_tile(
        s_ptr, s_stride_r, s_stride_c, s_width, inv_ptr, rows_i, rows_j, mask_i, mask_j,
        BLOCK_M, BLOCK_N, BLOCK_K, ACC, PRECISION,
    )  # fmt: skip
    diff = rho
    own = rho
    for e in tl.static_range(NUM_T):
        rho_e = _kernel_tile(
            t_ptrs[e], t_strides_r[e], t_strides_c[e], t_widths[e], inv_ptr + (e + 1) * B,
            rows_i, rows_j, mask_i, mask_j, BLOCK_M, BLOCK_N, BLOCK_K, ACC, PRECISION,
        )  # fmt: skip
        diff -= t_weight * rho_e
        if e + 1 == TARGET:
            own = rho_e
    return diff, own


@triton.jit
def _fkd_forward_kernel(
    s_ptr,
    s_stride_r,
    s_stride_c,
    s_width,
    t_ptrs,
    t_strides_r,
    t_strides_c,
    t_widths,
    inv_ptr,
    out_ptr,
    B,
    t_weight: tl.float64,
    NUM_T: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (I, J): w_IJ * sum over the tile of (rho_S - rho_T)^2, w = 2 if J > I, 1 if
    J == I, nothing if J < I. ``inv_ptr`` holds (1 + NUM_T) rows of B inverse norms (student
    first). Writes out[I * nb + J], or atomically adds into out[0] when ATOMIC. ``t_weight``
    is a float64 argument (a Python float would be typed float32), converted to ACC."""
    t_weight = tl.full((), t_weight, ACC)
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_j >= pid_i:
        rows_i = pid_i * BLOCK + tl.arange(0, BLOCK)
        rows_j = pid_j * BLOCK + tl.arange(0, BLOCK)
        mask_i = rows_i < B
        mask_j = rows_j < B
        diff, _ = _difference_tile(
            s_ptr, s_stride_r, s_stride_c, s_width, t_ptrs, t_strides_r, t_strides_c, t_widths,
            inv_ptr, B, t_weight, rows_i, rows_j, mask_i, mask_j,
            NUM_T, 0, BLOCK, BLOCK, BLOCK_K, ACC, PRECISION,
        )  # fmt: skip
        total = tl.sum(diff * diff)
        total = total * (1.0 + (pid_j > pid_i).to(ACC))  # the (J, I) tile is the transpose
        if ATOMIC:
            tl.atomic_add(out_ptr, total)
        else:
            tl.store(out_ptr + pid_i * tl.num_programs(1) + pid_j, total)


@triton.jit
def _fkd_backward_kernel(
    s_ptr,
    s_stride_r,
    s_stride_c,
    s_width,
    t_ptrs,
    t_strides_r,
    t_strides_c,
    t_widths,
    inv_ptr,
    B,
    t_weight: tl.float64,
    y_ptr,
    y_stride_r,
    y_stride_c,
    y_width,
    y_inv_ptr,
    out_ptr,
    out_stride_r,
    out_stride_c,
    grad_ptr,
    kd_scale: tl.float64,
    fr_scale: tl.float64,
    loss_ptr,
    NUM_T: tl.constexpr,
    TARGET: tl.constexpr,
    HAS_FR: tl.constexpr,
    LOSS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (I, c): rows I, columns c of the gradient of y, the student (TARGET = 0) or the
    teacher in slot TARGET - 1 (its kernel, not the mean, enters the row dot).

    out = grad * kd_scale * (sum_J D_IJ Y_J - r (.) Y_I) * inv_I (+ grad * fr_scale * y if
    HAS_FR), with D = rho_S - rho_T, Y = normalize(y), r_i = sum_j D_ij K_ij. With LOSS, the
    programs of column chunk 0 also write sum over rows I, all columns of D^2 to loss_ptr[I].
    The float scalars are float64 arguments converted to ACC (exact for float64 inputs).
    """
    t_weight = tl.full((), t_weight, ACC)
    kd_scale = tl.full((), kd_scale, ACC)
    fr_scale = tl.full((), fr_scale, ACC)
    pid_i = tl.program_id(0)
    rows_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_i = rows_i < B
    cols = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    cmask = (cols < y_width)[None, :]
    y_col_off = cols.to(tl.int64)[None, :] * y_stride_c  # int64: see _row_norm_kernel
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC)
    row_dot = tl.zeros((BLOCK_M,), ACC)
    sq_rows = tl.zeros((BLOCK_M,), ACC)
    for j0 in range(0, B, BLOCK_N):
        rows_j = j0 + tl.arange(0, BLOCK_N)
        mask_j = rows_j < B
        diff, own = _difference_tile(
            s_ptr, s_stride_r, s_stride_c, s_width, t_ptrs, t_strides_r, t_strides_c, t_widths,
            inv_ptr, B, t_weight, rows_i, rows_j, mask_i, mask_j,
            NUM_T, TARGET, BLOCK_M, BLOCK_N, BLOCK_K, ACC, PRECISION,
        )  # fmt: skip
        row_dot += tl.sum(diff * own, axis=1)
        if LOSS:
            sq_rows += tl.sum(diff * diff, axis=1)
        y_j = tl.load(
            y_ptr + rows_j.to(tl.int64)[:, None] * y_stride_r + y_col_off,
            mask=mask_j[:, None] & cmask,
            other=0.0,
        )
        inv_j = tl.load(y_inv_ptr + rows_j, mask=mask_j, other=0.0)
        # Both dot operands in y's dtype: tensor cores for 16-bit inputs, a no-op otherwise.
        a_j = (y_j.to(ACC) * inv_j[:, None]).to(y_j.dtype)
        acc = _mma(diff.to(y_j.dtype), a_j, acc, PRECISION)
    g = tl.load(grad_ptr).to(ACC)
    mask = mask_i[:, None] & cmask
    row_off = rows_i.to(tl.int64)[:, None]
    y_i = tl.load(y_ptr + row_off * y_stride_r + y_col_off, mask=mask, other=0.0)
    y_i = y_i.to(ACC)
    inv_i = tl.load(y_inv_ptr + rows_i, mask=mask_i, other=0.0)
    out = (g * kd_scale) * (acc - row_dot[:, None] * (y_i * inv_i[:, None])) * inv_i[:, None]
    if HAS_FR:
        out += (g * fr_scale) * y_i
    out_ptrs = out_ptr + row_off * out_stride_r + cols[None, :] * out_stride_c
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if LOSS:
        if tl.program_id(1) == 0:
            tl.store(loss_ptr + pid_i, tl.sum(sq_rows))


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def max_teacher_slots(dtype: torch.dtype, mixed: bool = False) -> int:
    """Teacher slots compiled into one kernel for inputs whose widest dtype is ``dtype``
    (``mixed``: not all inputs have the same dtype)."""
    cap = min(MAX_TEACHER_SLOTS, _SLOTS_BY_DTYPE.get(dtype, MAX_TEACHER_SLOTS))
    return min(cap, _MIXED_SLOTS) if mixed else cap


def _check_inputs(student, teachers, kd_weight, fr_weight) -> tuple[list[Tensor], bool]:
    """Validated teachers (a list) and whether the interpreter runs the kernels."""
    check_features(student, "student")
    check_finite_number(kd_weight, "kd_weight")
    check_finite_number(fr_weight, "fr_weight")
    teachers = check_teachers(teachers, student, min_batch=1)
    named = {"student": student} | {f"teacher[{i}]": t for i, t in enumerate(teachers)}
    return teachers, check_triton_inputs(named)


class _Problem:
    """Inputs in compute form, inverse row norms and launch settings, shared by both passes."""

    def __init__(self, student: Tensor, teachers: list[Tensor], interpret: bool, precision: str):
        self.out_dtype = loss_dtype(student, *teachers)
        if self.out_dtype == torch.float64:  # fp64 dots need fp64 on both operands
            student = student.to(torch.float64)
            teachers = [t.to(torch.float64) for t in teachers]
        self.acc = self.out_dtype
        self.student, self.teachers = student, teachers
        self.batch = student.shape[0]
        self.interpret = interpret
        widths = [student.shape[1]] + [t.shape[1] for t in teachers]
        dtype = max((student, *teachers), key=lambda t: t.element_size()).dtype
        self.cfg = block_config(self.batch, widths, dtype, interpret)
        mixed = len({x.dtype for x in (student, *teachers)}) > 1
        self.max_slots = max_teacher_slots(dtype, mixed)
        # The op argument, never torch's global TF32 flag (SPEC §6).
        self.precision = dot_precision(precision, self.acc)
        self.sumsq = torch.empty(self.batch, dtype=self.acc, device=student.device)
        self.inv_student = row_norms(student, self.acc, interpret, sumsq=self.sumsq)
        self.inv_teachers = [row_norms(t, self.acc, interpret) for t in teachers]

    def slots(self, first: int | None = None) -> tuple[list[Tensor], Tensor]:
        """Teacher slots (teacher ``first`` in slot 0 if given) and the (1 + S, B) inverse
        norms, student first. Teachers past ``max_teacher_slots - 1`` share one concatenated
        slot of normalised rows (inverse norm 1)."""
        order = list(range(len(self.teachers)))
        if first is not None:
            order.remove(first)
            order.insert(0, first)
        cap = self.max_slots
        direct = order if len(order) <= cap else order[: cap - 1]
        tensors = [self.teachers[e] for e in direct]
        invs = [self.inv_student] + [self.inv_teachers[e] for e in direct]
        rest = order[len(direct) :]
        if rest:
            tensors.append(
                torch.cat(
                    [self.teachers[e].to(self.acc) * self.inv_teachers[e][:, None] for e in rest],
                    dim=1,
                )
            )
            invs.append(torch.ones_like(self.inv_student))
        return tensors, torch.stack(invs)

    def common_args(self, slots: list[Tensor], inv: Tensor) -> tuple:
        s = self.student
        return (
            s, s.stride(0), s.stride(1), s.shape[1],
            tuple(slots), tuple(t.stride(0) for t in slots), tuple(t.stride(1) for t in slots),
            tuple(t.shape[1] for t in slots), inv,
        )  # fmt: skip

    def forward(self, deterministic: bool) -> Tensor:
        """sum_ij (rho_S - rho_T)_ij^2 in the accumulation dtype (0-dim)."""
        slots, inv = self.slots()
        nb = triton.cdiv(self.batch, self.cfg["BLOCK"])
        out = torch.zeros(nb * nb if deterministic else 1, dtype=self.acc, device=inv.device)
        _fkd_forward_kernel[(nb, nb)](
            *self.common_args(slots, inv), out, self.batch, 1.0 / len(self.teachers),
            NUM_T=len(slots), ATOMIC=not deterministic, BLOCK=self.cfg["BLOCK"],
            BLOCK_K=self.cfg["BLOCK_K"], ACC=TL_DTYPES[self.acc], PRECISION=self.precision,
            num_warps=self.cfg["num_warps"],
        )  # fmt: skip
        return out.sum()

    def loss(self, kd_sum: Tensor, kd_weight: float, fr_weight: float) -> Tensor:
        """The loss in ``out_dtype`` from ``kd_sum`` = sum_ij (rho_S - rho_T)_ij^2."""
        b, ds = self.student.shape
        loss = kd_sum * (kd_weight / (b * b))
        if fr_weight != 0.0:
            loss = loss + self.sumsq.sum() * (fr_weight / (b * ds))
        return loss.to(self.out_dtype)

    def gradient(
        self,
        target: int | None,
        grad: Tensor,
        kd_weight: float,
        fr_weight: float,
        dtype: torch.dtype,
        loss_partials: Tensor | None = None,
    ) -> Tensor:
        """Gradient of the student (target None) or of teacher ``target``, in ``dtype``.

        If ``loss_partials`` (one entry per row block) is given, it receives the row blocks'
        sums of (rho_S - rho_T)^2 as a by-product."""
        b = self.batch
        kd_scale = kd_weight * 4.0 / (b * b)
        if target is None:
            slots, inv = self.slots()
            y, y_inv, which = self.student, inv[0], 0
            fr_scale = 2.0 * fr_weight / self.student.numel()
        else:
            slots, inv = self.slots(first=target)
            y, y_inv, which, fr_scale = self.teachers[target], inv[1], 1, 0.0
            kd_scale = -kd_scale / len(self.teachers)
        out = torch.empty(y.shape, dtype=dtype, device=y.device)
        cfg = self.cfg
        block_do = min(cfg["BLOCK_DO"], max(16, pow2(y.shape[1])))
        grid = (triton.cdiv(b, cfg["BLOCK"]), triton.cdiv(y.shape[1], block_do))
        _fkd_backward_kernel[grid](
            *self.common_args(slots, inv), b, 1.0 / len(self.teachers),
            y, y.stride(0), y.stride(1), y.shape[1], y_inv, out, out.stride(0), out.stride(1),
            grad, kd_scale, fr_scale, out if loss_partials is None else loss_partials,
            NUM_T=len(slots), TARGET=which, HAS_FR=fr_scale != 0.0,
            LOSS=loss_partials is not None, BLOCK_M=cfg["BLOCK"],
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_DO=block_do,
            ACC=TL_DTYPES[self.acc], PRECISION=self.precision,
            num_warps=cfg["num_warps"],
        )  # fmt: skip
        return out


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


@custom_op("fkd_forward", fkd_ops.SCHEMAS)
def fkd_forward(
    student: Tensor,
    teachers: list[Tensor],
    kd_weight: float,
    fr_weight: float,
    precision: str = "ieee",
) -> Tensor:
    """FKD loss (SPEC §1) by the Triton kernels; see the module docstring.

    student (B, Ds), teachers E tensors (B, Dt_e); float16/bfloat16/float32/float64, any
    strides. Returns the 0-dim ``kd_weight * mean (rho_S - rho_T)^2 + fr_weight * mean(fs^2)``
    in float32 (float64 if any input is float64). ``precision``: the float32 dots (SPEC §6,
    :func:`fastkd.triton._common.dot_precision`). The tile partials are summed in a fixed order
    unless the module's ``DETERMINISTIC`` is False (atomics: run-to-run bit differences).
    """
    teachers, interpret = _check_inputs(student, teachers, kd_weight, fr_weight)
    with device_guard(student):
        problem = _Problem(student, teachers, interpret, precision)
        return problem.loss(problem.forward(bool(DETERMINISTIC)), kd_weight, fr_weight)


@custom_op("fkd_backward", fkd_ops.SCHEMAS)
def fkd_backward(
    grad: Tensor,
    student: Tensor,
    teachers: list[Tensor],
    kd_weight: float,
    fr_weight: float,
    teachers_grad: bool,
    precision: str = "ieee",
) -> tuple[Tensor, list[Tensor]]:
    """Gradients of :func:`fkd_forward` times ``grad`` (0-dim, the loss's gradient).

    Returns (grad_student (B, Ds) in student's dtype, [grad_teacher_e (B, Dt_e) in each
    teacher's dtype] if ``teachers_grad`` else []). Always deterministic (no cross-program
    reduction). ``grad`` is read on the device: no host sync.
    """
    teachers, interpret = _check_inputs(student, teachers, kd_weight, fr_weight)
    check_grad(grad, student)
    with device_guard(student):
        problem = _Problem(student, teachers, interpret, precision)
        grad = grad.to(problem.acc).reshape(())
        grad_student = problem.gradient(None, grad, kd_weight, fr_weight, student.dtype)
        grad_teachers = []
        if teachers_grad:
            grad_teachers = [
                problem.gradient(e, grad, kd_weight, fr_weight, t.dtype)
                for e, t in enumerate(teachers)
            ]
    return grad_student, grad_teachers


@custom_op("fkd_forward_backward", fkd_ops.SCHEMAS)
def fkd_forward_backward(
    student: Tensor,
    teachers: list[Tensor],
    kd_weight: float,
    fr_weight: float,
    teachers_grad: bool,
    precision: str = "ieee",
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Loss and its gradients (for a unit upstream gradient) in one sweep over the tiles.

    The student-gradient kernel also sums the squared difference tiles of each row block, so a
    training step skips the forward pass: (loss, grad_student, [grad_teacher_e] if
    ``teachers_grad`` else []), dtypes as :func:`fkd_forward` and :func:`fkd_backward`.
    Deterministic (per-row-block partials summed in a fixed order).
    """
    teachers, interpret = _check_inputs(student, teachers, kd_weight, fr_weight)
    with device_guard(student):
        problem = _Problem(student, teachers, interpret, precision)
        one = torch.ones((), dtype=problem.acc, device=student.device)
        partials = torch.empty(
            triton.cdiv(student.shape[0], problem.cfg["BLOCK"]),
            dtype=problem.acc,
            device=one.device,
        )
        grad_student = problem.gradient(None, one, kd_weight, fr_weight, student.dtype, partials)
        loss = problem.loss(partials.sum(), kd_weight, fr_weight)
        grad_teachers = []
        if teachers_grad:
            grad_teachers = [
                problem.gradient(e, one, kd_weight, fr_weight, t.dtype)
                for e, t in enumerate(teachers)
            ]
    return loss, grad_student, grad_teachers


fkd_ops.register(NAMESPACE, (BACKEND,))
