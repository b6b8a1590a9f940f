"""Linear merge against hand-computed weighted sums."""

from __future__ import annotations

import pytest
import torch
from methods_support import run_merge

from moemerge.errors import ConfigError

A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
B = torch.tensor([[0.0, -2.0], [6.0, 1.0]])
C = torch.tensor([[2.0, 2.0], [-3.0, 0.5]])
MODELS = [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}]


def test_weighted_sum_without_normalize() -> None:
    expected = torch.tensor([[1 + 0 + 1.0, 2 - 4 + 1.0], [3 + 12 - 1.5, 4 + 2 + 0.25]])
    merged = run_merge("linear", [A, B, C], None, MODELS, {"normalize": False})
    assert torch.allclose(merged, expected)


def test_normalize_divides_by_weight_sum_and_is_the_default() -> None:
    expected = torch.tensor([[2.0, -1.0], [13.5, 6.25]]) / 3.5
    assert torch.allclose(run_merge("linear", [A, B, C], None, MODELS, {"normalize": True}), expected)
    assert torch.allclose(run_merge("linear", [A, B, C], None, MODELS), expected)


def test_keeps_dtype_and_does_not_touch_inputs() -> None:
    a, b = A.to(torch.bfloat16), B.to(torch.bfloat16)
    merged = run_merge("linear", [a, b], None, [{"weight": 1}, {"weight": 1}])
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, torch.tensor([[0.5, 0.0], [4.5, 2.5]], dtype=torch.bfloat16))
    assert torch.equal(a, A.to(torch.bfloat16))


def test_zero_weight_sum_cannot_be_normalized() -> None:
    with pytest.raises(ConfigError, match="weight"):
        run_merge("linear", [A, B], None, [{"weight": 1.0}, {"weight": -1.0}])
    assert torch.equal(
        run_merge("linear", [A, B], None, [{"weight": 1.0}, {"weight": -1.0}], {"normalize": False}), A - B
    )
