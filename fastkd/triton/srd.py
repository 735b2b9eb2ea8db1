"""SRD (SPEC §3) in Triton: LogSum of batch-normalised features, fused.

Custom ops ``fastkd_triton::srd_forward`` / ``srd_backward`` with the schema and outputs of the
compiled ``fastkd::srd_*`` ops (csrc/ops.cpp, :data:`fastkd.ops.srd.SCHEMAS`), registered as the
"triton" backend of "srd"; their fakes and autograd come from :mod:`fastkd.ops.srd`.

The (B, D) inputs are cut into column blocks of BLOCK_D columns and row splits of a multiple of
BLOCK_B rows; one program per (column block, row split):

1. ``_stats_partial_kernel``: Welford statistics of y = z - z[0, j] over the split, one row tile
   at a time (two-pass inside the tile, Chan's merge across tiles).
2. ``_stats_finalize_kernel`` (one program per column block): merges the splits, writes each
   side's (4, D) statistics [mean, biased var, centre = mean(y), rstd]. Eval mode skips 1 and 2
   and builds the statistics from the running buffers.
3. ``_sums_partial_kernel``: per-split column sums of |d|^p, h, h*s, h*t (d = s - t,
   h = p |d|^(p-1) sign(d)); the splits and then the columns are added by torch in a fixed order.
4. ``_backward_kernel``: one elementwise pass recomputing h:
   train d zs = c (h - mean_b h - s mean_b(h s)) rstd_s, d zt = -c (h - mean_b h - t mean_b(h t))
   rstd_t, eval d zs = c h rstd_s, d zt = -c h rstd_t, with c = grad / S (0 when S < tiny).

Arithmetic is float32 (float64 for float64 inputs). No B x D temporaries beyond the gradients.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastkd.ops import srd as srd_ops
from fastkd.reference import SRD_TINY, loss_dtype
from fastkd.triton._common import (
    BACKEND,
    NAMESPACE,
    TL_DTYPES,
    check_grad,
    check_triton_inputs,
    custom_op,
    device_guard,
    interpreter_enabled,
)
from fastkd.validation import check_features

try:  # pow() for a non-integer p on a GPU; the interpreter has no libdevice
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older Triton layouts
    libdevice = None

MAX_INTEGER_POWER = 8  # integer p up to this is evaluated by repeated multiplication
CENTRE, RSTD = 2, 3  # rows of the (4, D) statistics used by the kernels


@triton.jit
def _power_terms(d, p, P_INT: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """|d|^p and h = p |d|^(p-1) sign(d); P_INT > 0 is p as an integer, 0 for pow()."""
    a = tl.abs(d)
    sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    if P_INT == 1:
        value = a
        h = p * sign
    elif P_INT > 1:
        a_pm1 = a
        for _ in tl.static_range(P_INT - 2):
            a_pm1 = a_pm1 * a
        value = a_pm1 * a
        h = p * a_pm1 * sign
    else:
        if USE_LIBDEVICE:
            a_pm1 = libdevice.pow(a, p - 1.0)
        else:  # p > 1 here, so 0^(p-1) = 0; NaN fails a == 0 and propagates
            safe = tl.where(a == 0, 1.0, a)
            a_pm1 = tl.where(a == 0, 0.0, tl.exp2((p - 1.0) * tl.log2(safe)))
        value = a_pm1 * a
        h = p * a_pm1 * sign
    return value, h


@triton.jit
def _program_block(B, D, rows_per_split, BLOCK_D: tl.constexpr):
    """Columns `cols` (valid where `cmask`) and rows [r0, r1) of program (column block, split).
    `cols` is BLOCK_D consecutive columns starting at a multiple of BLOCK_D (the hints say so), so
    a row's loads and stores become 16-byte vector accesses wherever D and the pointers allow it
    (Triton specialises D % 16 == 0 and 16-byte aligned pointers at launch)."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_D), BLOCK_D)
    cmask = cols < D
    r0 = tl.program_id(1) * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, B)
    return cols, cmask, r0, r1


@triton.jit
def _row_tile(start, r1, cols, cmask, D, BLOCK_B: tl.constexpr):
    """Mask and element offsets of rows [start, min(start + BLOCK_B, r1)) of columns `cols`."""
    rows = start + tl.arange(0, BLOCK_B)
    mask = (rows < r1)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    return mask, offs


