"""NearSwap entry by entry: close entries are swapped in, far ones move by t / distance."""

from __future__ import annotations

import pytest
import torch
from methods_support import run_merge


@pytest.mark.parametrize("t", [0.0, 0.05, 0.5, 10.0])
def test_matches_the_entrywise_formula(t: float) -> None:
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    other = base + 0.2 * torch.randn(7, 3, generator=generator, dtype=torch.float64)
    other[0, 0] = base[0, 0]  # distance 0: floored at 1e-6, so the other (equal) value is taken whole
    merged = run_merge("nearswap", [other], base, [{}], {"t": t})
    expected = []
    for a, b in zip(base.reshape(-1).tolist(), other.reshape(-1).tolist(), strict=True):
        share = min(1.0, max(0.0, t / max(abs(a - b), 1e-6)))
        expected.append(share * b + (1 - share) * a)
    assert torch.allclose(merged.reshape(-1), torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    if t == 10.0:
        assert torch.equal(merged, other)
    if t == 0.0:
        assert torch.equal(merged, base)
