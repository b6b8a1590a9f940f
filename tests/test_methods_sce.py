"""SCE against select-calculate-erase written entry by entry."""

from __future__ import annotations

import pytest
import torch
from methods_support import run_merge

GEN = torch.Generator().manual_seed(5)
BASE = torch.randn(8, 5, generator=GEN, dtype=torch.float64)
TENSORS = [BASE + torch.randn(8, 5, generator=GEN, dtype=torch.float64) for _ in range(3)]


def sce(base: list[float], tensors: list[list[float]], topk: float) -> list[float]:
    deltas = [[x - b for x, b in zip(t, base, strict=True)] for t in tensors]
    n = len(base)
    if topk < 1:
        variances = []
        for i in range(n):
            column = [d[i] for d in deltas]
            mean = sum(column) / len(column)
            variances.append(sum((c - mean) ** 2 for c in column) / len(column))
        k = int(sum(v != 0 for v in variances) * topk)
        chosen = set(sorted(range(n), key=lambda i: (-variances[i], i))[:k])
        deltas = [[v if i in chosen else 0.0 for i, v in enumerate(d)] for d in deltas]
    energies = [sum(v * v for v in d) / n for d in deltas]
    total = sum(energies)
    weights = [e / total for e in energies] if abs(total) >= 1e-6 else [1 / len(deltas)] * len(deltas)
    result = []
    for i in range(n):
        positive = sum(d[i] for d in deltas) >= 0
        agree = [d[i] != 0 and (d[i] > 0) == positive for d in deltas]
        mixed = sum(w * d[i] for w, d, a in zip(weights, deltas, agree, strict=True) if a)
        divisor = sum(w for w, a in zip(weights, agree, strict=True) if a)
        result.append(base[i] + mixed / max(divisor, 1e-6))
    return result


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
def test_matches_the_entrywise_formula(topk: float) -> None:
    merged = run_merge("sce", TENSORS, BASE, [{}] * 3, {"select_topk": topk, "int8_mask": True})
    expected = sce(BASE.reshape(-1).tolist(), [t.reshape(-1).tolist() for t in TENSORS], topk)
    assert torch.allclose(merged.reshape(-1), torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_small_task_vectors_weigh_equally() -> None:
    """Σ mean(δ²) below 1e-6: uniform weights, so the result is the sign-agreeing mean (mergekit's rule)."""
    tensors = [BASE + 1e-4 * (t - BASE) for t in TENSORS]
    merged = run_merge("sce", tensors, BASE, [{}] * 3)
    expected = sce(BASE.reshape(-1).tolist(), [t.reshape(-1).tolist() for t in tensors], 1.0)
    assert torch.allclose(merged.reshape(-1), torch.tensor(expected, dtype=torch.float64), atol=1e-12)
