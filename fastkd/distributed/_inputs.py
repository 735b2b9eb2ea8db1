"""Local input checks of the global losses. They return the exception instead of raising it, so
the shape handshake can make every rank raise (a rank that raised alone would leave the others
waiting in a collective)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fastkd.registry import BackendUnavailableError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def features(x: object, name: str, *, flatten: bool = False) -> torch.Tensor:
    """A floating (B_r, D) tensor (or (B_r, ...) flattened when ``flatten``), B_r >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if flatten and x.dim() >= 2:
        x = x.flatten(1)
    if x.dim() != 2:
        want = "at least 2-D (batch, ...)" if flatten else "2-D (batch, features)"
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def same_rows(ref: torch.Tensor, ref_name: str, x: torch.Tensor, name: str) -> None:
    if x.shape[0] != ref.shape[0]:
        raise ValueError(f"{name} has batch size {x.shape[0]} but {ref_name} has {ref.shape[0]}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def teachers(teacher: object, student: torch.Tensor) -> list[torch.Tensor]:
    """One (B_r, Dt) tensor or a non-empty list/tuple of them -> list."""
    if isinstance(teacher, torch.Tensor):
        items = [teacher]
    elif isinstance(teacher, Sequence) and not isinstance(teacher, (str, bytes)):
        items = list(teacher)
        if not items:
            raise ValueError("teacher list must contain at least one tensor")
    else:
        raise TypeError(
            f"teacher must be a tensor or a list of tensors, got {type(teacher).__name__}"
        )
    for i, t in enumerate(items):
        name = "teacher" if len(items) == 1 else f"teacher[{i}]"
        features(t, name)
        same_rows(student, "student", t, name)
    return items


def number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def capture(check: Callable[[], object]) -> tuple[object, BaseException | None]:
    """``(check(), None)`` or ``(None, the TypeError/ValueError/BackendUnavailableError it
    raised)``."""
    try:
        return check(), None
    except (TypeError, ValueError, BackendUnavailableError) as exc:
        return None, exc


def device_of(x: object) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
