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
    assert torch.allclose(merged, expected.double())


def test_normalize_divides_by_weight_sum_and_is_the_default() -> None:
    expected = torch.tensor([[2.0, -1.0], [13.5, 6.25]], dtype=torch.float64) / 3.5
    assert torch.allclose(run_merge("linear", [A, B, C], None, MODELS, {"normalize": True}), expected)
    assert torch.allclose(run_merge("linear", [A, B, C], None, MODELS), expected)


def test_accumulates_in_float64_and_does_not_touch_inputs() -> None:
    """The sum comes back in float64 for the caller to round once; 1 + 2⁻³⁰ would be lost in a float32 sum."""
    a, b = A.to(torch.bfloat16), B.to(torch.bfloat16)
    merged = run_merge("linear", [a, b], None, [{"weight": 1}, {"weight": 1}])
    assert merged.dtype == torch.float64
    assert torch.equal(merged, torch.tensor([[0.5, 0.0], [4.5, 2.5]], dtype=torch.float64))
    one, tiny = torch.ones(3), torch.full((3,), 2.0**-30)
    summed = run_merge("linear", [one, tiny], None, [{"weight": 1}, {"weight": 1}], {"normalize": False})
    assert torch.equal(summed, torch.full((3,), 1 + 2.0**-30, dtype=torch.float64))
    assert torch.equal(a, A.to(torch.bfloat16))


def test_zero_weight_sum_cannot_be_normalized() -> None:
    with pytest.raises(ConfigError, match="weight"):
        run_merge("linear", [A, B], None, [{"weight": 1.0}, {"weight": -1.0}])
    assert torch.equal(
        run_merge("linear", [A, B], None, [{"weight": 1.0}, {"weight": -1.0}], {"normalize": False}), (A - B).double()
    )
