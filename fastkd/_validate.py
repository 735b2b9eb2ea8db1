"""Input checks shared by every public entry point (SPEC "Bad input").

They run before any kernel, raise ``TypeError`` for wrong types/dtypes and ``ValueError`` for
wrong shapes or values, and always name the offending argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_features(x: object, name: str, *, min_batch: int = 1) -> torch.Tensor:
    """A floating (B, D) tensor with B >= ``min_batch`` and D >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, features), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if x.shape[0] < min_batch:
        raise ValueError(f"{name} needs a batch of at least {min_batch} rows, got {x.shape[0]}")
    return x


def check_same_batch_and_device(ref: torch.Tensor, ref_name: str, x: torch.Tensor, name: str):
    if x.shape[0] != ref.shape[0]:
        raise ValueError(f"{name} has batch size {x.shape[0]} but {ref_name} has {ref.shape[0]}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def check_finite_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


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
