"""Task-vector arithmetic shared by task arithmetic, TIES, DARE and breadcrumbs: sign election and the final sum.

Each method turns its inputs into weighted task vectors w_i·δ̃_i (δ_i = x_i − base, sparsified its own way);
this module elects the sign (TIES) and adds them back onto the base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from moemerge.methods.registry import Params

NEGLIGIBLE_WEIGHT_SUM = 1e-8


class TaskVectorParams(Params):
    """Method-level keys every task-vector method accepts (mergekit's names)."""

    lambda_: float = Field(1.0, alias="lambda")  # scales the merged task vector before it is added to the base
    rescale: bool = False  # scale each sparsified task vector back to its unpruned L1 norm
    int8_mask: bool = False  # mergekit's memory trick; accepted so recipes run unchanged, no effect on the math


def task_vector(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """δ = x − base: what fine-tuning changed."""
    return tensor - base


def elect_sign(weighted_deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election: sign(Σ_i w_i δ̃_i) per entry, a zero total counting as +; returns ±1 in the math dtype."""
    total = torch.zeros_like(weighted_deltas[0])
    for weighted in weighted_deltas:
        total += weighted
    positive = torch.ones((), dtype=total.dtype, device=total.device)
    return torch.where(total >= 0, positive, -positive)


def add_task_vectors(
    base: torch.Tensor,
    weighted_deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_consensus: bool,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """base + λ · Σ_i m_i w_i δ̃_i, divided by Σ_i m_i w_i when `normalize` (a zero divisor counts as 1).

    With `sign_consensus` m_i = [sign(w_i δ̃_i) = elected sign] per entry (zeros never agree); without it m_i = 1
    and the divisor is the scalar Σ_i w_i (|Σ w_i| < 1e-8 counts as 1, so float dust does not blow the sum up).
    """
    if not sign_consensus:
        mixed = torch.zeros_like(base)
        for weighted in weighted_deltas:
            mixed += weighted
        if normalize:
            divisor = sum(weights)
            mixed /= divisor if abs(divisor) >= NEGLIGIBLE_WEIGHT_SUM else 1.0
        return base + scale * mixed

    elected = elect_sign(weighted_deltas)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base) if normalize else None
    for weighted, weight in zip(weighted_deltas, weights, strict=True):
        agrees = torch.sign(weighted) == elected
        mixed += weighted.masked_fill(~agrees, 0)
        if divisor is not None:
            divisor += agrees.to(divisor.dtype) * weight
    if divisor is not None:
        divisor[divisor == 0] = 1
        mixed /= divisor
    return base + scale * mixed
