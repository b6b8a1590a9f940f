"""TIES merging (Yadav et al., 2023): trim each task vector to its largest magnitudes, elect a sign, merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from moemerge.methods.registry import MergeMethod, Params, register
from moemerge.methods.sparsify import prune_magnitude
from moemerge.methods.task_vectors import TaskVectorParams, add_task_vectors, task_vector


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
    """base + λ Σ_i m_i w_i δ̃_i / Σ_i m_i w_i with δ̃_i the top-density magnitudes of δ_i, m_i sign agreement."""
    assert base is not None
    weights = [params.weight for params in model_params]
    weighted_deltas = [
        prune_magnitude(task_vector(tensor, base), params.density, method_params.rescale).mul_(params.weight)
        for tensor, params in zip(tensors, model_params, strict=True)
    ]
    return add_task_vectors(
        base,
        weighted_deltas,
        weights,
        sign_consensus=True,
        normalize=method_params.normalize,
        scale=method_params.lambda_,
    )


register(
    MergeMethod(
        name="ties",
        merge=merge,
        model_params=TiesModelParams,
        method_params=TiesParams,
        uses_base=True,
    )
)
