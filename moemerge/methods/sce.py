"""SCE (Wan et al., 2024): select the entries where the task vectors disagree most, weigh, erase, merge.

Select: with `select_topk` < 1, keep int(select_topk · n) entries of largest variance across the task vectors,
n counting the entries of non-zero variance (ties at the cut go to the lowest flat index; mergekit's topk
keeps an arbitrary subset). Calculate: each task vector weighs s_i = mean(δ_i²) / Σ_j mean(δ_j²), uniform when
that sum is below 1e-6 (mergekit 0.1.5's rule, which small task vectors meet). Erase: entries whose sign
differs from the sign of Σ_i δ_i (zeros never agree) are dropped.
Merge: base + Σ_i s_i m_i δ_i / max(Σ_i s_i m_i, 1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from moemerge.methods.registry import MergeMethod, NoParams, Params, register
from moemerge.methods.sparsify import keep_count, top_magnitude_mask

WEIGHT_FLOOR = 1e-6


class SceParams(Params):
    select_topk: float = Field(1.0, ge=0.0, le=1.0)  # fraction of the varying entries kept
    int8_mask: bool = False  # mergekit's memory trick; accepted so recipes run unchanged, no effect on the math


def selection_mask(deltas: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """True on the int(select_topk · #non-zero variance) entries whose variance across the task vectors is largest."""
    stacked = torch.stack(list(deltas))
    variance = stacked.var(dim=0, unbiased=False)
    del stacked
    count = keep_count(select_topk, int(torch.count_nonzero(variance)))
    return top_magnitude_mask(variance, count)


def task_vector_weights(deltas: Sequence[torch.Tensor]) -> list[float]:
    """s_i = mean(δ_i²) / Σ_j mean(δ_j²), or 1/n each when that sum is below 1e-6."""
    energies = [float(torch.sum(delta * delta, dtype=torch.float64)) / max(delta.numel(), 1) for delta in deltas]
    total = sum(energies)
    if abs(total) < WEIGHT_FLOOR:
        return [1.0 / len(deltas)] * len(deltas)
    return [energy / total for energy in energies]


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[Params],
    method_params: SceParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """base + Σ_i s_i m_i δ̃_i / max(Σ_i s_i m_i, 1e-6), δ̃_i the selected entries, m_i sign agreement."""
    assert base is not None
    dtype = torch.promote_types(base.dtype, torch.float32)
    deltas = [tensor.to(dtype) - base for tensor in tensors]
    if method_params.select_topk < 1.0:
        selected = selection_mask(deltas, method_params.select_topk)
        for delta in deltas:
            delta.mul_(selected)
        del selected
    weights = task_vector_weights(deltas)
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total += delta
    positive = total >= 0
    del total
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        agrees = torch.where(positive, delta > 0, delta < 0).to(dtype)
        mixed.add_(delta * agrees, alpha=weight)
        divisor.add_(agrees, alpha=weight)
    return mixed.div_(divisor.clamp_(min=WEIGHT_FLOOR)).add_(base)


register(
    MergeMethod(
        name="sce",
        merge=merge,
        model_params=NoParams,
        method_params=SceParams,
        uses_base=True,
    )
)
