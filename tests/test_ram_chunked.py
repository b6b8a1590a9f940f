"""RAM and RAM+ merged a chunk at a time on the CPU give the whole-tensor formula's bits, edge values included."""

from __future__ import annotations

import pytest
import torch

from moemerge.methods import ram
from moemerge.methods.ram import RamParams, RamPlusParams


def edgy_inputs(models: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    """A base and `models` inputs whose changes sit at, just above and just below ε, or are NaN, ±inf or ±0."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator).to(dtype)
    tensors = []
    for _ in range(models):
        delta = torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) < 0.5)
        tensor = (base.float() + delta).to(dtype)
        flat = tensor.reshape(-1)
        picks = torch.randint(0, flat.numel(), (12,), generator=generator)
        flat[picks[:3]] = base.reshape(-1)[picks[:3]] + 1e-2  # near ε = 1e-2 (after rounding, either side)
        flat[picks[3]] = float("nan")
        flat[picks[4]] = float("inf")
        flat[picks[5]] = -float("inf")
        flat[picks[6]] = -0.0
        tensors.append(tensor)
    return base, tensors


def whole(tensors, base, epsilon, boosts=None, params=None):
    """The whole-tensor reference: `_changes` then `_merged` on full-size temporaries."""
    deltas, changed, count = ram._changes(tensors, base, epsilon)
    if boosts is None:
        boosts = ram._boosts(*ram._counts(changed, count), params)
    return ram._merged(base, deltas, count, boosts)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("models", [1, 2, 3])
@pytest.mark.parametrize("chunk", [7, 64, 2**16])
def test_chunks_give_the_whole_tensor_bits(monkeypatch, dtype, models, chunk):
    monkeypatch.setattr(ram, "CHUNK", chunk)
    base, tensors = edgy_inputs(models, (13, 11), dtype, seed=models)
    params = RamPlusParams(epsilon=1e-2, r=0.5, alpha=0.7)
    expected = whole([t.clone() for t in tensors], base, 1e-2, [1.0] * models)
    assert same_bits(ram.merge([t.clone() for t in tensors], base, [], RamParams(epsilon=1e-2)), expected)
    expected_plus = whole([t.clone() for t in tensors], base, 1e-2, params=params)
    assert same_bits(ram.merge_plus([t.clone() for t in tensors], base, [], params), expected_plus)
    assert not same_bits(expected, expected_plus) or models == 1


class Rows:
    """A BlockSource over in-memory tensors: row blocks of `rows` rows, fresh copies on every pass."""

    def __init__(self, base: torch.Tensor, tensors: list[torch.Tensor], rows: int) -> None:
        self.base, self.tensors, self.rows = base, tensors, rows
        self.numel = base.numel()

    def blocks(self, models=None):
        width = self.base[0].numel()
        for first in range(0, self.base.shape[0], self.rows):
            rows = slice(first, first + self.rows)
            yield first * width, self.base[rows].clone(), [t[rows].clone() for t in self.tensors]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_two_passes_give_the_whole_tensor_bits(monkeypatch, dtype):
    """RAM+ statistics from row blocks, then each block merged, equal the one-call merge on the whole tensor."""
    monkeypatch.setattr(ram, "CHUNK", 9)
    base, tensors = edgy_inputs(3, (10, 6), dtype, seed=5)
    params = RamPlusParams(epsilon=1e-2, r=1.0, alpha=5.0)
    boosts = ram.statistics_plus(Rows(base, tensors, 3), [None] * 3, params)
    assert boosts == ram._boosts(*ram._counts(*ram._changes(tensors, base, 1e-2)[1:]), params)
    blocks = [
        ram.merge_block_plus(block, block_base, [], params, boosts, first)
        for first, block_base, block in Rows(base, tensors, 3).blocks()
    ]
    assert same_bits(torch.cat(blocks), whole([t.clone() for t in tensors], base, 1e-2, params=params))
