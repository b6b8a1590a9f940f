"""Task arithmetic against hand-computed base + λ Σ w_i δ_i."""

from __future__ import annotations

import torch
from methods_support import run_merge

BASE = torch.tensor([1.0, -1.0, 0.5, 2.0])
X1 = torch.tensor([1.5, -1.0, 0.0, 3.0])  # δ1 = [0.5, 0, -0.5, 1]
X2 = torch.tensor([0.0, 1.0, 0.5, 2.5])  # δ2 = [-1, 2, 0, 0.5]
MODELS = [{"weight": 1.0}, {"weight": 0.5}]


def test_weighted_task_vectors_added_to_base() -> None:
    # Σ w δ = [0.5 - 0.5, 0 + 1, -0.5 + 0, 1 + 0.25] = [0, 1, -0.5, 1.25]
    expected = BASE + torch.tensor([0.0, 1.0, -0.5, 1.25])
    assert torch.allclose(run_merge("task_arithmetic", [X1, X2], BASE, MODELS), expected)


def test_lambda_scales_the_merged_task_vector() -> None:
    expected = BASE + 0.4 * torch.tensor([0.0, 1.0, -0.5, 1.25])
    merged = run_merge("task_arithmetic", [X1, X2], BASE, MODELS, {"lambda": 0.4, "int8_mask": True})
    assert torch.allclose(merged, expected)


def test_normalize_divides_by_weight_sum() -> None:
    expected = BASE + 2.0 * torch.tensor([0.0, 1.0, -0.5, 1.25]) / 1.5
    merged = run_merge("task_arithmetic", [X1, X2], BASE, MODELS, {"lambda": 2.0, "normalize": True})
    assert torch.allclose(merged, expected)


def test_negligible_weight_sum_counts_as_one_when_normalizing() -> None:
    merged = run_merge("task_arithmetic", [X1, X2], BASE, [{"weight": 1}, {"weight": -1}], {"normalize": True})
    assert torch.allclose(merged, BASE + (X1 - X2))
    # 0.1 + 0.2 − 0.3 is 5.6e-17, not 0: dividing by it would blow the sum up by 1e16
    dust = [{"weight": 0.1}, {"weight": 0.2}, {"weight": -0.3}]
    merged = run_merge("task_arithmetic", [X1, X2, X2], BASE, dust, {"normalize": True})
    assert torch.allclose(merged, BASE + 0.1 * (X1 - BASE) - 0.1 * (X2 - BASE))


def test_rescale_is_accepted_and_changes_nothing_without_sparsification() -> None:
    merged = run_merge("task_arithmetic", [X1, X2], BASE, MODELS, {"rescale": True})
    assert torch.equal(merged, run_merge("task_arithmetic", [X1, X2], BASE, MODELS))


def test_does_not_modify_inputs() -> None:
    before = [BASE.clone(), X1.clone(), X2.clone()]
    run_merge("task_arithmetic", [X1, X2], BASE, MODELS)
    assert all(torch.equal(a, b) for a, b in zip(before, [BASE, X1, X2], strict=True))
