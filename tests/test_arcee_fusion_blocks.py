"""Arcee Fusion by rows and row blocks: the same bits as the whole-tensor computation it replaced."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_tensors
from test_two_pass import merge_both_ways

from moemerge.methods import arcee_fusion
from moemerge.methods.arcee_fusion import quartiles


def whole_tensor_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The method as it was: full-size p, q, p/q and log(p/q), quartiles by three `torch.kthvalue` calls."""
    p = torch.softmax(other, dim=-1).add_(1e-8)
    q = torch.softmax(base, dim=-1).add_(1e-8)
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    scores = torch.sub(other, base).abs_().mul_(divergence)
    flat = scores.reshape(-1)
    positions = (torch.tensor([0.25, 0.5, 0.75], dtype=torch.float32) * (flat.numel() - 1)).long().tolist()
    first, median, third = (float(torch.kthvalue(flat, position + 1).values) for position in positions)
    fused = scores >= median + 1.5 * (third - first)
    return other.clone().sub_(base).mul_(fused).add_(base)


def inputs(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=dtype)
    other = base + 0.05 * torch.randn(shape, generator=generator, dtype=dtype)
    rows = other.reshape(-1, shape[-1])
    rows[min(1, rows.shape[0] - 1), : max(1, shape[-1] // 8)] += 2.0  # moved a lot: these entries are the outliers
    return base, other


@pytest.fixture
def small_chunks(monkeypatch):
    """Divergences a few rows at a time on tiny tensors, so chunk boundaries fall inside every tensor."""
    monkeypatch.setattr(arcee_fusion, "ROW_CHUNK", 20)


@pytest.mark.parametrize(
    "shape, dtype",
    [((40, 16), torch.float32), ((40, 7), torch.float32), ((4, 10, 16), torch.float32), ((33,), torch.float32)]
    + [((40, 16), torch.float64), ((3, 2048), torch.float32)],
)
def test_merge_by_row_chunks_has_the_bits_of_the_whole_tensor_computation(small_chunks, shape, dtype) -> None:
    base, other = inputs(shape, seed=len(shape) + shape[-1], dtype=dtype)
    merged = arcee_fusion.merge([other.clone()], base, [arcee_fusion.Params()], arcee_fusion.Params())
    expected = whole_tensor_fusion(base, other)
    assert torch.equal(merged, expected)
    assert 0 < int((merged != base).sum()) < base.numel() // 4  # the cut did choose


@pytest.mark.parametrize("shape", [(40, 16), (40, 7), (6, 5, 16)])
@pytest.mark.parametrize("rows_per_block", [1, 3, 7, 40])
def test_two_passes_over_row_blocks_give_the_whole_tensor_bits(small_chunks, shape, rows_per_block) -> None:
    base, other = inputs(shape, seed=rows_per_block + shape[-1])
    whole, blocked = merge_both_ways("arcee_fusion", base, [other], [{}], {}, rows_per_block)
    expected = whole_tensor_fusion(base, other)
    assert torch.equal(whole, expected)
    assert torch.equal(blocked, expected)


def kthvalue_quartiles(values: torch.Tensor) -> list[float]:
    flat = values.reshape(-1)
    positions = (torch.tensor([0.25, 0.5, 0.75], dtype=torch.float32) * (flat.numel() - 1)).long().tolist()
    return [float(torch.kthvalue(flat, position + 1).values) for position in positions]


def values_of(values: list[float], dtype: torch.dtype) -> list[float]:
    return torch.tensor(values, dtype=dtype).tolist()


def same_values(found: list[float], expected: list[float]) -> bool:
    return all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(found, expected, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "values",
    [
        [0.5],
        [2.0, 1.0],
        [3.0, float("nan"), 1.0, 2.0],  # NaN ranks last, in both
        [float("nan")] * 5 + [1.0, 0.0],  # the median and Q3 are NaN
        [float("inf"), -0.0, 0.0, 1e-30, -1e-30, 0.0, float("-inf"), 7.0, 7.0, 7.0],
        list(range(100, 0, -1)),
    ],
)
def test_quartiles_selected_in_place_equal_torch_kthvalue(values, dtype) -> None:
    tensor = torch.tensor(values, dtype=dtype)
    expected = kthvalue_quartiles(tensor.clone())
    assert same_values(quartiles(tensor), expected)
    assert sorted(map(str, tensor.tolist())) == sorted(map(str, values_of(values, dtype)))  # only reordered


def test_quartiles_of_random_ties_equal_torch_kthvalue() -> None:
    generator = torch.Generator().manual_seed(3)
    for size in (1, 2, 3, 4, 5, 17, 1000, 4099):
        tensor = torch.randint(0, 7, (size,), generator=generator).float()
        tensor[torch.rand(size, generator=generator) < 0.05] = float("nan")
        assert same_values(quartiles(tensor.clone()), kthvalue_quartiles(tensor)), size


def test_the_two_pass_path_through_the_command_writes_the_same_model(
    toy_models, write_recipe, run_yaml, tmp_path, monkeypatch
) -> None:
    import moemerge.dense_merge

    recipe = {
        "merge_method": "arcee_fusion",
        "base_model": str(toy_models["base"]),
        "models": [{"model": str(toy_models["coder"])}],
        "dtype": "float32",
    }
    config = write_recipe(recipe)
    two_pass_tensors = []
    original = moemerge.dense_merge.merge_in_two_passes

    def counted(plan, merge, *args):
        two_pass_tensors.append(merge.spec.name)
        return original(plan, merge, *args)

    monkeypatch.setattr(moemerge.dense_merge, "merge_in_two_passes", counted)
    for label, block in (("whole", 10**9), ("blocks", 1000)):  # toy matrices hold 8192-24576 entries
        monkeypatch.setattr(moemerge.dense_merge, "BLOCK_ELEMENTS", block)
        result = run_yaml(config, tmp_path / label, "--quiet")
        assert result.exit_code == 0, result.output
        assert bool(two_pass_tensors) == (label == "blocks"), label
    whole, blocked = read_tensors(tmp_path / "whole"), read_tensors(tmp_path / "blocks")
    assert whole.keys() == blocked.keys()
    for name, tensor in whole.items():
        assert torch.equal(blocked[name], tensor), name
