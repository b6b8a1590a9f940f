"""The NaN/Inf screen: exact counts in every float dtype, finite sums that overflow included."""

from __future__ import annotations

import pytest
import torch

from moemerge.finite import SCREEN_CHUNK, nonfinite_count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_counts_nan_and_inf_exactly_and_nothing_in_large_finite_tensors(dtype: torch.dtype) -> None:
    values = torch.ones(3 * SCREEN_CHUNK + 5, dtype=dtype) * torch.finfo(dtype).max  # every sum overflows
    assert nonfinite_count(values) == 0
    values[SCREEN_CHUNK + 7] = float("nan")
    values[-1] = float("-inf")
    values[3] = float("inf")
    assert nonfinite_count(values) == 3
    assert nonfinite_count(torch.zeros(0, dtype=dtype)) == 0
    assert nonfinite_count(torch.arange(10)) == 0  # integers hold no NaN
