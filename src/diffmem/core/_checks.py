"""Input validation shared by the core: fail loudly, with a message that says how to fix it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_patterns(patterns: Tensor, name: str = "patterns") -> None:
    """Patterns are a non-empty, finite, float32/float64 matrix of shape (K, D)."""
    if not isinstance(patterns, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (K, D), got {type(patterns).__name__}")
    if patterns.ndim != 2:
        raise ValueError(f"{name} must have shape (K, D), got shape {tuple(patterns.shape)}; flatten images first")
    if patterns.shape[0] == 0:
        raise ValueError(f"{name} is empty (K = 0): a memory needs at least one pattern")
    if patterns.shape[1] == 0:
        raise ValueError(f"{name} has dimension D = 0")
    if patterns.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {patterns.dtype}")
    # ||xi||^2 is NaN/Inf iff a row holds NaN/Inf (or overflows): a (K,) check with no (K, D) temporary
    if not bool(torch.isfinite(torch.linalg.vector_norm(patterns, dim=-1)).all()):
        raise ValueError(f"{name} contain NaN or Inf values; clean the data before building a memory")


def check_state(x: Tensor, like: Tensor, dim: int, name: str = "x") -> None:
    """A state x of shape (..., dim) with the same dtype and device as the patterns."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (..., {dim}), got shape {tuple(x.shape)}")
    if x.dtype != like.dtype:
        raise ValueError(
            f"{name} has dtype {x.dtype} but the patterns are {like.dtype}; cast one of them (no silent casting)"
        )
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the patterns are on {like.device}; move one of them")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def as_level(value: float | Tensor, like: Tensor, name: str, *, allow_zero: bool, allow_inf: bool = False) -> Tensor:
    """A noise level or inverse temperature as a tensor in the dtype/device of `like`, validated."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN")
    if not allow_inf and bool(torch.isinf(t).any()):
        raise ValueError(f"{name} must be finite")
    if allow_zero:
        if bool((t < 0).any()):
            raise ValueError(f"{name} must be >= 0, got min {t.min().item():.6g}")
    elif bool((t <= 0).any()):
        raise ValueError(f"{name} must be > 0, got min {t.min().item():.6g}")
    return t


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_finite_float(value: float, name: str, *, low: float | None = None, high: float | None = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v
