"""Model breadcrumbs (Davari & Belilovsky, 2023): drop each task vector's largest outliers and smallest entries.

`breadcrumbs` merges with the plain weighted sum, `breadcrumbs_ties` with TIES sign election.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from pydantic import Field

from moemerge.methods.registry import MergeMethod, Params, register
from moemerge.methods.sparsify import prune_outliers
from moemerge.methods.task_vectors import TaskVectorParams, merge_sparsified


class BreadcrumbsModelParams(Params):
    weight: float
    density: float = Field(1.0, ge=0.0, le=1.0)  # fraction of entries kept
    gamma: float = Field(0.01, ge=0.0, le=1.0)  # fraction of entries dropped from the top magnitudes


class BreadcrumbsParams(TaskVectorParams):
    normalize: bool = False


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_params: Sequence[BreadcrumbsModelParams],
    method_params: BreadcrumbsParams,
    generator: torch.Generator | None = None,
    *,
    sign_consensus: bool,
) -> torch.Tensor:
    """base + λ Σ_i m_i w_i δ̃_i (/ Σ m_i w_i) with δ̃_i = δ_i minus its top-gamma and bottom magnitudes."""
    assert base is not None

    def trim(index: int, delta: torch.Tensor) -> torch.Tensor:
        params = model_params[index]
        return prune_outliers(delta, params.density, params.gamma, method_params.rescale)

    return merge_sparsified(tensors, base, model_params, method_params, trim, sign_consensus=sign_consensus)


for name, sign_consensus in (("breadcrumbs", False), ("breadcrumbs_ties", True)):
    register(
        MergeMethod(
            name=name,
            merge=partial(merge, sign_consensus=sign_consensus),
            model_params=BreadcrumbsModelParams,
            method_params=BreadcrumbsParams,
            uses_base=True,
        )
    )
