"""Argument checks of :mod:`fastkd.selfdistill`: clear errors for bad numbers and tensors.

Kept apart so they can later join the library's one validation module.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


def _check_real(value: object, name: str) -> float:
    """A finite real number (Python number or one-element tensor) as a float."""
    if isinstance(value, torch.Tensor):
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


def _check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16/32/64, bfloat16), got {x.dtype}"
        )
    return x


def _check_finite_tensor(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_alphas(alphas: object) -> list[float]:
    """``alphas`` = (alpha^(2), ..., alpha^(tau)) as a list of floats; empty means step 1."""
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
    return [_check_real(a, f"alphas[{i}]") for i, a in enumerate(alphas)]


def _check_pair(x1: object, x2: object) -> None:
    for name, x in (("x1", x1), ("x2", x2)):
        _check_tensor(x, name)
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (samples, features), got shape {tuple(x.shape)}")
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"x1 has {x1.shape[1]} features but x2 has {x2.shape[1]}")
    if x1.device != x2.device:
        raise ValueError(f"x1 is on {x1.device} but x2 is on {x2.device}")
