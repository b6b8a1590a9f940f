"""NaN and Inf: found cheaply, so that no model with broken numbers is written without the user knowing."""

from __future__ import annotations

import torch

SCREEN_CHUNK = 2**18  # float16 entries widened at once for the screening sum (a cache-sized float32 copy)


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many entries are NaN or ±Inf; a sum screens the tensor without a full-size temporary.

    A NaN or Inf anywhere makes the sum non-finite; then (or when a large sum overflows) the entries are counted.
    float32, float64 and bfloat16 are summed as they are (torch accumulates bfloat16 in float32, where
    `sum(dtype=float32)` would first copy the whole tensor to float32); float16, whose own sum overflows at 65504,
    is summed in float32 a cache-sized chunk at a time.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    if _screen_is_finite(tensor):
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())  # the sum can also overflow: count exactly


def _screen_is_finite(tensor: torch.Tensor) -> bool:
    if tensor.dtype in (torch.float32, torch.float64, torch.bfloat16) or tensor.device.type != "cpu":
        total = tensor.sum() if tensor.dtype != torch.float16 else tensor.sum(dtype=torch.float32)
        return bool(torch.isfinite(total))
    flat = tensor.reshape(-1)
    return all(
        bool(torch.isfinite(flat[start : start + SCREEN_CHUNK].sum(dtype=torch.float32)))
        for start in range(0, flat.numel(), SCREEN_CHUNK)
    )
