"""DARE (Yu et al., 2024): drop task-vector entries at random, rescale the survivors, then merge.

`dare_ties` merges with TIES sign election, `dare_linear` with the plain weighted sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from pydantic import Field

from moemerge.methods.registry import BlockSource, MergeMethod, Params, TwoPass, register
from moemerge.methods.sparsify import RandomCut, apply_random_cut, drop_random, random_cut
from moemerge.methods.task_vectors import TaskVectorParams, merge_sparsified


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

    def drop(index: int, delta: torch.Tensor) -> torch.Tensor:
        return drop_random(delta, model_params[index].density, method_params.rescale, generator)

    return merge_sparsified(tensors, base, model_params, method_params, drop, sign_consensus=sign_consensus)


def statistics(
    source: BlockSource,
    model_params: Sequence[DareModelParams],
    method_params: DareParams,
    generator: torch.Generator | None,
) -> list[RandomCut]:
    """Each task vector's mask (drawn in model order, as `merge` draws them) and rescale factor."""
    if generator is None:
        raise ValueError("DARE needs a seeded generator: the caller must pass one for random methods")
    return [
        random_cut(source, index, params.density, method_params.rescale, generator)
        for index, params in enumerate(model_params)
    ]


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
    """One row block merged as `merge` merges the whole tensor: the same masks, rescaling and sum."""
    return merge_sparsified(
        tensors,
        base,
        model_params,
        method_params,
        lambda index, delta: apply_random_cut(delta, cuts[index], first_entry),
        sign_consensus=sign_consensus,
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
