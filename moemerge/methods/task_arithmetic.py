"""Task arithmetic (Ilharco et al., 2023): base + λ · Σ_i w_i (x_i − base)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moemerge.methods.registry import MergeMethod, Params, register
from moemerge.methods.task_vectors import TaskVectorParams, add_task_vectors, task_vector


class TaskArithmeticModelParams(Params):
    weight: float


class TaskArithmeticParams(TaskVectorParams):
    normalize: bool = False  # divide by Σ w_i


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[TaskArithmeticModelParams],
    method_params: TaskArithmeticParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """base + λ Σ w_i δ_i, divided by Σ w_i when `normalize`."""
    assert base is not None
    weights = [params.weight for params in model_params]
    weighted_deltas = [task_vector(tensor, base).mul_(weight) for tensor, weight in zip(tensors, weights, strict=True)]
    return add_task_vectors(
        base,
        weighted_deltas,
        weights,
        sign_consensus=False,
        normalize=method_params.normalize,
        scale=method_params.lambda_,
    )


register(
    MergeMethod(
        name="task_arithmetic",
        merge=merge,
        model_params=TaskArithmeticModelParams,
        method_params=TaskArithmeticParams,
        uses_base=True,
        elementwise=True,
    )
)
