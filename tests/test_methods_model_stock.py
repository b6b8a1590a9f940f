"""Model Stock against the paper's formula written per vector, whole-tensor and per row."""

from __future__ import annotations

import math

import pytest
import torch
from methods_support import run_merge

GEN = torch.Generator().manual_seed(1)
BASE = torch.randn(6, 10, generator=GEN, dtype=torch.float64)
TENSORS = [BASE + 0.1 * torch.randn(6, 10, generator=GEN, dtype=torch.float64) for _ in range(3)]


def model_stock(base: list[float], tensors: list[list[float]]) -> list[float]:
    """t · mean(x) + (1 − t) base, t = n c / (1 + (n − 1) c), c the mean pairwise cosine of the offsets."""
    offsets = [[x - b for x, b in zip(tensor, base, strict=True)] for tensor in tensors]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = sum(a * b for a, b in zip(offsets[i], offsets[j], strict=True))
            norms = math.sqrt(sum(a * a for a in offsets[i])) * math.sqrt(sum(b * b for b in offsets[j]))
            cosines.append(max(-1.0, min(1.0, dot / max(norms, 1e-6))))
    c = sum(cosines) / len(cosines)
    n = len(tensors)
    denominator = 1 + (n - 1) * c
    t = 0.0 if abs(denominator) < 1e-6 else n * c / denominator
    return [t * sum(column) / n + (1 - t) * b for column, b in zip(zip(*tensors, strict=True), base, strict=True)]


def test_whole_tensor_matches_the_formula() -> None:
    merged = run_merge("model_stock", TENSORS, BASE, [{}] * 3)
    expected = model_stock(BASE.reshape(-1).tolist(), [t.reshape(-1).tolist() for t in TENSORS])
    assert torch.allclose(merged.reshape(-1), torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_filter_wise_uses_one_angle_per_row() -> None:
    merged = run_merge("model_stock", TENSORS, BASE, [{}] * 3, {"filter_wise": True})
    for row in range(BASE.shape[0]):
        expected = model_stock(BASE[row].tolist(), [t[row].tolist() for t in TENSORS])
        assert torch.allclose(merged[row], torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(merged, run_merge("model_stock", TENSORS, BASE, [{}] * 3), atol=1e-6)


def test_opposite_offsets_keep_the_base_and_a_vector_is_one_row() -> None:
    base = torch.zeros(5, dtype=torch.float64)
    offset = torch.arange(1.0, 6.0, dtype=torch.float64)
    # two exactly opposite offsets: cos = −1, 1 + (n − 1) cos = 0, singular: the base is kept
    merged = run_merge("model_stock", [base + offset, base - offset], base, [{}] * 2, {"filter_wise": True})
    assert torch.equal(merged, base)
    vector = [t[0] for t in TENSORS]
    merged = run_merge("model_stock", vector, BASE[0], [{}] * 3, {"filter_wise": True})
    expected = model_stock(BASE[0].tolist(), [t.tolist() for t in vector])
    assert torch.allclose(merged, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_float32_inputs_give_float32(filter_wise: bool) -> None:
    merged = run_merge(
        "model_stock", [t.float() for t in TENSORS], BASE.float(), [{}] * 3, {"filter_wise": filter_wise}
    )
    assert merged.dtype == torch.float32
