"""DARE (Yu et al., 2024): drop task-vector entries at random, rescale the survivors, then merge.

`dare_ties` merges with TIES sign election, `dare_linear` with the plain weighted sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from pydantic import Field

from moemerge.methods.registry import BlockSource, MergeMethod, Params, TwoPass, register
from moemerge.methods.sparsify import RandomCut, apply_random_cut, drop_random, drop_random_factor, random_cuts
from moemerge.methods.task_vectors import TaskVectorParams, add_task_vectors_in_chunks, task_vector, weigh


class DareModelParams(Params):
    weight: float
    density: float = Field(1.0, ge=0.0, le=1.0)  # probability that each task-vector entry survives


class DareParams(TaskVectorParams):
    normalize: bool = False
    rescale: bool = True  # DARE's default: the survivors keep each task vector's L1 norm


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[DareModelParams],
    method_params: DareParams,
    generator: torch.Generator | None,
    *,
    sign_consensus: bool,
) -> torch.Tensor:
    """base + λ Σ_i m_i w_i δ̃_i (/ Σ m_i w_i) with δ̃_i = δ_i · Bernoulli(density) mask, L1-rescaled."""
    assert base is not None
    if generator is None:
        raise ValueError("DARE needs a seeded generator: the caller must pass one for random methods")

    weights = [params.weight for params in model_params]
    if base.device.type != "cpu":
        weighted = [
            drop_random(task_vector(tensor, base), params.density, method_params.rescale, generator).mul_(params.weight)
            for tensor, params in zip(tensors, model_params, strict=True)
        ]
        factors: list[float | None] = [None] * len(weighted)
    else:
        # each mask drawn a cache-sized chunk at a time in model order (the draws a seed stands for), the L1 norms
        # over each whole task vector; the factors and weights are applied in the chunked sign election and sum:
        # the same bits as `drop_random` on whole tensors, without its full-size draws, masks and extra passes
        factors = [
            drop_random_factor(tensor, base, params.density, method_params.rescale, generator)
            for tensor, params in zip(tensors, model_params, strict=True)
        ]
        weighted = list(tensors)
    return add_task_vectors_in_chunks(
        base,
        weighted,
        weights,
        partial(_rescaled_and_weighted, factors, weights if base.device.type == "cpu" else None),
        sign_consensus=sign_consensus,
        normalize=method_params.normalize,
        scale=method_params.lambda_,
    )


def _rescaled_and_weighted(
    factors: Sequence[float | None], weights: Sequence[float] | None, index: int, chunk: torch.Tensor, first_entry: int
) -> torch.Tensor:
    """w_i · (factor_i · δ̃_i) for a chunk of a dropped task vector, in place (as drop_random, then the weight)."""
    if factors[index] is not None:
        chunk.mul_(factors[index])
    return weigh(chunk, weights[index]) if weights is not None else chunk


def _dropped_rescaled_and_weighted(
    cuts: Sequence[RandomCut],
    weights: Sequence[float],
    block_first_entry: int,
    index: int,
    chunk: torch.Tensor,
    start: int,
) -> torch.Tensor:
    """w_i · factor_i · (mask_i δ_i) for a chunk of a row block's task vector, in place: the drop, the rescale and
    the weight in the order `apply_random_cut` and `_rescaled_and_weighted` apply them, while the chunk is in cache."""
    return weigh(apply_random_cut(chunk, cuts[index], block_first_entry + start), weights[index])


def statistics(
    source: BlockSource,
    model_params: Sequence[DareModelParams],
    method_params: DareParams,
    generator: torch.Generator | None,
) -> list[RandomCut]:
    """Each task vector's mask (drawn in model order, as `merge` draws them) and rescale factor."""
    if generator is None:
        raise ValueError("DARE needs a seeded generator: the caller must pass one for random methods")
    return random_cuts(source, [params.density for params in model_params], method_params.rescale, generator)


def merge_block(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    model_params: Sequence[DareModelParams],
    method_params: DareParams,
    cuts: Sequence[RandomCut],
    first_entry: int,
    *,
    sign_consensus: bool,
) -> torch.Tensor:
    """One row block merged as `merge` merges the whole tensor: the same masks, rescaling and sum, by chunks."""
    weights = [params.weight for params in model_params]
    deltas = [task_vector(tensor, base) for tensor in tensors]
    return add_task_vectors_in_chunks(  # the masks, rescale factors and weights applied chunk by chunk in the sum
        base,
        deltas,
        weights,
        partial(_dropped_rescaled_and_weighted, cuts, weights, first_entry),
        sign_consensus=sign_consensus,
        normalize=method_params.normalize,
        scale=method_params.lambda_,
    )


for name, sign_consensus in (("dare_ties", True), ("dare_linear", False)):
    register(
        MergeMethod(
            name=name,
            merge=partial(merge, sign_consensus=sign_consensus),
            model_params=DareModelParams,
            method_params=DareParams,
            uses_base=True,
            random=True,
            two_pass=TwoPass(statistics=statistics, merge_block=partial(merge_block, sign_consensus=sign_consensus)),
        )
    )
