"""What the Triton op modules share: dtype map, precision policy, block sizes, device guard,
input checks (from :mod:`fastkd.validation`) and the tile helpers used by FKD and RKD.

Host-side policy:
  * accumulation in float32, float64 if any input is float64 (:func:`fastkd.reference.loss_dtype`);
  * ``tl.dot`` on float32 operands follows the op's ``precision`` argument (SPEC §6,
    :func:`dot_precision`), never torch's global TF32 flags (reading ``allow_tf32`` raises in
    torch 2.14 once ``fp32_precision`` is set, and a global flag should not change a loss);
  * launches run under :func:`device_guard` so a kernel goes to its inputs' GPU whatever the
    current device is;
  * block sizes are a fixed heuristic (:func:`block_config`), no autotuning: results never
    depend on timing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from fastkd.reference import NORM_EPS
from fastkd.validation import (  # noqa: F401  (re-exported for the op modules)
    check_grad,
    check_precision,
    check_triton_device,
    check_triton_inputs,
    interpreter_enabled,
)

NAMESPACE = "fastkd_triton"
BACKEND = "triton"

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def custom_op(name: str, schemas: Mapping[str, str]):
    """Decorator defining ``fastkd_triton::<name>`` with the schema ``schemas[name]`` of
    ``fastkd/ops/<op>.py`` (the one of ``csrc/ops.cpp``), not one inferred from type hints."""
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), schema=schemas[name])


def pow2(n: int) -> int:
    """The next power of two >= max(n, 1)."""
    return triton.next_power_of_2(max(int(n), 1))


def device_guard(x: torch.Tensor):
    """Context under which Triton launches on ``x``'s device: ``torch.cuda.device(x.device)``
    for a CUDA tensor (Triton launches on the *current* device), a no-op otherwise."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def dot_precision(precision: str, acc: torch.dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot`` (a constexpr) for the op argument
    ``precision`` ("ieee" | "tf32x3" | "tf32", checked here) and the accumulation dtype ``acc``.

    float32 accumulation: ``precision`` itself ("tf32x3" is Triton's split hi/lo product, three
    TF32 MMAs). float64: "ieee" (fp64 dots have no TF32 form). 16-bit operands never read it
    (``_mma`` calls ``tl.dot`` without it: their products are exact in the fp32 accumulator)."""
    check_precision(precision)
    return precision if acc == torch.float32 else "ieee"


def block_config(
    batch: int,
    widths: list[int],
    dtype: torch.dtype,
    interpret: bool,
    op: str = "fkd",
    precision: str = "ieee",
) -> dict:
    """Block sizes of the tiled FKD and RKD kernels: a fixed heuristic (no autotuning).

    ``widths`` are the feature widths of all inputs, ``dtype`` the widest input dtype, ``op``
    "fkd" or "rkd". GPU (checked by ``python -m tools.gpu_static`` for sm_80 and sm_90: no
    spills in the loops): forward tiles BLOCK x BLOCK = 64 x 64, backward tiles
    BLOCK x BLOCK_N = 64 x 32 (64 x 16 for float32 FKD: its dots run on the FMA units) with a
    64 x BLOCK_DO = 64 x 128 fp32 gradient accumulator, feature chunks BLOCK_K = 32 (16 for
    fp64), 8 warps. Small problems shrink the blocks to the next power of two, never below 16
    (the tl.dot minimum). float32 RKD with ``precision="tf32x3"`` (hi/lo operand tiles) uses a
    64 x 64 gradient accumulator (BLOCK_DO = 64): at 128 its grad kernel spills inside the loop
    on sm_90. The interpreter uses 16-row tiles, 32-wide chunks and BLOCK_N = 32
    != BLOCK, so that small test shapes cover several row blocks, K chunks and output chunks.
    """
    if interpret:
        return {"BLOCK": 16, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_DO": 32, "num_warps": 1}
    block = min(64, max(16, pow2(batch)))
    block_k = 16 if dtype == torch.float64 else 32
    # float32 dots run on the FMA units: FKD's 64 x 32 backward tile needs 255 registers and
    # spills inside the loop on sm_80, 64 x 16 does not; RKD's grad kernel is the other way
    # round on sm_90 (ptxas caps it at 128 registers and spills). See tools/gpu_static.
    block_n = 16 if dtype == torch.float32 and op == "fkd" else 32
    split_rkd = op == "rkd" and dtype == torch.float32 and precision == "tf32x3"
    return {
        "BLOCK": block,
        "BLOCK_N": min(block_n, block),
        "BLOCK_K": min(block_k, max(16, pow2(max(widths)))),
        # fp64 accumulators, and RKD's tf32x3 split tiles: half the width (registers)
        "BLOCK_DO": 64 if dtype == torch.float64 or split_rkd else 128,
        "num_warps": 8,
    }


# --------------------------------------------------------------------------------------------
# Tile helpers shared by the FKD and RKD kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b. ``PRECISION`` (:func:`dot_precision`) only applies to 32/64-bit operands."""
    if a.dtype == tl.float16 or a.dtype == tl.bfloat16:
        acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _row_norm_kernel(
    x_ptr,
    stride_r,
    stride_c,
    B,
    D,
    inv_ptr,
    sumsq_ptr,
    eps: tl.float64,
    WRITE_SUMSQ: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """inv[i] = 1 / max(||x_i||, eps) and optionally sumsq[i] = ||x_i||^2, in ACC."""
    eps = tl.full((), eps, ACC)  # a float64 argument: exact for float64, rounded once for fp32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    base = x_ptr + rows.to(tl.int64)[:, None] * stride_r
    acc = tl.zeros((BLOCK_R, BLOCK_D), ACC)
    for k in range(0, D, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        # int64 column offsets: cols * stride_c passes 2^31 for strided inputs with B*D > 2^31
        x = tl.load(base + cols.to(tl.int64)[None, :] * stride_c, mask=mask, other=0.0).to(ACC)
        acc += x * x
    sumsq = tl.sum(acc, axis=1)
    if ACC == tl.float64:
        inv = 1.0 / tl.maximum(tl.sqrt(sumsq), eps)
    else:  # correctly rounded, as torch computes it
        inv = tl.math.div_rn(1.0, tl.maximum(tl.math.sqrt_rn(sumsq), eps))
    tl.store(inv_ptr + rows, inv, mask=rmask)
    if WRITE_SUMSQ:
        tl.store(sumsq_ptr + rows, sumsq, mask=rmask)


@triton.jit
def _dot_tile(
    x_ptr,
    stride_r,
    stride_c,
    D,
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
    """Tile (rows_i, rows_j) of x x^T from the raw rows, BLOCK_K features at a time (16-bit
    inputs go to the tensor cores unmodified); 0 on padding rows/columns."""
    base_i = x_ptr + rows_i.to(tl.int64)[:, None] * stride_r
    base_j = x_ptr + rows_j.to(tl.int64)[:, None] * stride_r
    dot = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k in range(0, D, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        cmask = (cols < D)[None, :]
        col_off = cols.to(tl.int64)[None, :] * stride_c  # int64: see _row_norm_kernel
        a = tl.load(base_i + col_off, mask=mask_i[:, None] & cmask, other=0.0)
        b = tl.load(base_j + col_off, mask=mask_j[:, None] & cmask, other=0.0)
        dot = _mma(a, tl.trans(b), dot, PRECISION)
    return dot


def row_norms(
    x: torch.Tensor,
    acc: torch.dtype,
    interpret: bool,
    inv: torch.Tensor | None = None,
    sumsq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch ``_row_norm_kernel`` on (B, D) ``x``: fills and returns ``inv`` (B,) = inverse
    clamped row norms in ``acc`` (allocated if None) and, if given, ``sumsq`` (B,) = squared
    row norms."""
    batch = x.shape[0]
    if inv is None:
        inv = torch.empty(batch, dtype=acc, device=x.device)
    block_r = 16
    block_d = 16 if interpret else min(128, pow2(x.shape[1]))
    _row_norm_kernel[(triton.cdiv(batch, block_r),)](
        x, x.stride(0), x.stride(1), batch, x.shape[1], inv,
        inv if sumsq is None else sumsq, NORM_EPS,
        WRITE_SUMSQ=sumsq is not None, BLOCK_R=block_r, BLOCK_D=block_d, ACC=TL_DTYPES[acc],
    )  # fmt: skip
    return inv
