"""Arcee Fusion: take the other model's changes only where they matter, judged by size and by output shift.

Importance per entry is |x − base| times the KL divergence KL(softmax(x) ‖ softmax(base)) of its row (the
last dimension; +1e-8 on both distributions). Entries at or above median + 1.5 · IQR of the importances keep
the other model's value, the rest the base's. Quantiles are order statistics at ⌊q · (n − 1)⌋ as in mergekit
0.1.5, but always of the whole tensor: mergekit estimates them from 10⁶ random entries on larger tensors,
which makes its output vary from run to run there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moemerge.methods.registry import Params, base_and_other, register_against_base

PROBABILITY_FLOOR = 1e-8
QUARTILES = (0.25, 0.5, 0.75)


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x − base| · Σ_row p log(p/q), p = softmax(x) + 1e-8, q = softmax(base) + 1e-8 along the last dimension."""
    p = torch.softmax(other, dim=-1).add_(PROBABILITY_FLOOR)
    q = torch.softmax(base, dim=-1).add_(PROBABILITY_FLOOR)
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    return torch.sub(other, base).abs_().mul_(divergence)


def quartiles(values: torch.Tensor) -> list[float]:
    """The order statistics at ⌊q · (n − 1)⌋ (q computed in float32, as mergekit) for q = 1/4, 1/2, 3/4."""
    flat = values.reshape(-1)
    positions = (torch.tensor(QUARTILES, dtype=torch.float32) * (flat.numel() - 1)).long().tolist()
    return [float(torch.kthvalue(flat.cpu(), position + 1).values) for position in positions]


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[Params],
    method_params: Params,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """base + (x − base) · [importance ≥ median + 1.5 (Q3 − Q1)]."""
    base, other = base_and_other(tensors, base)
    scores = importance(other, base)
    first, median, third = quartiles(scores)
    fused = scores >= median + 1.5 * (third - first)
    del scores
    return other.sub_(base).mul_(fused).add_(base)


register_against_base("arcee_fusion", merge)
