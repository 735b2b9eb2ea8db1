"""Every Triton kernel of fastkd, in every configuration its dispatcher can choose, compiled for
sm_80 and sm_90 through Triton's real compiler (no GPU: see :mod:`.driver`).

A :class:`Variant` is one launch as the host code would issue it: the kernel, its arguments by
parameter name (pointers as ``MockTensor(dtype)``, so only dtype and 16-byte alignment are
specialised; integers as the launch code passes them, so ``stride == 1`` and multiples of 16
specialise as they would on a GPU), its constexprs from the module's own block-config function,
and ``num_warps``. Arguments go by keyword, so a kernel whose signature changed without the
gate fails loudly here.

Configurations: dtype (float16, bfloat16, float32, float64) x precision (float32: "ieee",
"tf32x3" and "tf32", the op argument of SPEC §6) x block config (the modules' heuristics at
representative (B, D)) x constexpr flags.
``sweep="ci"`` is the subset ``make test`` affords; ``sweep="full"`` adds more shapes, ensemble
sizes, the atomic forward, every backward flag combination, strided inputs and mixed dtypes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

# The caller (CLI, test subprocess) has unset TRITON_INTERPRET before this import.
import triton
import triton.language as tl
from triton.runtime.jit import MockTensor

from tools.gpu_static import machine_code
from tools.gpu_static.driver import use_arch

DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_TL[torch.float64] = tl.float64


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ptr(dtype: torch.dtype) -> MockTensor:
    return MockTensor(dtype)


PRECISIONS = ("ieee", "tf32x3", "tf32")


def _precisions(dtype: torch.dtype, sweep: str) -> list[str]:
    """PRECISION values the launch code can choose (``fastkd.triton._common.dot_precision``):
    float32 all three of the op's ``precision`` argument, in every sweep (the tf32 / tf32x3
    kernels must reach the tensor cores); other dtypes "ieee" (16-bit tl.dot ignores it,
    float64 only has IEEE)."""
    return list(PRECISIONS) if dtype == torch.float32 else ["ieee"]


def _tensor_cores(op: str, dname: str, precision: str) -> bool | None:
    """Whether a hot FKD/RKD tile kernel must use tensor cores: 16-bit FKD (products exact in
    the fp32 accumulator) and float32 "tf32" / "tf32x3" FKD and RKD (issue 13 item 1). None:
    reported only (16-bit RKD, float32 "ieee" which is FMA by definition, float64)."""
    if precision in ("tf32", "tf32x3"):
        return True
    if op == "fkd" and dname.split("+")[0] in ("fp16", "bf16"):  # student 16-bit
        return True
    return None


def _find(name: str, *modules: str):
    """``name`` from the first of ``modules`` that defines it (helpers move between the op
    modules and ``fastkd.triton._common``)."""
    import importlib

    for mod in modules:
        try:
            module = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"none of {modules} defines {name}")


_FKD_MODS = ("fastkd.triton.fkd", "fastkd.triton._common")


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@dataclass
class Variant:
    """One kernel launch configuration to compile."""

    op: str  # "fkd", "rkd", "srd"
    kernel: str  # the @triton.jit function's name
    config: str  # human-readable configuration
    dtype: str  # input dtype (key of DTYPES, or "fp16+fp32" for mixed)
    precision: str
    hot: bool  # the O(B^2 D) tile kernels and O(B D) sweeps: no spills in loops
    tensor_cores: bool | None  # True: must use mma/wgmma; None: reported only
    fn: object = field(repr=False)
    kwargs: dict = field(repr=False)
    num_warps: int = 4

    @property
    def key(self) -> tuple:
        return (self.op, self.kernel, self.config)


@dataclass
class Result:
    variant: Variant
    arch: int
    seconds: float
    error: str | None = None
    ptx: machine_code.PtxStats | None = None
    res: machine_code.Resources | None = None
    sass: machine_code.SassStats | None = None
    shared: int = 0


def _error_summary(exc: Exception) -> str:
    """The innermost cause of a (nested) compiler error, without the echoed source."""
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(nxt)
    root = chain[-1]
    lines = [ln.strip() for ln in str(root).strip().splitlines() if ln.strip()]
    return f"{type(root).__name__}: {lines[-1] if lines else ''}"[:300]


def compile_variant(v: Variant, arch: int) -> Result:
    """Compile ``v`` for sm_<arch> and read its machine code (errors are results, not raised)."""
    use_arch(arch)
    start = time.perf_counter()
    try:
        kernel = v.fn.warmup(grid=(1,), num_warps=v.num_warps, **v.kwargs)
    except Exception as exc:  # the compiler's error is the finding
        return Result(v, arch, time.perf_counter() - start, error=_error_summary(exc))
    seconds = time.perf_counter() - start
    ptx = machine_code.PtxStats.parse(kernel.asm["ptx"])
    res, sass = machine_code.cubin_stats(kernel.asm["cubin"])
    return Result(v, arch, seconds, ptx=ptx, res=res, sass=sass, shared=kernel.metadata.shared)


# ---------------------------------------------------------------------------------------------
# FKD
# ---------------------------------------------------------------------------------------------

# (B, D) per sweep: B picks BLOCK (64 from B >= 64), D picks BLOCK_K and BLOCK_DO.
_SHAPES = {"ci": [(4096, 512)], "full": [(4096, 512), (1000, 96), (24, 20), (8, 8)]}


def _label(batch: int, width: int, cfg: dict, block_do: int) -> str:
    return (
        f"B={batch} D={width} BLOCK={cfg['BLOCK']}x{cfg['BLOCK_N']} K={cfg['BLOCK_K']} "
        f"DO={block_do} w={cfg['num_warps']}"
    )


def _fkd_variants(sweep: str) -> Iterator[Variant]:
    block_config = _find("block_config", *_FKD_MODS)
    combos = [(d, d) for d in ("fp16", "bf16", "fp32", "fp64")]
    if sweep == "full":
        combos.append(("fp16", "fp32"))  # student fp16, teacher fp32: fp32 accumulation
    for s_name, t_name in combos:
        s_dt, t_dt = DTYPES[s_name], DTYPES[t_name]
        widest = max(s_dt, t_dt, key=_bits)
        acc = _acc(widest)
        dname = s_name if s_name == t_name else f"{s_name}+{t_name}"
        seen = set()
        for i, (batch, width) in enumerate(_SHAPES[sweep]):
            cfg = block_config(batch, [width, width], widest, interpret=False)
            block_do = min(cfg["BLOCK_DO"], max(16, _pow2(width)))
            if (key := (tuple(sorted(cfg.items())), block_do)) in seen:
                continue
            seen.add(key)
            yield from _fkd_for_config(
                sweep, i == 0, dname, s_dt, t_dt, acc, batch, width, cfg, block_do
            )


# Backward flag sets (TARGET, HAS_FR, LOSS): the fused step's student, a teacher's gradient;
# the full sweep adds the backward op's student with and without fr, and LOSS alone.
_BWD_FLAGS = [(0, True, True), (1, False, False)]
_BWD_FLAGS_FULL = _BWD_FLAGS + [(0, False, False), (0, True, False), (0, False, True)]


def _fkd_for_config(sweep, main, dname, s_dt, t_dt, acc, batch, width, cfg, block_do):
    """The kernels at one block config. The full sweep varies one axis at a time at the main
    shape (strided inputs, ensemble slots 3 and 8, the atomic forward, every backward flag
    set) rather than their product, which would be thousands of compilations."""
    fwd = _find("_fkd_forward_kernel", *_FKD_MODS)
    bwd = _find("_fkd_backward_kernel", *_FKD_MODS)
    label = _label(batch, width, cfg, block_do)
    # float32 in either input: the launch code passes the op's precision (fp32 accumulation)
    any_fp32 = torch.float32 in (s_dt, t_dt)
    # one axis off the base (contiguous, 1 slot, deterministic, the two common flag sets)
    axes = [{}]
    if sweep == "full" and main:
        slots = _find("max_teacher_slots", *_FKD_MODS)(max(s_dt, t_dt, key=_bits), s_dt != t_dt)
        axes += [{"transposed": True}, {"num_t": 3}, {"num_t": slots}, {"atomic": True}]
        axes += [{"flags": _BWD_FLAGS_FULL[2:]}]
    for precision in _precisions(torch.float32 if any_fp32 else s_dt, sweep):
        for ax in axes:
            transposed, num_t = ax.get("transposed", False), ax.get("num_t", 1)
            # contiguous: stride_c == 1 specialises to a constant; transposed: stride_c = B
            stride_r, stride_c = (1, batch) if transposed else (width, 1)
            common = dict(
                s_ptr=_ptr(s_dt), s_stride_r=stride_r, s_stride_c=stride_c, s_width=width,
                t_ptrs=tuple(_ptr(t_dt) for _ in range(num_t)),
                t_strides_r=(stride_r,) * num_t, t_strides_c=(stride_c,) * num_t,
                t_widths=(width,) * num_t, inv_ptr=_ptr(acc), B=batch, t_weight=1.0 / 3,
                ACC=_TL[acc], PRECISION=precision,
            )  # fmt: skip
            where = f"{label} T={num_t}" + (" transposed" if transposed else "")
            if "flags" not in ax:
                atomic = ax.get("atomic", False)
                yield Variant(
                    "fkd", "_fkd_forward_kernel", where + (" atomic" if atomic else ""),
                    dname, precision, True, _tensor_cores("fkd", dname, precision), fwd,
                    dict(common, out_ptr=_ptr(acc), NUM_T=num_t, ATOMIC=atomic,
                         BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"]),
                    cfg["num_warps"],
                )  # fmt: skip
            if "atomic" in ax:
                continue
            for target, has_fr, loss in ax.get("flags", _BWD_FLAGS if main else _BWD_FLAGS[:1]):
                y_dt = s_dt if target == 0 else t_dt
                what = ("student" if target == 0 else "teacher") + (" +fr" if has_fr else "")
                yield Variant(
                    "fkd", "_fkd_backward_kernel", f"{where} {what}" + (" +loss" * loss),
                    dname, precision, True, _tensor_cores("fkd", dname, precision), bwd,
                    dict(common, y_ptr=_ptr(y_dt), y_stride_r=stride_r, y_stride_c=stride_c,
                         y_width=width, y_inv_ptr=_ptr(acc), out_ptr=_ptr(y_dt),
                         out_stride_r=width, out_stride_c=1, grad_ptr=_ptr(acc), kd_scale=0.5,
                         fr_scale=0.25, loss_ptr=_ptr(acc), NUM_T=num_t, TARGET=target,
                         HAS_FR=has_fr, LOSS=loss, BLOCK_M=cfg["BLOCK"],
                         BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_DO=block_do),
                    cfg["num_warps"],
                )  # fmt: skip
    if main:
        yield from _row_norm_variants(sweep, dname, {s_dt, t_dt}, acc, batch, width)


def _row_norm_variants(sweep, dname, dtypes, acc, batch, width):
    """Row norms (O(B D), once per input and call): not hot. Launched as ``row_norms`` does."""
    kernel = _find("_row_norm_kernel", *_FKD_MODS)
    block_d = min(128, _pow2(width))
    for x_dt in sorted(dtypes, key=str):
        for sumsq in [True, False] if sweep == "full" else [True]:
            yield Variant(
                "fkd", "_row_norm_kernel",
                f"D={width} BLOCK_D={block_d}" + (" +sumsq" if sumsq else "")
                + f" x={str(x_dt).removeprefix('torch.')}",
                dname, "ieee", False, None, kernel,
                dict(x_ptr=_ptr(x_dt), stride_r=width, stride_c=1, B=batch, D=width,
                     inv_ptr=_ptr(acc), sumsq_ptr=_ptr(acc), eps=1e-12, WRITE_SUMSQ=sumsq,
                     BLOCK_R=16, BLOCK_D=block_d, ACC=_TL[acc]),
                4,
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# RKD
# ---------------------------------------------------------------------------------------------


def _rkd_variants(sweep: str) -> Iterator[Variant]:
    block_config = _find("block_config", "fastkd.triton.rkd", *_FKD_MODS)
    sums = _find("_rkd_sums_kernel", "fastkd.triton.rkd")
    grad = _find("_rkd_grad_kernel", "fastkd.triton.rkd")
    full = sweep == "full"
    for dname in ("fp16", "bf16", "fp32", "fp64"):
        dt = DTYPES[dname]
        acc = _acc(dt)
        seen = set()
        for batch, width in _SHAPES[sweep][:3]:  # (8, 8) adds no RKD config
            cfg = block_config(batch, [width, width], dt, interpret=False, op="rkd")
            block_do = min(cfg["BLOCK_DO"], max(16, _pow2(width)))
            if (key := (tuple(sorted(cfg.items())), block_do)) in seen:
                continue
            seen.add(key)
            for precision in _precisions(dt, sweep):
                # the launch code's config for this precision (tf32x3 narrows BLOCK_DO)
                cfg = block_config(
                    batch, [width, width], dt, interpret=False, op="rkd", precision=precision
                )
                block_do = min(cfg["BLOCK_DO"], max(16, _pow2(width)))
                label = _label(batch, width, cfg, block_do)
                common = dict(
                    s_ptr=_ptr(dt), s_stride_r=width, s_stride_c=1, s_width=width,
                    t_ptr=_ptr(dt), t_stride_r=width, t_stride_c=1, t_width=width,
                    sq_ptr=_ptr(acc), B=batch, scal_ptr=_ptr(acc), ACC=_TL[acc],
                    PRECISION=precision,
                )  # fmt: skip
                for loss in [False, True] if full else [True]:
                    yield Variant(
                        "rkd", "_rkd_sums_kernel", f"{label} " + ("loss" if loss else "means"),
                        dname, precision, True, _tensor_cores("rkd", dname, precision), sums,
                        dict(common, out_ptr=_ptr(acc), LOSS=loss, BLOCK=cfg["BLOCK"],
                             BLOCK_K=cfg["BLOCK_K"]),
                        cfg["num_warps"],
                    )  # fmt: skip
                for teacher in [False, True] if full else [False]:
                    yield Variant(
                        "rkd", "_rkd_grad_kernel", f"{label} " + ("teacher" if teacher
                                                               else "student"),
                        dname, precision, True, _tensor_cores("rkd", dname, precision), grad,
                        dict(common, y_ptr=_ptr(dt), y_stride_r=width, y_stride_c=1,
                             y_width=width, out_ptr=_ptr(dt), out_stride_r=width,
                             out_stride_c=1, TEACHER=teacher, BLOCK_M=cfg["BLOCK"],
                             BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_DO=block_do),
                        cfg["num_warps"],
                    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# SRD
# ---------------------------------------------------------------------------------------------

SM_COUNT = 132  # H100 SXM: the launch heuristic's input (programs = 4 x SMs)


def _srd_variants(sweep: str) -> Iterator[Variant]:
    from fastkd.triton import srd

    full = sweep == "full"
    shapes = [(4096, 512), (256, 20)] if full else [(4096, 512)]
    powers = [(2, "p=2"), (0, "p=4.5 (pow)")] if full else [(2, "p=2")]
    for dname in ("fp16", "bf16", "fp32", "fp64"):
        dt = DTYPES[dname]
        acc = _acc(dt)
        tl_acc = _TL[acc]
        for batch, width in shapes:
            cfg = srd._launch_config(batch, width, None, sm_count=SM_COUNT)
            label = f"B={batch} D={width} BLOCK={cfg['BLOCK_B']}x{cfg['BLOCK_D']}"
            rows = cfg["rows_per_split"]
            tiles = dict(BLOCK_B=cfg["BLOCK_B"], BLOCK_D=cfg["BLOCK_D"])
            sides = dict(zs_ptr=_ptr(dt), zt_ptr=_ptr(dt), B=batch, D=width, rows_per_split=rows)
            yield Variant(
                "srd", "_stats_partial_kernel", label, dname, "ieee", True, None,
                srd._stats_partial_kernel,
                dict(sides, part_ptr=_ptr(acc), n_splits=cfg["n_splits"], ACC=tl_acc, **tiles),
            )  # fmt: skip
            yield Variant(
                "srd", "_stats_finalize_kernel", label, dname, "ieee", False, None,
                srd._stats_finalize_kernel,
                dict(sides, part_ptr=_ptr(acc), stats_s_ptr=_ptr(acc), stats_t_ptr=_ptr(acc),
                     n_splits=cfg["n_splits"], eps=1e-5, ACC=tl_acc, BLOCK_D=cfg["BLOCK_D"]),
            )  # fmt: skip
            stats = dict(stats_s_ptr=_ptr(acc), stats_t_ptr=_ptr(acc), p=4.5, ACC=tl_acc)
            for p_int, p_label in powers:
                yield Variant(
                    "srd", "_sums_partial_kernel", f"{label} {p_label}", dname, "ieee", True,
                    None, srd._sums_partial_kernel,
                    dict(sides, **stats, part_ptr=_ptr(acc), P_INT=p_int, USE_LIBDEVICE=True,
                         **tiles),
                )  # fmt: skip
                for training, teacher_grad in (
                    [(True, True), (False, False)] if full else [(True, True)]
                ):
                    what = ("train" if training else "eval") + (" +teacher" * teacher_grad)
                    yield Variant(
                        "srd", "_backward_kernel", f"{label} {p_label} {what}", dname, "ieee",
                        True, None, srd._backward_kernel,
                        dict(sides, **stats, grad_ptr=_ptr(acc), total_ptr=_ptr(acc),
                             sums_ptr=_ptr(acc), gs_ptr=_ptr(dt), gt_ptr=_ptr(dt),
                             tiny=1.1754943508222875e-38, P_INT=p_int, USE_LIBDEVICE=True,
                             TRAINING=training, TEACHER_GRAD=teacher_grad, **tiles),
                    )  # fmt: skip


def variants(sweep: str = "ci", ops: tuple[str, ...] = ("fkd", "rkd", "srd")) -> list[Variant]:
    """All configurations of ``sweep`` ("ci" or "full") for the ``ops``."""
    makers = {"fkd": _fkd_variants, "rkd": _rkd_variants, "srd": _srd_variants}
    return [v for op in ops for v in makers[op](sweep)]


def compile_all(
    vs: list[Variant], archs: tuple[int, ...], log=None
) -> list[Result]:  # pragma: no cover - exercised through the CLI
    results = []
    for v in vs:
        for arch in archs:
            r = compile_variant(v, arch)
            results.append(r)
            if log is not None:
                status = "compile error" if r.error else "compiled"
                log(f"[{r.seconds:6.1f}s] sm_{arch} {v.op} {v.kernel} {v.dtype} {v.precision} "
                    f"{v.config}: {status}")  # fmt: skip
    return results


def default_cache_dir() -> str:
    """Compile cache under build/ (reruns are fast); TRITON_CACHE_DIR wins if set."""
    return os.environ.get("TRITON_CACHE_DIR") or os.path.abspath("build/triton-gate-cache")
