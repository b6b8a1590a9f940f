"""RAM and RAM+ (tensor-local) entry by entry: unique changes kept, shared ones averaged, unique ones boosted."""

from __future__ import annotations

import pytest
import torch
from methods_support import run_merge

GEN = torch.Generator().manual_seed(9)
BASE = torch.randn(10, 6, generator=GEN, dtype=torch.float64)
# sparse task vectors: about half of each is exactly unchanged, so entries have 0, 1, 2 or 3 contributors
TENSORS = [
    BASE + torch.randn(10, 6, generator=GEN, dtype=torch.float64) * (torch.rand(10, 6, generator=GEN) < 0.5)
    for _ in range(3)
]


def ram(base, tensors, epsilon, r=0.0, alpha=0.0):
    deltas = [[x - b for x, b in zip(t, base, strict=True)] for t in tensors]
    changed = [[abs(v) > epsilon for v in d] for d in deltas]
    count = [sum(c[i] for c in changed) for i in range(len(base))]
    boosts = []
    for c in changed:
        shared = sum(1 for i, ci in enumerate(c) if ci and count[i] > 1)
        unique = sum(1 for i, ci in enumerate(c) if ci and count[i] == 1)
        boosts.append(1 + r * min(max(shared / max(unique, epsilon), 0), alpha))
    result = []
    for i, b in enumerate(base):
        total = 0.0
        for d, c, boost in zip(deltas, changed, boosts, strict=True):
            if c[i]:
                total += d[i] * boost if count[i] == 1 else d[i] / count[i]
        result.append(b + total)
    return result


@pytest.mark.parametrize("epsilon", [1e-5, 0.5])
def test_ram_matches_the_entrywise_formula(epsilon: float) -> None:
    merged = run_merge("ram", TENSORS, BASE, [{}] * 3, {"epsilon": epsilon})
    expected = ram(BASE.reshape(-1).tolist(), [t.reshape(-1).tolist() for t in TENSORS], epsilon)
    assert torch.allclose(merged.reshape(-1), torch.tensor(expected, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("r, alpha", [(0.1, 0.2), (1.0, 5.0)])
def test_ramplus_tl_boosts_unique_changes(r: float, alpha: float) -> None:
    params = {"epsilon": 1e-5, "r": r, "alpha": alpha}
    merged = run_merge("ramplus_tl", TENSORS, BASE, [{}] * 3, params)
    expected = ram(BASE.reshape(-1).tolist(), [t.reshape(-1).tolist() for t in TENSORS], 1e-5, r, alpha)
    assert torch.allclose(merged.reshape(-1), torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(merged, run_merge("ram", TENSORS, BASE, [{}] * 3), atol=1e-6)
