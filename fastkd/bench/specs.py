"""What ``fastkd bench`` measures: cases, variants and one :class:`OpSpec` per op.

An op spec holds everything the harness needs about one loss: its input maker, reference,
fused callables, algorithms, cost model and default sizes. Adding a loss to the benchmarks is
one more spec (its cost model, fused and reference callables next to it) and one entry of
:data:`OP_SPECS`; the sweep, the memory worker, the report and ``benchmarks/`` read only this
table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import fastkd
from fastkd import reference
from fastkd.losses.fkd import choose_algorithm

DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MODES = ("fwd", "bwd", "fwd+bwd")

# FKD settings used throughout: the feature regulariser is on, so every term of SPEC §1 runs.
FKD_KD_WEIGHT = 1.0
FKD_FR_WEIGHT = 0.01
SRD_P = 4.0


@dataclass(frozen=True)
class Case:
    """One benchmark point: batch B, student width D and teacher width Dt (default D)."""

    batch: int
    width: int
    teacher_width: int

    @property
    def shape_label(self) -> str:
        d = f"D{self.width}"
        if self.teacher_width != self.width:
            d += f"x{self.teacher_width}"
        return f"B{self.batch}-{d}"


def parse_sizes(text: str) -> list[Case]:
    """``"256x256,4096x512x2048"`` -> cases; each entry ``BxD`` or ``BxDsxDt`` (FKD widths)."""
    cases = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        parts = item.lower().split("x")
        if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--sizes entry {item!r} is not BxD or BxDsxDt (positive integers)")
        b, d = int(parts[0]), int(parts[1])
        if b < 2:
            raise ValueError(f"--sizes entry {item!r}: the batch must be at least 2")
        cases.append(Case(b, d, int(parts[2]) if len(parts) == 3 else d))
    if not cases:
        raise ValueError("--sizes is empty")
    return cases


@dataclass(frozen=True)
class Cost:
    """Work of one call: ``flops`` and ``bytes`` per phase, and an estimate of its peak memory."""

    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    fwd_bytes: float = 0.0
    bwd_bytes: float = 0.0
    peak_bytes: float = 0.0

    @property
    def flops(self) -> float:
        return self.fwd_flops + self.bwd_flops

    @property
    def bytes(self) -> float:
        return self.fwd_bytes + self.bwd_bytes


@dataclass
class Variant:
    """One way of computing an op's loss. ``fn(*inputs)`` returns the 0-dim loss."""

    op: str
    backend: str  # "cpu" | "cuda" | "triton" | "reference"
    impl: str  # "tiled" | "dual" | "auto" | "fused" | "eager" | "compiled"
    fn: Callable[..., torch.Tensor]
    # The algorithm actually run for a case ("auto" resolves to tiled or dual).
    algorithm: Callable[[Case], str] = lambda case: ""

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.impl}"

    @property
    def is_reference(self) -> bool:
        return self.backend == "reference"


@dataclass(frozen=True)
class OpSpec:
    """Everything the harness needs to benchmark one op.

    ``make_inputs(case, dtype, device, seed)`` returns ``(student, teacher)`` with the student
    requiring grad; ``fused(backend, algorithm)`` returns the loss callable of a fused backend;
    ``cost(case, impl, dtype)`` the work of one call; ``throughput`` says which of flops
    ("flops") or bytes ("bytes") is the meaningful rate for the fused algorithm;
    ``resolve(algorithm, case)`` the algorithm that actually runs ("auto" picks one);
    ``shared_algorithms`` run the same code on every backend (listed once, under the first);
    ``float64_algorithms`` compute in float64 whatever the input dtype (rated against the fp64
    peak); ``meta`` the op's fixed settings, recorded in bench.json.
    """

    name: str
    make_inputs: Callable[[Case, torch.dtype, torch.device, int], tuple[torch.Tensor, ...]]
    reference: Callable[..., torch.Tensor]
    fused: Callable[[str, str], Callable[..., torch.Tensor]]
    algorithms: tuple[str, ...]
    cost: Callable[[Case, str, torch.dtype], Cost]
    throughput: str
    # device type -> level -> sizes text; levels: "smoke" (the pytest-benchmark default set),
    # "quick" and "default" (fastkd bench), "full" (both, on request)
    sizes: dict[str, dict[str, str]]
    available: Callable[[], bool] = lambda: True
    same_widths: bool = False  # the op needs teacher_width == width
    resolve: Callable[[str, Case], str] = lambda algorithm, case: algorithm
    shared_algorithms: tuple[str, ...] = ()
    float64_algorithms: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)


