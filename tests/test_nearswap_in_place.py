"""NearSwap in one temporary: the same bits as the expression with four full-size temporaries it replaced."""

from __future__ import annotations

import pytest
import torch
from methods_support import run_merge


def four_temporaries(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    share = (t / torch.sub(base, other).abs_().clamp_(min=1e-6)).clamp_(0.0, 1.0)
    return other.clone().mul_(share).add_(base * (1.0 - share))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [0.0, 1e-4, 0.001, 0.3, 7.0, -0.5])
@pytest.mark.parametrize("shape", [(37, 11), (4099,), (3, 5, 16)])
def test_in_place_nearswap_has_the_bits_of_the_expression(dtype, t, shape) -> None:
    generator = torch.Generator().manual_seed(len(shape) + int(t * 1000))
    base = torch.randn(shape, generator=generator, dtype=dtype)
    spread = torch.rand(shape, generator=generator, dtype=dtype).pow_(6)  # distances from ~0 to ~1: every branch
    other = base + spread * torch.randn(shape, generator=generator, dtype=dtype)
    other.reshape(-1)[::17] = base.reshape(-1)[::17]  # distance 0: floored at 1e-6
    merged = run_merge("nearswap", [other], base, [{}], {"t": t})
    assert torch.equal(merged, four_temporaries(base, other, t))
