"""Input checks: the one validation module of fastkd (SPEC "Bad input").

Every public entry point (the losses, the Triton ops, :mod:`fastkd.selfdistill`) validates its
arguments here before any kernel runs. The checks raise ``TypeError`` for a wrong type or dtype
and ``ValueError`` for a wrong shape, device or value, and always name the offending argument.
They return the checked value (a float for numbers, the tensor or a flattened view for tensors)
so callers can write ``x = check_...(x, "x")``.

Groups:
  numbers   :func:`check_real`, :func:`check_finite_number`, :func:`check_momentum`
  tensors   :func:`check_tensor`, :func:`check_finite_tensor`, :func:`check_features`,
            :func:`check_teachers`, :func:`check_same_batch_and_device`, :func:`check_pair`
  SRD       :func:`check_buffer`, :func:`check_srd_args`
  choices   :func:`check_algorithm`, :func:`check_bool`
  selfdist. :func:`check_kernel_inputs`, :func:`check_alphas`
  Triton    :func:`interpreter_enabled`, :func:`check_triton_device`,
            :func:`check_triton_inputs`, :func:`check_grad`
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------ numbers


def check_real(value: object, name: str, *, allow_tensor: bool = True) -> float:
    """A finite real number as a float: a Python/NumPy real, or (if ``allow_tensor``) a
    one-element non-bool real tensor (read with ``.item()``, a host sync on a GPU)."""
    if isinstance(value, torch.Tensor) and allow_tensor:
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_finite_number(value: object, name: str) -> float:
    """A finite real Python number (not a tensor: a loss weight stays a graph constant)."""
    return check_real(value, name, allow_tensor=False)


def check_momentum(momentum: object, name: str = "momentum") -> float:
    """A running-statistics momentum: finite, in [0, 1]."""
    momentum = check_finite_number(momentum, name)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {momentum}")
    return momentum


# ------------------------------------------------------------------------------------ tensors


def check_tensor(x: object, name: str) -> torch.Tensor:
    """A tensor of a floating dtype (float16, bfloat16, float32 or float64), any shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )
    return x


def check_finite_tensor(x: torch.Tensor, name: str) -> torch.Tensor:
    """No NaN or Inf in ``x`` (reads the data: a host sync on a GPU)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def check_features(
    x: object, name: str, *, min_batch: int = 1, flatten: bool = False
) -> torch.Tensor:
    """A non-empty floating (B, D) tensor with B >= ``min_batch``.

    With ``flatten`` a (B, ...) tensor of at least 2 dims is accepted and returned as its
    (B, D) view ``x.flatten(1)`` (SP and RKD take feature maps); otherwise it must be 2-D and is
    returned as given.
    """
    check_tensor(x, name)
    if flatten:
        if x.dim() < 2:
            raise ValueError(
                f"{name} must have a batch and a feature dimension, got {tuple(x.shape)}"
            )
    elif x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, features), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if x.shape[0] < min_batch:
        raise ValueError(f"{name} needs a batch of at least {min_batch} rows, got {x.shape[0]}")
    return x.flatten(1) if flatten else x


def check_same_batch_and_device(
    ref: torch.Tensor, ref_name: str, x: torch.Tensor, name: str
) -> None:
    """``x`` has ``ref``'s batch size (dim 0) and device."""
    if x.shape[0] != ref.shape[0]:
        raise ValueError(f"{name} has batch size {x.shape[0]} but {ref_name} has {ref.shape[0]}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def check_pair(
    student: object, teacher: object, *, min_batch: int = 2, flatten: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher features of a relational loss (SP, RKD): (B, ...) each, same batch
    size and device, B >= ``min_batch``; returned as (B, D) views if ``flatten``."""
    student = check_features(student, "student", min_batch=min_batch, flatten=flatten)
    teacher = check_features(teacher, "teacher", min_batch=min_batch, flatten=flatten)
    check_same_batch_and_device(student, "student", teacher, "teacher")
    return student, teacher


def check_teachers(
    teachers: object, student: torch.Tensor, *, min_batch: int
) -> list[torch.Tensor]:
    """One (B, Dt) tensor or a non-empty list/tuple of (B, Dt_e) tensors -> list."""
    if isinstance(teachers, torch.Tensor):
        teachers = [teachers]
    elif isinstance(teachers, Sequence) and not isinstance(teachers, (str, bytes)):
        teachers = list(teachers)
        if not teachers:
            raise ValueError("teacher list must contain at least one tensor")
    else:
        raise TypeError(
            f"teacher must be a tensor or a list of tensors, got {type(teachers).__name__}"
        )
    for i, t in enumerate(teachers):
        name = "teacher" if len(teachers) == 1 else f"teacher[{i}]"
        check_features(t, name, min_batch=min_batch)
        check_same_batch_and_device(student, "student", t, name)
    return teachers


# ---------------------------------------------------------------------------------------- SRD


def check_buffer(buf: object, name: str, like: torch.Tensor) -> torch.Tensor | None:
    """None, or a floating (D,) tensor on ``like``'s device, D = ``like.shape[1]``."""
    if buf is None:
        return None
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(buf).__name__}")
    if buf.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {buf.dtype}")
    width = like.shape[1]
    if tuple(buf.shape) != (width,):
        raise ValueError(f"{name} must have shape ({width},), got {tuple(buf.shape)}")
    if buf.device != like.device:
        raise ValueError(f"{name} is on {buf.device} but the features are on {like.device}")
    return buf


