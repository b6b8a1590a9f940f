"""TIES merging (Yadav et al., 2023): trim each task vector to its largest magnitudes, elect a sign, merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from moemerge.methods.registry import BlockSource, MergeMethod, Params, TwoPass, register
from moemerge.methods.sparsify import MagnitudeCut, apply_cut, magnitude_cut, magnitude_cut_of, prune_magnitude
from moemerge.methods.task_vectors import TaskVectorParams, merge_by_cuts, merge_sparsified


class TiesModelParams(Params):
    weight: float
    density: float = Field(1.0, ge=0.0, le=1.0)  # fraction of each task vector's entries kept, by magnitude


class TiesParams(TaskVectorParams):
    normalize: bool = True  # divide by the weights that agree with the elected sign, per entry


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[TiesModelParams],
    method_params: TiesParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """base + λ Σ_i m_i w_i δ̃_i / Σ_i m_i w_i with δ̃_i the top-density magnitudes of δ_i, m_i sign agreement.

    On the CPU each task vector's cut (threshold and last tie kept) is found first, then the trims, sign election
    and sum run a chunk at a time; rescaled trims, NaN/Inf and other devices take the whole-tensor steps. Both
    give the same bits.
    """
    assert base is not None
    return merge_by_cuts(
        tensors,
        base,
        model_params,
        method_params,
        prune=lambda delta, params, rescale: prune_magnitude(delta, params.density, rescale),
        cut_of=lambda delta, params: magnitude_cut_of(delta, params.density),
        apply=apply_cut,
        sign_consensus=True,
    )


def statistics(
    source: BlockSource,
    model_params: Sequence[TiesModelParams],
    method_params: TiesParams,
    generator: torch.Generator | None = None,
) -> list[MagnitudeCut]:
    """Each task vector's trim (threshold, last tie kept, rescale factor), gathered one model at a time."""
    return [
        magnitude_cut(source, index, params.density, method_params.rescale) for index, params in enumerate(model_params)
    ]


def merge_block(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    model_params: Sequence[TiesModelParams],
    method_params: TiesParams,
    cuts: Sequence[MagnitudeCut],
    first_entry: int,
) -> torch.Tensor:
    """One row block merged as `merge` merges the whole tensor: the same trims, sign election and sum."""
    return merge_sparsified(
        tensors,
        base,
        model_params,
        method_params,
        lambda index, delta: apply_cut(delta, cuts[index], first_entry),
        sign_consensus=True,
    )


register(
    MergeMethod(
        name="ties",
        merge=merge,
        model_params=TiesModelParams,
        method_params=TiesParams,
        uses_base=True,
        two_pass=TwoPass(statistics=statistics, merge_block=merge_block),
    )
)
