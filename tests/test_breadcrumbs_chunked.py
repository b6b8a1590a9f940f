"""Breadcrumbs by bracketed cuts, a chunk at a time and in row blocks: the same bits as pruning whole tensors."""

from __future__ import annotations

import pytest
import torch
from test_two_pass import merge_both_ways

from moemerge.methods import get_method, sparsify, task_vectors
from moemerge.methods.sparsify import prune_outliers
from moemerge.methods.task_vectors import add_task_vectors


@pytest.fixture
def small_chunks(monkeypatch):
    """Brackets, selection scans and merge chunks on tiny tensors, so every chunk boundary is crossed."""
    monkeypatch.setattr(sparsify, "BRACKET_MIN_NUMEL", 1)
    monkeypatch.setattr(sparsify, "SELECT_CHUNK", 50)
    monkeypatch.setattr(task_vectors, "MERGE_CHUNK", 13)


def tied_inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(-3, 4, (40, 9), generator=generator).float() / 4
    # small integer deltas: many equal magnitudes straddle both cuts, so the tie rule is exercised at each
    return base, [base + torch.randint(-4, 5, (40, 9), generator=generator).float() / 8 for _ in range(3)]


def reference(name: str, base, tensors, models: list[dict], parameters: dict) -> torch.Tensor:
    """Whole-tensor pruning by `prune_outliers` (two full selections per model), then the sum."""
    method = get_method(name)
    params = method.method_params.model_validate(parameters)
    trimmed = [
        prune_outliers(tensor.clone().sub_(base), m["density"], m["gamma"], params.rescale).mul_(m["weight"])
        for tensor, m in zip(tensors, models, strict=True)
    ]
    return add_task_vectors(
        base.clone(),
        trimmed,
        [m["weight"] for m in models],
        sign_consensus=name == "breadcrumbs_ties",
        normalize=params.normalize,
        scale=params.lambda_,
    )


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density, gamma", [(0.0, 0.1), (0.1, 0.0), (0.37, 0.05), (0.5, 0.01), (0.9, 0.3), (1.0, 0.1)])
@pytest.mark.parametrize("normalize", [False, True])
def test_chunked_band_equals_pruning_the_whole_tensor(small_chunks, name, density, gamma, normalize) -> None:
    base, tensors = tied_inputs(int(density * 100 + gamma * 1000))
    models = [{"weight": w, "density": density, "gamma": gamma} for w in (1.0, 0.6, -0.3)]
    parameters = {"normalize": normalize, "lambda": 0.7}
    method = get_method(name)
    merged = method.merge(
        [t.clone() for t in tensors],
        base.clone(),
        [method.model_params.model_validate(m) for m in models],
        method.method_params.model_validate(parameters),
        None,
    )
    assert torch.equal(merged, reference(name, base, tensors, models, parameters))


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("rows_per_block", [1, 7, 40])
def test_row_blocks_equal_the_whole_tensor(small_chunks, name, rescale, rows_per_block) -> None:
    base, tensors = tied_inputs(rows_per_block)
    models = [
        {"weight": 1.0, "density": 0.4, "gamma": 0.05},
        {"weight": 0.5, "density": 0.2, "gamma": 0.2},
        {"weight": 0.8, "density": 1.0, "gamma": 0.1},
    ]
    whole, blocked = merge_both_ways(name, base, tensors, models, {"rescale": rescale}, rows_per_block)
    assert torch.equal(blocked, whole)
    assert torch.equal(whole, reference(name, base, tensors, models, {"rescale": rescale}))
