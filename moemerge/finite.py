"""NaN and Inf: found cheaply, so that no model with broken numbers is written without the user knowing."""

from __future__ import annotations

import torch


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many entries are NaN or ±Inf; a float32 sum screens the tensor without a full-size temporary."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return 0  # a NaN or Inf anywhere makes the sum non-finite
    return int(tensor.numel() - torch.isfinite(tensor).sum())  # the sum can also overflow: count exactly
