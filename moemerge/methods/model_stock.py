"""Model Stock (Jang et al., 2024): move from the base toward the fine-tunes' average by their mutual angle.

With offsets δ_i = x_i − base and cos θ the mean pairwise cosine between them,
t = n cos θ / (1 + (n − 1) cos θ) and the result is t · mean(x_i) + (1 − t) · base. `filter_wise` computes
θ and t per row (the last dimension) instead of over the whole tensor. As in mergekit 0.1.5, cosines use
max(‖δ_i‖‖δ_j‖, 1e-6) and where 1 + (n − 1) cos θ is within 1e-6 of zero the base is kept (t = 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moemerge.methods.inner_products import combine, gram
from moemerge.methods.registry import BlockSource, MergeMethod, NoParams, Params, TwoPass, register

NORM_FLOOR = 1e-6
SINGULAR = 1e-6


class ModelStockParams(Params):
    filter_wise: bool = False  # one angle per row instead of one per tensor


def interpolation_ratio(mean_cos: torch.Tensor | float, count: int) -> torch.Tensor | float:
    """t = n cos / (1 + (n − 1) cos), 0 where the denominator is within 1e-6 of zero."""
    if isinstance(mean_cos, float):
        denominator = 1 + (count - 1) * mean_cos
        return 0.0 if abs(denominator) < SINGULAR else count * mean_cos / denominator
    denominator = 1 + (count - 1) * mean_cos
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, 0.0, count * mean_cos / torch.where(singular, 1.0, denominator))


def _mean_cosine(products: torch.Tensor) -> float:
    """The mean pairwise cosine from the offsets' Gram matrix."""
    count = products.shape[0]
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            norm_product = math.sqrt(float(products[i, i])) * math.sqrt(float(products[j, j]))
            cosines.append(min(1.0, max(-1.0, float(products[i, j]) / max(norm_product, NORM_FLOOR))))
    return sum(cosines) / len(cosines)


def _coefficients(ratio: float, count: int) -> list[float]:
    """t/n for each fine-tune, then 1 − t for the base."""
    return [ratio / count] * count + [1.0 - ratio]


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[Params],
    method_params: ModelStockParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """t · mean(x_i) + (1 − t) · base, t = n cos θ / (1 + (n − 1) cos θ), cos θ the mean pairwise cosine of δ_i."""
    assert base is not None
    count = len(tensors)
    dtype = torch.promote_types(base.dtype, torch.float32)
    if not method_params.filter_wise:
        offsets = gram([tensor.to(dtype) for tensor in tensors], origin=base.to(dtype))  # offsets δ_i = x_i − base
        ratio = interpolation_ratio(_mean_cosine(offsets), count)
        return combine(_coefficients(ratio, count), [*tensors, base])
    rows = (lambda x: x.unsqueeze(0)) if base.dim() < 2 else (lambda x: x)
    base_rows = rows(base.to(dtype))
    offsets = [rows(tensor.to(dtype)) - base_rows for tensor in tensors]
    norms = [torch.linalg.vector_norm(offset, dim=-1, dtype=torch.float64) for offset in offsets]
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            dot = torch.sum(offsets[i] * offsets[j], dim=-1, dtype=torch.float64)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=NORM_FLOOR)).clamp(-1.0, 1.0))
    ratio = interpolation_ratio(torch.stack(cosines).mean(dim=0), count).unsqueeze(-1).to(dtype)
    average = combine([1.0 / count] * count, tensors)
    merged = rows(average).mul_(ratio).add_(base_rows * (1.0 - ratio))
    return merged.reshape(base.shape)


def statistics(
    source: BlockSource,
    model_params: Sequence[Params],
    method_params: ModelStockParams,
    generator: torch.Generator | None = None,
) -> float | None:
    """The whole tensor's t from the offsets' Gram matrix summed over row blocks (None: t per row, per block)."""
    if method_params.filter_wise:
        return None
    products = None
    for _, base, tensors in source.blocks():
        block_products = gram([tensor.sub_(base) for tensor in tensors])
        products = block_products if products is None else products + block_products
    assert products is not None
    return interpolation_ratio(_mean_cosine(products), products.shape[0])


def merge_block(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    model_params: Sequence[Params],
    method_params: ModelStockParams,
    ratio: float | None,
    first_entry: int,
) -> torch.Tensor:
    """One row block: the whole tensor's t, or each row's own (rows lie whole in a block)."""
    if ratio is None:
        return merge(tensors, base, model_params, method_params)
    return combine(_coefficients(ratio, len(tensors)), [*tensors, base])


register(
    MergeMethod(
        name="model_stock",
        merge=merge,
        model_params=NoParams,
        method_params=ModelStockParams,
        uses_base=True,
        min_model_count=2,
        two_pass=TwoPass(statistics=statistics, merge_block=merge_block),
    )
)