@triton.jit
def _store_rows(ptr, stride, row0, row1, row2, row3, cmask):
    """Stores four column vectors as rows of a table: row k at ptr + k * stride."""
    tl.store(ptr, row0, mask=cmask)
    tl.store(ptr + stride, row1, mask=cmask)
    tl.store(ptr + 2 * stride, row2, mask=cmask)
    tl.store(ptr + 3 * stride, row3, mask=cmask)


@triton.jit
def _split_welford(z_ptr, cols, cmask, r0, r1, D, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """(mean, m2) of y = z - z[0, col] over rows [r0, r1) of columns `cols`."""
    shift = tl.load(z_ptr + cols, mask=cmask, other=0.0).to(ACC)
    mean = tl.zeros(cols.shape, ACC)
    m2 = tl.zeros(cols.shape, ACC)
    for start in range(r0, r1, BLOCK_B):
        mask, offs = _row_tile(start, r1, cols, cmask, D, BLOCK_B)
        y = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC) - shift[None, :]
        y = tl.where(mask, y, 0.0)
        count = tl.minimum(r1 - start, BLOCK_B).to(ACC)
        seen = (start - r0).to(ACC)
        tile_mean = tl.sum(y, axis=0) / count
        dev = tl.where(mask, y - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=0)
        delta = tile_mean - mean
        frac = count / (seen + count)
        mean = mean + delta * frac
        m2 = m2 + tile_m2 + delta * delta * seen * frac
    return mean, m2