def check_srd_args(
    student: object,
    teacher: object,
    p: object,
    eps: object,
    training: object,
    buffers: Mapping[str, torch.Tensor | None],
) -> tuple[float, float]:
    """SPEC "Bad input" for SRD; returns (p, eps) as floats.

    student and teacher: (B, D) of one shape and device; p >= 1; eps > 0; training a bool
    (B >= 2 when training, as nn.BatchNorm1d); ``buffers`` maps ``running_{mean,var}_{s,t}`` to
    (D,) tensors or None, given in (mean, var) pairs, all four needed in eval mode.
    """
    check_features(student, "student")
    check_features(teacher, "teacher")
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher has shape {tuple(teacher.shape)} but student has {tuple(student.shape)}: "
            "SRD compares them element by element (project the student first, as SRDLoss does)"
        )
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
    p = check_finite_number(p, "p")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    eps = check_finite_number(eps, "eps")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if training and student.shape[0] < 2:
        raise ValueError(
            "student: expected more than 1 value per channel when training (batch size 1), "
            "as nn.BatchNorm1d"
        )
    for name, buf in buffers.items():
        check_buffer(buf, name, student)
    for side in ("s", "t"):
        mean, var = buffers[f"running_mean_{side}"], buffers[f"running_var_{side}"]
        if (mean is None) != (var is None):
            missing = f"running_var_{side}" if var is None else f"running_mean_{side}"
            raise ValueError(f"{missing} is None but its pair is given: pass both or neither")
    if not training:
        missing = [name for name, buf in buffers.items() if buf is None]
        if missing:
            raise ValueError(f"eval mode (training=False) needs the running statistics: {missing}")
    return p, eps


# ------------------------------------------------------------------------------------ choices


def check_algorithm(algorithm: object, choices: Sequence[str]) -> str:
    """``algorithm`` is one of ``choices`` (a loss's ALGORITHMS tuple, "auto" first)."""
    if algorithm not in choices:
        raise ValueError(f"algorithm must be one of {tuple(choices)}, got {algorithm!r}")
    return algorithm


PRECISIONS = ("ieee", "tf32x3", "tf32")


def check_precision(precision: object) -> str:
    """``precision`` of FKD and RKD (SPEC §6): "ieee" (full fp32 products, the default),
    "tf32x3" (split fp32 on tensor cores, ~fp32 accuracy) or "tf32" (one TF32 product, ~1e-3
    relative). A ``str``; anything else is a TypeError, an unknown name a ValueError."""
    if not isinstance(precision, str):
        raise TypeError(f"precision must be a str, got {type(precision).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def check_bool(value: object, name: str) -> bool:
    """A Python bool (a flag such as ``training`` or ``global_batch``; 0/1 ints are refused so
    that a misplaced positional argument is caught)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------- Triton


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``; it must be
    set before Triton is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_device(x: torch.Tensor, name: str = "student") -> bool:
    """Raise unless Triton can run on ``x``'s device (CUDA, or the CPU under the interpreter);
    return whether it interprets."""
    interpret = interpreter_enabled()
    expected = "cpu" if interpret else "cuda"
    if x.device.type != expected:
        how = "CPU tensors (TRITON_INTERPRET=1)" if interpret else "CUDA tensors"
        raise ValueError(f"{name} is on {x.device}, but the Triton backend runs on {how}")
    return interpret


def check_triton_inputs(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Device and dtype checks of a Triton op on already validated inputs (name -> tensor, the
    first one fixes the device); returns whether the interpreter runs them. The interpreter
    computes through NumPy, which has no bfloat16, so bfloat16 inputs are refused there."""
    (first_name, first), *_ = tensors.items()
    interpret = check_triton_device(first, first_name)
    if interpret:
        for name, x in tensors.items():
            if x.dtype == torch.bfloat16:
                raise TypeError(f"{name} is bfloat16, which the Triton interpreter cannot compute")
    return interpret


def check_grad(grad: object, like: torch.Tensor, like_name: str = "student") -> torch.Tensor:
    """The upstream gradient of a backward op: a one-element tensor on ``like``'s device."""
    if not isinstance(grad, torch.Tensor) or grad.numel() != 1:
        raise ValueError(f"grad must be a one-element tensor, got {getattr(grad, 'shape', grad)}")
    if grad.device != like.device:
        raise ValueError(f"grad is on {grad.device} but {like_name} is on {like.device}")
    return grad


# ------------------------------------------------------------------------- self-distillation


def check_kernel_inputs(x1: object, x2: object) -> None:
    """Two floating sample matrices (N1, F) and (N2, F) on one device (kernel functions)."""
    for name, x in (("x1", x1), ("x2", x2)):
        check_tensor(x, name)
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (samples, features), got shape {tuple(x.shape)}")
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"x1 has {x1.shape[1]} features but x2 has {x2.shape[1]}")
    if x1.device != x2.device:
        raise ValueError(f"x1 is on {x1.device} but x2 is on {x2.device}")


def check_alphas(alphas: object) -> list[float]:
    """``alphas`` = (alpha^(2), ..., alpha^(tau)) as a list of floats; None or empty: step 1."""
    if alphas is None:
        return []
    if not isinstance(alphas, torch.Tensor) and hasattr(alphas, "__array__"):
        alphas = torch.as_tensor(alphas)  # NumPy arrays and scalars
    if isinstance(alphas, torch.Tensor):
        if alphas.dim() > 1:
            raise ValueError(f"alphas must be a 1-D sequence, got shape {tuple(alphas.shape)}")
        alphas = alphas.reshape(-1).tolist()
    elif isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence):
        raise TypeError(
            f"alphas must be a sequence of numbers (alpha^(2), ..., alpha^(tau)), "
            f"got {type(alphas).__name__}"
        )
    return [check_real(a, f"alphas[{i}]") for i, a in enumerate(alphas)]
