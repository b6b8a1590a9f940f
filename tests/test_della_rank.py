"""MAGPRUNE ranking by radix sorts of the magnitudes' bits: the masks of the stable-argsort pipeline it replaced."""

from __future__ import annotations

import pytest
import torch
from test_methods_blocks import merge_both_ways

from moemerge.methods import della
from moemerge.methods.della import drop_magprune, keep_probabilities, magprune_keep
from moemerge.methods.ranks import ascending_columns
from moemerge.methods.sparsify import l1_norm, rescale_l1

SETTINGS = [(0.5, 0.1), (0.3, 0.25), (0.9, 0.05), (0.02, 0.01)]  # (density, epsilon)
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def reference_keep(magnitudes: torch.Tensor, draws: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """The former implementation: a stable argsort per row, int64 ranks scattered back, float64 probabilities."""
    width = magnitudes.shape[1]
    order = torch.argsort(magnitudes, dim=1, stable=True)
    positions = torch.arange(width).reshape(1, width, *[1] * (magnitudes.dim() - 2)).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions.contiguous())
    spread = ranks.to(torch.float64).div_(width - 1) if width > 1 else torch.zeros(ranks.shape, dtype=torch.float64)
    return draws < spread.mul_(2 * epsilon).add_(density - epsilon)


def reference_drop(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    """The former whole-tensor drop: every draw at once, one mask, one multiply."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    draws = torch.rand(delta.numel(), generator=generator).reshape(rows.shape)
    keep = reference_keep(rows.abs(), draws, density, epsilon)
    l1_before = l1_norm(delta) if rescale else 0.0
    delta.mul_(keep.reshape(delta.shape))
    return rescale_l1(delta, l1_before) if rescale else delta


def special_magnitudes(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Magnitudes full of ties, zeros of both signs, infinities and NaNs with differing bit patterns."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.tensor([0.0, -0.0, 1.0, 2.0, 1e-3, 0.5, float("inf"), float("nan")], dtype=torch.float64)
    values = pool[torch.randint(len(pool), shape, generator=generator)].to(dtype)
    if dtype != torch.float64:  # NaNs of other payloads and of either sign: all rank as one NaN
        integer = torch.int32 if dtype == torch.float32 else torch.int16
        bits = values.view(integer)
        nan = values.isnan()
        sign = torch.iinfo(integer).min  # the sign bit
        payloads = torch.randint(1, 64, shape, generator=generator, dtype=integer)
        negative = torch.rand(shape, generator=generator) < 0.5
        bits[nan] = (bits[nan] | payloads[nan]) | torch.where(negative[nan], sign, 0).to(integer)
    return values


def random_magnitudes(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).abs_().to(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(5, 1), (9, 2), (3, 7), (40, 300), (2, 5000)])
@pytest.mark.parametrize("make", [random_magnitudes, special_magnitudes])
def test_ascending_columns_is_torchs_stable_argsort(dtype: torch.dtype, shape: tuple[int, int], make) -> None:
    magnitudes = make(shape, dtype, seed=sum(shape))
    assert torch.equal(ascending_columns(magnitudes), torch.argsort(magnitudes, dim=1, stable=True))


def test_random_float32_magnitudes_have_few_ties_and_special_ones_many() -> None:
    """The two kinds of input above test different things: distinct keys, and ties ranked by column."""
    assert random_magnitudes((40, 300), torch.float32, 1).unique().numel() > 11000
    special = special_magnitudes((40, 300), torch.float32, 1)
    assert int(special.isnan().sum()) > 1000 and special.view(torch.int32)[special.isnan()].unique().numel() > 50
    assert int((special.view(torch.int32) == torch.iinfo(torch.int32).min).sum()) > 1000  # -0.0


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(6, 1), (6, 2), (17, 33), (3, 9000), (4, 7, 5), (2, 300, 3)])
@pytest.mark.parametrize("density, epsilon", SETTINGS)
def test_mask_equals_the_former_ranking(dtype: torch.dtype, shape: tuple[int, ...], density: float, epsilon: float):
    for make in (random_magnitudes, special_magnitudes):
        magnitudes = make(shape, dtype, seed=len(shape) + shape[1])
        draws = torch.rand(shape, generator=torch.Generator().manual_seed(shape[0]))
        keep = magprune_keep(magnitudes, draws, density, epsilon)
        assert keep.shape == magnitudes.shape
        assert torch.equal(keep, reference_keep(magnitudes, draws, density, epsilon))


@pytest.mark.parametrize("width", [1, 2, 3, 1000])
def test_draws_at_the_probability_itself_compare_as_before(width: int) -> None:
    """Draws that are the float32 roundings of p(r) and their neighbours: the comparison is made in float64."""
    density, epsilon = 0.35, 0.2
    magnitudes = torch.arange(width, dtype=torch.float32).flip(0).repeat(3, 1)  # rank r at column n − 1 − r
    rounded = keep_probabilities(width, density, epsilon).flip(0).to(torch.float32).repeat(3, 1)
    draws = torch.stack([rounded[0], rounded[1].nextafter(torch.tensor(0.0)), rounded[2].nextafter(torch.tensor(1.0))])
    keep = magprune_keep(magnitudes, draws, density, epsilon)
    assert torch.equal(keep, reference_keep(magnitudes, draws, density, epsilon))
    assert not bool(keep[2].any()) and bool(keep[1].all())


def test_keep_probabilities_are_the_per_entry_formula() -> None:
    for width in (1, 2, 5632):
        probability = keep_probabilities(width, 0.5, 0.1)
        expected = [(0.5 - 0.1) + 2 * 0.1 * (r / (width - 1) if width > 1 else 0.0) for r in range(width)]
        assert probability.dtype == torch.float64
        assert torch.allclose(probability, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("shape", [(2000,), (1,), (37, 64), (64, 37), (5, 6, 7)])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drop_in_chunks_of_rows_equals_the_former_whole_tensor_drop(monkeypatch, shape, rescale, dtype) -> None:
    """Chunks of a few rows (far below the real RANK_ENTRIES) draw the same stream and drop the same entries."""
    monkeypatch.setattr(della, "RANK_ENTRIES", 100)
    generator = torch.Generator().manual_seed(7)
    delta = torch.randn(shape, generator=generator, dtype=dtype)
    flat = delta.view(-1)
    flat[::2] = flat[::2].mul(4).round_().div_(4)  # ties across rows and columns
    for density, epsilon in SETTINGS:
        mine, theirs = (torch.Generator().manual_seed(3) for _ in range(2))
        dropped = drop_magprune(delta.clone(), density, epsilon, rescale, mine)
        assert torch.equal(dropped, reference_drop(delta.clone(), density, epsilon, rescale, theirs))
        assert torch.equal(torch.rand(4, generator=mine), torch.rand(4, generator=theirs))  # same draws consumed


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("shape, rows_per_block", [((13, 5), 3), ((9, 8), 2), ((4, 3), 1), ((7, 1), 4)])
def test_packed_masks_of_blocks_off_byte_boundaries_are_the_whole_tensor_masks(name, shape, rows_per_block) -> None:
    """Blocks whose first entry is not a multiple of 8 pack their masks across byte boundaries without a gap."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=generator)
    tensors = [base + torch.randn(shape, generator=generator) for _ in range(2)]
    models = [{"weight": 1.0, "density": 0.5, "epsilon": 0.3}, {"weight": 0.7, "density": 0.4, "epsilon": 0.2}]
    whole, blocked = merge_both_ways(name, base, tensors, models, {"rescale": False}, rows_per_block)
    assert torch.equal(blocked, whole)
