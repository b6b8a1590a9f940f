"""NuSLERP against slerp written per vector: flattened, per row, per column, with and without a base."""

from __future__ import annotations

import math

import pytest
import torch
from methods_support import run_merge

from moemerge.errors import ConfigError

GEN = torch.Generator().manual_seed(2)
BASE = torch.randn(5, 7, generator=GEN, dtype=torch.float64)
TENSORS = [BASE + 0.3 * torch.randn(5, 7, generator=GEN, dtype=torch.float64) for _ in range(2)]


def slerp_vector(t: float, v0: list[float], v1: list[float]) -> list[float]:
    """sin((1−t)θ)/sin θ v0 + sin(tθ)/sin θ v1 on the unnormalised vectors; linear when 1 − cos² ≤ 1e-16."""
    n0 = max(math.sqrt(sum(a * a for a in v0)), 1e-7)
    n1 = max(math.sqrt(sum(b * b for b in v1)), 1e-7)
    cos = max(-1.0, min(1.0, sum(a * b for a, b in zip(v0, v1, strict=True)) / (n0 * n1)))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * a + t * b for a, b in zip(v0, v1, strict=True)]
    theta = math.acos(cos)
    s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return [s0 * a + s1 * b for a, b in zip(v0, v1, strict=True)]


def reference(t: float, v0: torch.Tensor, v1: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "flatten":
        return torch.tensor(slerp_vector(t, v0.reshape(-1).tolist(), v1.reshape(-1).tolist())).reshape(v0.shape)
    if mode == "rows":
        return torch.tensor([slerp_vector(t, a.tolist(), b.tolist()) for a, b in zip(v0, v1, strict=True)])
    return torch.tensor([slerp_vector(t, a.tolist(), b.tolist()) for a, b in zip(v0.T, v1.T, strict=True)]).T


MODES = {
    "flatten": {},
    "rows": {"nuslerp_flatten": False},
    "columns": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("with_base", [False, True])
def test_matches_slerp_per_vector(mode: str, with_base: bool) -> None:
    models = [{"weight": 0.6}, {"weight": 0.2}]  # t = 0.2 / 0.8
    base = BASE if with_base else None
    merged = run_merge("nuslerp", TENSORS, base, models, MODES[mode])
    v0, v1 = (t - BASE for t in TENSORS) if with_base else TENSORS
    expected = reference(0.25, v0, v1, mode) + (BASE if with_base else 0)
    assert torch.allclose(merged, expected.double(), atol=1e-12)


def test_t_without_weights_weights_summing_to_zero_and_colinear_inputs() -> None:
    by_t = run_merge("nuslerp", TENSORS, None, [{}, {}], {"t": 0.25})
    by_weight = run_merge("nuslerp", TENSORS, None, [{"weight": 3.0}, {"weight": 1.0}])
    assert torch.equal(by_t, by_weight)
    half = run_merge("nuslerp", TENSORS, None, [{"weight": 1.0}, {"weight": -1.0}])
    assert torch.allclose(half, reference(0.5, *TENSORS, "flatten").double(), atol=1e-12)
    x = TENSORS[0]
    assert torch.allclose(run_merge("nuslerp", [x, 2 * x], None, [{}, {}], {"t": 0.5}), 1.5 * x, atol=1e-12)
    with pytest.raises(ConfigError, match="weight"):
        run_merge("nuslerp", TENSORS, None, [{"weight": 1.0}, {}])
