"""SLERP against the closed form computed independently in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from methods_support import run_merge

from moemerge.errors import ConfigError

BASE = torch.tensor([[0.3, -1.2, 0.8], [2.0, 0.1, -0.4]])
OTHER = torch.tensor([[1.1, 0.4, -0.6], [0.2, 0.9, 1.5]])


def closed_form(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    u0, u1 = v0 / np.linalg.norm(v0), v1 / np.linalg.norm(v1)
    omega = np.arccos(np.dot(u0.ravel(), u1.ravel()))
    return (np.sin((1 - t) * omega) * v0 + np.sin(t * omega) * v1) / np.sin(omega)


def slerp(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    return run_merge("slerp", [other], base, [{}], {"t": t})


def test_endpoints_are_the_inputs() -> None:
    assert torch.equal(slerp(BASE, OTHER, 0.0), BASE)
    assert torch.allclose(slerp(BASE, OTHER, 1.0), OTHER, atol=1e-6)


@pytest.mark.parametrize("t", [0.25, 0.5, 0.9])
def test_interior_matches_closed_form(t: float) -> None:
    expected = closed_form(BASE.double().numpy(), OTHER.double().numpy(), t)
    merged = slerp(BASE, OTHER, t)
    assert merged.shape == BASE.shape
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-5, atol=1e-6)
    # slerp is not lerp here: the inputs are far from parallel
    assert not torch.allclose(merged, (1 - t) * BASE + t * OTHER, atol=1e-3)


def test_half_way_between_orthogonal_unit_vectors_stays_on_the_circle() -> None:
    merged = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    assert torch.allclose(merged, torch.tensor([2**-0.5, 2**-0.5]))


def test_near_parallel_falls_back_to_lerp() -> None:
    other = 2.0 * BASE + 1e-4  # cos θ > 0.9995
    merged = slerp(BASE, other, 0.3)
    assert torch.allclose(merged, 0.7 * BASE + 0.3 * other, atol=1e-6)
    opposite = slerp(BASE, -BASE, 0.25)  # cos θ = −1: lerp, not a division by sin θ = 0
    assert torch.allclose(opposite, 0.5 * BASE)


def test_zero_vector_is_not_normalised() -> None:
    # dot = 0 → θ = π/2: result = sin(tπ/2) · v1 (the zero base contributes nothing)
    other = torch.tensor([3.0, 4.0])
    assert torch.allclose(slerp(torch.zeros(2), other, 0.5), np.sin(np.pi / 4) * other)


def test_computes_in_float32_and_returns_the_input_dtype() -> None:
    base, other = BASE.to(torch.bfloat16), OTHER.to(torch.bfloat16)
    merged = slerp(base, other, 0.5)
    assert merged.dtype == torch.bfloat16 and merged.shape == BASE.shape
    expected = closed_form(base.double().numpy(), other.double().numpy(), 0.5)
    assert torch.equal(merged, torch.from_numpy(expected).to(torch.bfloat16))
    assert torch.equal(slerp(base, other, 0.0), base)
    assert torch.equal(slerp(BASE.reshape(-1)[0], OTHER.reshape(-1)[0], 0.0), BASE.reshape(-1)[0])  # 0-d


def test_needs_exactly_one_other_model() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        run_merge("slerp", [OTHER, OTHER], BASE, [{}, {}], {"t": 0.5})