@triton.jit
def _stats_partial_kernel(
    zs_ptr,
    zt_ptr,
    part_ptr,  # (2 sides, 2 [mean, m2], n_splits, D)
    B,
    D,
    rows_per_split,
    n_splits,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols, cmask, r0, r1 = _program_block(B, D, rows_per_split, BLOCK_D)
    mean_s, m2_s = _split_welford(zs_ptr, cols, cmask, r0, r1, D, ACC, BLOCK_B)
    mean_t, m2_t = _split_welford(zt_ptr, cols, cmask, r0, r1, D, ACC, BLOCK_B)
    base = part_ptr + tl.program_id(1) * D + cols
    _store_rows(base, n_splits * D, mean_s, m2_s, mean_t, m2_t, cmask)


@triton.jit
def _merge_splits(
    z_ptr, part_ptr, stats_ptr, cols, cmask, B, D, rows_per_split, n_splits, eps, ACC: tl.constexpr
):
    """Chan's merge of the per-split (mean, m2) of one side; writes its (4, D) statistics."""
    plane = n_splits * D
    mean = tl.zeros(cols.shape, ACC)
    m2 = tl.zeros(cols.shape, ACC)
    for i in range(0, n_splits):
        seen = (i * rows_per_split).to(ACC)
        count = tl.minimum(rows_per_split, B - i * rows_per_split).to(ACC)
        split_mean = tl.load(part_ptr + i * D + cols, mask=cmask, other=0.0)
        split_m2 = tl.load(part_ptr + plane + i * D + cols, mask=cmask, other=0.0)
        delta = split_mean - mean
        frac = count / (seen + count)
        mean = mean + delta * frac
        m2 = m2 + split_m2 + delta * delta * seen * frac
    var = m2 / B
    shift = tl.load(z_ptr + cols, mask=cmask, other=0.0).to(ACC)
    _store_rows(stats_ptr + cols, D, shift + mean, var, mean, 1.0 / tl.sqrt(var + eps), cmask)


@triton.jit
def _stats_finalize_kernel(
    zs_ptr,
    zt_ptr,
    part_ptr,
    stats_s_ptr,
    stats_t_ptr,
    B,
    D,
    rows_per_split,
    n_splits,
    eps: tl.float64,  # float64 arguments: a Python float would be typed float32
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    eps = tl.full((), eps, ACC)
    side_stride = 2 * n_splits * D
    _merge_splits(zs_ptr, part_ptr, stats_s_ptr, cols, cmask, B, D, rows_per_split, n_splits,
                  eps, ACC)  # fmt: skip
    _merge_splits(zt_ptr, part_ptr + side_stride, stats_t_ptr, cols, cmask, B, D, rows_per_split,
                  n_splits, eps, ACC)  # fmt: skip


@triton.jit
def _load_side(z_ptr, stats_ptr, cols, cmask, D, ACC: tl.constexpr):
    shift = tl.load(z_ptr + cols, mask=cmask, other=0.0).to(ACC)
    centre = tl.load(stats_ptr + 2 * D + cols, mask=cmask, other=0.0)
    rstd = tl.load(stats_ptr + 3 * D + cols, mask=cmask, other=0.0)
    return shift, centre, rstd


@triton.jit
def _load_normalized(z_ptr, offs, mask, shift, centre, rstd, ACC: tl.constexpr):
    """Batch-normalised values of a row tile of one side (garbage where not `mask`)."""
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
    return ((z - shift[None, :]) - centre[None, :]) * rstd[None, :]


@triton.jit
def _sums_partial_kernel(
    zs_ptr,
    zt_ptr,
    stats_s_ptr,
    stats_t_ptr,
    part_ptr,  # (n_splits, 4, D): sums of |d|^p, h, h*s, h*t
    B,
    D,
    rows_per_split,
    p: tl.float64,
    ACC: tl.constexpr,
    P_INT: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols, cmask, r0, r1 = _program_block(B, D, rows_per_split, BLOCK_D)
    p = tl.full((), p, ACC)
    shift_s, centre_s, rstd_s = _load_side(zs_ptr, stats_s_ptr, cols, cmask, D, ACC)
    shift_t, centre_t, rstd_t = _load_side(zt_ptr, stats_t_ptr, cols, cmask, D, ACC)
    acc_pow = tl.zeros(cols.shape, ACC)
    acc_h = tl.zeros(cols.shape, ACC)
    acc_hs = tl.zeros(cols.shape, ACC)
    acc_ht = tl.zeros(cols.shape, ACC)
    for start in range(r0, r1, BLOCK_B):
        mask, offs = _row_tile(start, r1, cols, cmask, D, BLOCK_B)
        s = _load_normalized(zs_ptr, offs, mask, shift_s, centre_s, rstd_s, ACC)
        t = _load_normalized(zt_ptr, offs, mask, shift_t, centre_t, rstd_t, ACC)
        s = tl.where(mask, s, 0.0)
        t = tl.where(mask, t, 0.0)
        value, h = _power_terms(s - t, p, P_INT, USE_LIBDEVICE)
        acc_pow += tl.sum(value, axis=0)
        acc_h += tl.sum(h, axis=0)
        acc_hs += tl.sum(h * s, axis=0)
        acc_ht += tl.sum(h * t, axis=0)
    base = part_ptr + tl.program_id(1) * 4 * D + cols
    _store_rows(base, D, acc_pow, acc_h, acc_hs, acc_ht, cmask)


@triton.jit
def _backward_kernel(
    grad_ptr,
    total_ptr,
    zs_ptr,
    zt_ptr,
    stats_s_ptr,
    stats_t_ptr,
    sums_ptr,
    gs_ptr,
    gt_ptr,
    B,
    D,
    rows_per_split,
    p: tl.float64,
    tiny: tl.float64,
    ACC: tl.constexpr,
    P_INT: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    TRAINING: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols, cmask, r0, r1 = _program_block(B, D, rows_per_split, BLOCK_D)
    shift_s, centre_s, rstd_s = _load_side(zs_ptr, stats_s_ptr, cols, cmask, D, ACC)
    shift_t, centre_t, rstd_t = _load_side(zt_ptr, stats_t_ptr, cols, cmask, D, ACC)
    p = tl.full((), p, ACC)
    tiny = tl.full((), tiny, ACC)
    total = tl.load(total_ptr).to(ACC)
    grad = tl.load(grad_ptr).to(ACC)
    # dL/dS * grad, 0 where log(max(S, tiny)) is clamped; a NaN S fails the test and propagates.
    c = tl.where(total < tiny, 0.0, grad / tl.where(total < tiny, 1.0, total))
    if TRAINING:
        mean_h = tl.load(sums_ptr + D + cols, mask=cmask, other=0.0) / B
        mean_hs = tl.load(sums_ptr + 2 * D + cols, mask=cmask, other=0.0) / B
        mean_ht = tl.load(sums_ptr + 3 * D + cols, mask=cmask, other=0.0) / B
    for start in range(r0, r1, BLOCK_B):
        mask, offs = _row_tile(start, r1, cols, cmask, D, BLOCK_B)
        s = _load_normalized(zs_ptr, offs, mask, shift_s, centre_s, rstd_s, ACC)
        t = _load_normalized(zt_ptr, offs, mask, shift_t, centre_t, rstd_t, ACC)
        _, h = _power_terms(s - t, p, P_INT, USE_LIBDEVICE)
        if TRAINING:
            gs = c * (h - mean_h[None, :] - s * mean_hs[None, :]) * rstd_s[None, :]
        else:
            gs = c * h * rstd_s[None, :]
        # Masked lanes hold garbage that may overflow a float16 cast: zero them first.
        gs = tl.where(mask, gs, 0.0)
        tl.store(gs_ptr + offs, gs.to(gs_ptr.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            if TRAINING:
                gt = -c * (h - mean_h[None, :] - t * mean_ht[None, :]) * rstd_t[None, :]
            else:
                gt = -c * h * rstd_t[None, :]
            gt = tl.where(mask, gt, 0.0)
            tl.store(gt_ptr + offs, gt.to(gt_ptr.dtype.element_ty), mask=mask)


def _integer_power(p: float) -> int:
    return int(p) if p == math.floor(p) and 1 <= p <= MAX_INTEGER_POWER else 0


# Tests set this to {"BLOCK_B": ..., "BLOCK_D": ..., "rows_per_split": ...} to exercise the
# multi-block and multi-split paths on small shapes.
_CONFIG_OVERRIDE: dict | None = None


def _launch_config(
    batch: int, width: int, device: torch.device | None, sm_count: int | None = None
) -> dict:
    """Tile sizes and the row split: enough programs to fill the GPU, each split >= one tile.
    ``sm_count`` (the device's multiprocessor count) is queried from ``device`` unless given."""
    if _CONFIG_OVERRIDE is not None:
        cfg = dict(_CONFIG_OVERRIDE)
    elif interpreter_enabled() and sm_count is None:  # few, large programs (cost is per program)
        cfg = {
            "BLOCK_B": min(64, triton.next_power_of_2(batch)),
            "BLOCK_D": min(128, triton.next_power_of_2(width)),
            "rows_per_split": batch,
        }
    else:
        block_b, block_d = 32, min(64, triton.next_power_of_2(width))
        col_blocks = triton.cdiv(width, block_d)
        if sm_count is None:
            sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        programs = 4 * sm_count
        splits = max(1, min(triton.cdiv(batch, block_b), triton.cdiv(programs, col_blocks)))
        cfg = {"BLOCK_B": block_b, "BLOCK_D": block_d, "rows_per_split": triton.cdiv(batch, splits)}
    block_b = cfg["BLOCK_B"]
    cfg["rows_per_split"] = triton.cdiv(max(cfg["rows_per_split"], 1), block_b) * block_b
    cfg["n_splits"] = triton.cdiv(batch, cfg["rows_per_split"])
    return cfg


def _stats_from_running(z: Tensor, mean: Tensor | None, var: Tensor | None, eps: float, side: str):
    if mean is None or var is None:
        raise ValueError(f"eval mode needs the {side} running mean and running var")
    acc = loss_dtype(z)
    mean, var = mean.to(z.device, acc), var.to(z.device, acc)
    return torch.stack([mean, var, mean - z[0].to(acc), torch.rsqrt(var + eps)])


def _check(student: Tensor, teacher: Tensor) -> None:
    """(B, D) floating inputs of one shape and dtype, on a device Triton runs on."""
    check_features(student, "student")
    check_features(teacher, "teacher")
    if teacher.shape != student.shape or teacher.dtype != student.dtype:
        raise ValueError(
            f"teacher must have the student's shape and dtype, got {tuple(teacher.shape)} "
            f"{teacher.dtype} and {tuple(student.shape)} {student.dtype}"
        )
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
    check_triton_inputs({"student": student, "teacher": teacher})


@custom_op("srd_forward", srd_ops.SCHEMAS)
def srd_forward(
    student: Tensor,
    teacher: Tensor,
    p: float,
    eps: float,
    training: bool,
    running_mean_s: Tensor | None,
    running_var_s: Tensor | None,
    running_mean_t: Tensor | None,
    running_var_t: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, S, stats_s, stats_t, sums) like ``fastkd::srd_forward``."""
    _check(student, teacher)
    with device_guard(student):
        running = (running_mean_s, running_var_s, running_mean_t, running_var_t)
        return _forward(student, teacher, p, eps, training, *running)


def _forward(student, teacher, p, eps, training, rm_s, rv_s, rm_t, rv_t):
    student, teacher = student.contiguous(), teacher.contiguous()
    batch, width = student.shape
    acc = loss_dtype(student)
    cfg = _launch_config(batch, width, student.device)
    block_b, block_d, rows, splits = (
        cfg["BLOCK_B"], cfg["BLOCK_D"], cfg["rows_per_split"], cfg["n_splits"],
    )  # fmt: skip
    col_blocks = triton.cdiv(width, block_d)
    # p, eps and tiny go as float64 kernel arguments: no host-to-device copy per call (which
    # would sync the host and break CUDA-graph capture), no float32 rounding.
    p, eps = float(p), float(eps)
    if training:
        if batch < 2:
            raise ValueError("training mode needs a batch of at least 2 rows")
        part = torch.empty((2, 2, splits, width), device=student.device, dtype=acc)
        stats_s = torch.empty((4, width), device=student.device, dtype=acc)
        stats_t = torch.empty_like(stats_s)
        _stats_partial_kernel[(col_blocks, splits)](
            student, teacher, part, batch, width, rows, splits,
            ACC=TL_DTYPES[acc], BLOCK_B=block_b, BLOCK_D=block_d,
        )  # fmt: skip
        _stats_finalize_kernel[(col_blocks,)](
            student, teacher, part, stats_s, stats_t, batch, width, rows, splits, eps,
            ACC=TL_DTYPES[acc], BLOCK_D=block_d,
        )  # fmt: skip
    else:
        stats_s = _stats_from_running(student, rm_s, rv_s, eps, "student")
        stats_t = _stats_from_running(teacher, rm_t, rv_t, eps, "teacher")
    part = torch.empty((splits, 4, width), device=student.device, dtype=acc)
    _sums_partial_kernel[(col_blocks, splits)](
        student, teacher, stats_s, stats_t, part, batch, width, rows, p,
        ACC=TL_DTYPES[acc], P_INT=_integer_power(p), USE_LIBDEVICE=not interpreter_enabled(),
        BLOCK_B=block_b, BLOCK_D=block_d,
    )  # fmt: skip
    sums = part.sum(0)
    # Columns added in float64, in a fixed order: run-to-run identical.
    total = sums[0].sum(dtype=torch.float64).to(acc)
    loss = total.clamp_min(SRD_TINY).log()
    return loss, total, stats_s, stats_t, sums


@custom_op("srd_backward", srd_ops.SCHEMAS)
def srd_backward(
    grad: Tensor,
    student: Tensor,
    teacher: Tensor,
    p: float,
    training: bool,
    total: Tensor,
    stats_s: Tensor,
    stats_t: Tensor,
    sums: Tensor,
    teacher_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_student, grad_teacher) like ``fastkd::srd_backward``; grad_teacher is empty (0,)
    unless teacher_grad."""
    _check(student, teacher)
    check_grad(grad, student)
    with device_guard(student):
        return _backward(
            grad, student, teacher, p, training, total, stats_s, stats_t, sums, teacher_grad
        )


def _backward(grad, student, teacher, p, training, total, stats_s, stats_t, sums, teacher_grad):
    student, teacher = student.contiguous(), teacher.contiguous()
    batch, width = student.shape
    acc = loss_dtype(student)
    stats_s, stats_t = stats_s.to(acc).contiguous(), stats_t.to(acc).contiguous()
    sums, total = sums.to(acc).contiguous(), total.to(acc).contiguous()
    grad = grad.to(acc).contiguous()
    cfg = _launch_config(batch, width, student.device)
    grad_s = torch.empty_like(student)
    grad_t = torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
    grid = (triton.cdiv(width, cfg["BLOCK_D"]), cfg["n_splits"])
    _backward_kernel[grid](
        grad, total, student, teacher, stats_s, stats_t, sums, grad_s,
        grad_t if teacher_grad else grad_s, batch, width, cfg["rows_per_split"], float(p),
        SRD_TINY, ACC=TL_DTYPES[acc], P_INT=_integer_power(p),
        USE_LIBDEVICE=not interpreter_enabled(),
        TRAINING=training, TEACHER_GRAD=teacher_grad, BLOCK_B=cfg["BLOCK_B"],
        BLOCK_D=cfg["BLOCK_D"],
    )  # fmt: skip
    return grad_s, grad_t


srd_ops.register(NAMESPACE, (BACKEND,))