def _features(case: Case, dtype, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(case.batch, case.width, generator=gen)
    teacher = torch.randn(case.batch, case.teacher_width, generator=gen)
    student = student.to(device=device, dtype=dtype).requires_grad_(True)
    return student, teacher.to(device=device, dtype=dtype)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def zero_grads(tensors):
    """Drop the gradients of the inputs that require grad, before a timed or measured step."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None


def _inputs(spec: OpSpec, case: Case, dtype, device, seed: int) -> tuple:
    return spec.make_inputs(case, dtype, device, seed)


# FKD (SPEC §1). Flop counts are those of the algorithms as specified:
#   tiled  forward: upper-triangle tiles of both kernels, B^2 (Ds + Dt);
#          backward: both kernels' tiles again, 2 B^2 (Ds + Dt), and (rho_S - rho_T) A, 2 B^2 Ds.
#   dual   forward: A^T A, A^T T, T^T T, 2 B (Ds^2 + Ds Dt + Dt^2) (float64);
#          backward: A^T T, A^T A, A (A^T A), T (T^T A), 4 B Ds (Ds + Dt) (float64).
#   eager  forward: both B x B kernels in full, 2 B^2 (Ds + Dt); backward 4 B^2 Ds; it also
#          streams ~18 B x B fp32 matrices through memory and keeps ~5 of them alive.
def _fkd_cost(case: Case, impl: str, dtype: torch.dtype) -> Cost:
    b, ds, dt = case.batch, case.width, case.teacher_width
    acc = 8 if dtype == torch.float64 else 4
    if impl == "auto":
        impl = choose_algorithm("auto", b, ds, dt)
    # The student requires grad in every benchmark, so the fused backends take their
    # forward-backward path: the forward pass does all the work and backward only scales.
    if impl == "tiled":
        # Upper-triangle tiles of both kernels (B^2 (Ds + Dt)) + the two half-size gradient
        # GEMMs D_IJ A_J and D_IJ^T A_I (2 B^2 Ds).
        return Cost(
            fwd_flops=b * b * (3 * ds + dt),
            bwd_flops=0,
            fwd_bytes=b * (ds + dt) * (_elem(dtype) + acc),
            bwd_bytes=b * (ds + dt) * (_elem(dtype) + acc) + 3 * b * ds * acc,
            peak_bytes=8 * b * (ds + dt) * acc,
        )
    if impl == "dual":
        # Three Grams, then G = A (A^T A) - T (T^T A) from them.
        return Cost(
            fwd_flops=2 * b * (ds * ds + ds * dt + dt * dt) + 2 * b * ds * (ds + dt),
            bwd_flops=0,
            fwd_bytes=b * (ds + dt) * (_elem(dtype) + 8),
            bwd_bytes=4 * b * (ds + dt) * 8,
            peak_bytes=8 * b * (ds + dt) * 8 + 3 * (ds + dt) ** 2 * 8,
        )
    # eager or compiled reference
    return Cost(
        fwd_flops=2 * b * b * (ds + dt),
        bwd_flops=4 * b * b * ds,
        fwd_bytes=8 * b * b * acc,
        bwd_bytes=10 * b * b * acc,
        peak_bytes=6 * b * b * acc + 8 * b * (ds + dt) * acc,
    )


def _fkd_fused(backend: str, algorithm: str) -> Callable[..., torch.Tensor]:
    def fn(student, teacher):
        return fastkd.fkd_loss(
            student, teacher, FKD_KD_WEIGHT, FKD_FR_WEIGHT, backend=backend, algorithm=algorithm
        )

    return fn


def _fkd_reference(student, teacher):
    return reference.fkd_loss(student, teacher, FKD_KD_WEIGHT, FKD_FR_WEIGHT)


def _fkd_resolve(algorithm: str, case: Case) -> str:
    return choose_algorithm(algorithm, case.batch, case.width, case.teacher_width)


FKD = OpSpec(
    name="fkd",
    make_inputs=_features,
    reference=_fkd_reference,
    fused=_fkd_fused,
    algorithms=("tiled", "dual", "auto"),
    cost=_fkd_cost,
    throughput="flops",
    resolve=_fkd_resolve,
    # the dual algorithm is plain torch GEMMs in float64 whatever the backend
    shared_algorithms=("dual",),
    float64_algorithms=("dual",),
    meta={"fkd_weights": {"kd_weight": FKD_KD_WEIGHT, "fr_weight": FKD_FR_WEIGHT}},
    sizes={
        "cpu": {
            "smoke": "130x64,1024x256",
            "quick": "256x256,1024x256,4096x256",
            "default": "256x256,1024x256,4096x256,16384x128",
            "full": "64x64,256x256,1024x256,1024x2048,2048x512,4096x64,4096x256,"
            "4096x512x2048,8192x256,16384x128",
        },
        "cuda": {
            "smoke": "1024x256,4096x256,16384x256,4096x512x2048",
            "quick": "1024x256,4096x256,16384x256",
            "default": "256x256,1024x256,4096x256,16384x128,16384x256,4096x2048,"
            "16384x2048,4096x512x2048",
            "full": "64x64,64x256,256x256,256x2048,1024x64,1024x256,1024x512,1024x2048,"
            "4096x64,4096x256,4096x512,4096x2048,4096x512x2048,16384x64,16384x128,"
            "16384x256,16384x512,16384x2048,16384x512x2048",
        },
    },
)


# SRD (SPEC §3). The fused algorithm reads both inputs in pass 1 (statistics) and pass 2 (loss
# and column sums), and again in the backward pass, which writes the student gradient.
def _srd_cost(case: Case, impl: str, dtype: torch.dtype) -> Cost:
    n, e = case.batch * case.width, _elem(dtype)
    if impl in ("eager", "compiled"):
        return Cost(
            fwd_flops=20 * n,
            bwd_flops=30 * n,
            fwd_bytes=24 * n * 4,
            bwd_bytes=30 * n * 4,
            peak_bytes=16 * n * 4,
        )
    return Cost(
        fwd_flops=12 * n,
        bwd_flops=12 * n,
        fwd_bytes=4 * n * e,
        bwd_bytes=3 * n * e,
        peak_bytes=n * e + 8 * case.width * 4,
    )


def _srd_fused(backend: str, algorithm: str) -> Callable[..., torch.Tensor]:
    def fn(student, teacher):
        return fastkd.srd_loss(student, teacher, p=SRD_P, backend=backend)

    return fn


def _srd_reference(student, teacher):
    return reference.srd_loss(student, teacher, SRD_P)


SRD = OpSpec(
    name="srd",
    make_inputs=_features,
    reference=_srd_reference,
    fused=_srd_fused,
    algorithms=("fused",),
    cost=_srd_cost,
    throughput="bytes",
    meta={"srd_p": SRD_P},
    available=lambda: hasattr(fastkd, "srd_loss"),
    same_widths=True,
    sizes={
        "cpu": {
            "smoke": "130x512,1024x2048",
            "quick": "256x2048,1024x512",
            "default": "256x2048,1024x2048,4096x512,4096x2048",
            "full": "64x512,256x512,256x2048,1024x2048,4096x512,4096x2048,16384x512",
        },
        "cuda": {
            "smoke": "1024x2048,16384x2048",
            "quick": "1024x2048,16384x2048",
            "default": "256x2048,1024x2048,4096x2048,16384x512,16384x2048,65536x2048",
            "full": "64x512,256x512,256x2048,1024x512,1024x2048,4096x512,4096x2048,"
            "16384x512,16384x2048,65536x512,65536x2048",
        },
    },
)


# RKD distance (SPEC §2). The CPU kernel sweeps the upper triangle three times (means; loss;
# gradient), each sweep forming both sides' dot-product tiles (B^2 (Ds + Dt)), and the last one
# also W_IJ F_J and W_IJ^T F_I for the student (2 B^2 Ds); the GPU kernels' gradient sweep
# visits every tile, twice that sweep's flops, but the model counts the CPU algorithm's. The
# eager reference forms both B x B dot-product matrices (2 B^2 (Ds + Dt)), back-propagates the
# student's (4 B^2 Ds) and streams ~30 B x B matrices through memory, keeping ~12 alive.
def _rkd_cost(case: Case, impl: str, dtype: torch.dtype) -> Cost:
    b, ds, dt = case.batch, case.width, case.teacher_width
    acc = 8 if dtype == torch.float64 else 4
    if impl == "tiled":
        return Cost(
            fwd_flops=3 * b * b * (ds + dt) + 2 * b * b * ds,
            fwd_bytes=4 * b * (ds + dt) * (_elem(dtype) + acc),
            peak_bytes=4 * b * (ds + dt) * acc,
        )
    return Cost(
        fwd_flops=2 * b * b * (ds + dt),
        bwd_flops=4 * b * b * ds,
        fwd_bytes=14 * b * b * acc,
        bwd_bytes=16 * b * b * acc,
        peak_bytes=12 * b * b * acc + 4 * b * (ds + dt) * acc,
    )


def _rkd_fused(backend: str, algorithm: str) -> Callable[..., torch.Tensor]:
    def fn(student, teacher):
        return fastkd.rkd_distance_loss(student, teacher, backend=backend)

    return fn


RKD = OpSpec(
    name="rkd",
    make_inputs=_features,
    reference=reference.rkd_distance_loss,
    fused=_rkd_fused,
    algorithms=("tiled",),
    cost=_rkd_cost,
    throughput="flops",
    sizes={
        "cpu": {
            "smoke": "130x64,1024x128",
            "quick": "256x128,1024x128",
            "default": "256x128,1024x128,4096x128",
            "full": "64x64,256x128,1024x128,1024x512,4096x128,4096x512,8192x64",
        },
        "cuda": {
            "smoke": "1024x128",
            "quick": "1024x128",
            "default": "1024x128,4096x128",
            "full": "1024x128,4096x128,16384x128",
        },
    },
)


OP_SPECS: dict[str, OpSpec] = {spec.name: spec for spec in (FKD, SRD, RKD)}


def device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def default_sizes(spec: OpSpec, device: torch.device | str, level: str) -> list[Case]:
    return parse_sizes(spec.sizes[device_type(device)][level])


def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, never silently falling back to eager on too many recompiles."""
    import torch._dynamo

    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn)


