"""Helpers for the merge-method tests: call a method through the registry with YAML-style parameter dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from moemerge.methods import get_method


def run_merge(
    name: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    models: Sequence[Mapping[str, object]],
    parameters: Mapping[str, object] | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Validate the parameters the way the planner does, then merge one tensor.

    Methods may overwrite their inputs (the planner reads fresh ones for each call), so they get copies here
    and a test can reuse its tensors for the expected values.
    """
    method = get_method(name)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return method.merge(
        [tensor.clone() for tensor in tensors],
        base,
        [method.model_params.model_validate(dict(model)) for model in models],
        method.method_params.model_validate(dict(parameters or {})),
        generator,
    )


def top_k_by_sort(values: Sequence[float], k: int) -> set[int]:
    """Reference top-k: a full sort by (−|v|, flat index), so ties at the threshold go to the lowest index."""
    order = sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))
    return set(order[:k])