def fused_backends(op: str, device: torch.device | str) -> list[str]:
    """Fused backends that run ``op`` on tensors of ``device`` here, fastest first.

    Triton's CPU interpreter (``TRITON_INTERPRET=1``) is a test tool, never benchmarked.
    """
    dev = device_type(device)
    report = fastkd.available_backends()
    wanted = ("cpu",) if dev == "cpu" else ("cuda", "triton")
    names = []
    for name in wanted:
        info = report.get(name, {})
        if not info.get("available") or op not in info.get("ops", ()):
            continue
        if name == "triton":
            from fastkd.validation import interpreter_enabled

            if interpreter_enabled():
                continue
        names.append(name)
    return names


def build_variants(
    spec: OpSpec, device: torch.device | str, *, compiled: bool = True
) -> list[Variant]:
    """Fused variants of every available backend, then the eager and compiled references.

    An algorithm in ``spec.shared_algorithms`` runs the same code on every backend, so it is
    listed once, under the first backend.
    """
    variants = []
    for i, backend in enumerate(fused_backends(spec.name, device)):
        for algo in spec.algorithms:
            if algo in spec.shared_algorithms and i > 0:
                continue

            def resolved(case, algo=algo):
                return spec.resolve(algo, case)

            variants.append(Variant(spec.name, backend, algo, spec.fused(backend, algo), resolved))
    variants.append(Variant(spec.name, "reference", "eager", spec.reference, lambda c: "eager"))
    if compiled:
        variants.append(
            Variant(
                spec.name, "reference", "compiled", _compiled(spec.reference), lambda c: "compiled"
            )
        )
    return variants


def group_name(op: str, mode: str, case: Case, dtype: torch.dtype) -> str:
    """pytest-benchmark group, e.g. ``fkd-fwd+bwd-B4096-D256-fp32``: one comparison per group."""
    return f"{op}-{mode}-{case.shape_label}-{DTYPE_NAMES[dtype]}"
