"""Two-pass merges (SLERP, TIES on large tensors): statistics from row blocks, then each block, as the whole would."""

from __future__ import annotations

import pytest
import torch
from conftest import read_tensors

from moemerge.methods import get_method
from moemerge.methods.registry import BlockSource


class Blocks(BlockSource):
    """Row blocks of in-memory tensors, fresh copies on every pass (as the loader reads them)."""

    def __init__(self, base: torch.Tensor, tensors: list[torch.Tensor], rows_per_block: int):
        self.base, self.tensors, self.rows_per_block = base, tensors, rows_per_block
        self.numel = base.numel()

    def blocks(self, models=None):
        chosen = [self.tensors[i] for i in models] if models is not None else self.tensors
        row_numel = self.numel // self.base.shape[0]
        for start in range(0, self.base.shape[0], self.rows_per_block):
            stop = start + self.rows_per_block
            yield start * row_numel, self.base[start:stop].clone(), [t[start:stop].clone() for t in chosen]


def merge_both_ways(name: str, base, tensors, models: list[dict], parameters: dict, rows_per_block: int):
    method = get_method(name)
    model_params = [method.model_params.model_validate(m) for m in models]
    method_params = method.method_params.model_validate(parameters)
    whole = method.merge(
        [t.clone() for t in tensors], base.clone(), model_params, method_params, torch.Generator().manual_seed(9)
    )
    source = Blocks(base, tensors, rows_per_block)
    stats = method.two_pass.statistics(source, model_params, method_params, torch.Generator().manual_seed(9))
    blocks = [
        method.two_pass.merge_block(blocks, block_base, model_params, method_params, stats, first)
        for first, block_base, blocks in source.blocks()
    ]
    return whole, torch.cat(blocks)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("rows_per_block", [1, 3, 7, 40])
def test_ties_in_blocks_equals_ties_on_the_whole_tensor_even_with_ties_at_the_cut(density, rows_per_block):
    generator = torch.Generator().manual_seed(int(density * 100) + rows_per_block)
    base = torch.randint(-3, 4, (40, 9), generator=generator).float() / 4
    # small integer deltas: many equal magnitudes straddle every threshold, so the tie rule is exercised
    tensors = [base + torch.randint(-4, 5, (40, 9), generator=generator).float() / 8 for _ in range(3)]
    models = [{"weight": w, "density": density} for w in (1.0, 0.6, -0.3)]
    whole, blocked = merge_both_ways("ties", base, tensors, models, {}, rows_per_block)
    assert torch.equal(blocked, whole)


def test_ties_rescale_in_blocks_matches_within_rounding():
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(30, 8, generator=generator)
    tensors = [base + torch.randn(30, 8, generator=generator) * 0.1 for _ in range(2)]
    models = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}]
    whole, blocked = merge_both_ways("ties", base, tensors, models, {"rescale": True}, 4)
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)
    assert not torch.equal(whole, merge_both_ways("ties", base, tensors, models, {}, 4)[0])  # rescale did act


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("rescale", [False, True])
def test_dare_in_blocks_draws_the_same_masks_as_the_whole_tensor(name, rescale):
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(30, 8, generator=generator)
    tensors = [base + torch.randn(30, 8, generator=generator) * 0.1 for _ in range(3)]
    models = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.7}, {"weight": 0.8, "density": 1.0}]
    whole, blocked = merge_both_ways(name, base, tensors, models, {"rescale": rescale}, 4)
    if rescale:  # L1 sums by block: the factor may differ in its last bits
        torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(blocked, whole)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_in_blocks_matches_the_whole_tensor(t):
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(50, 6, generator=generator)
    other = torch.randn(50, 6, generator=generator)
    whole, blocked = merge_both_ways("slerp", base, [other], [{}], {"t": t}, 7)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "slerp", "dare_ties"])
def test_two_pass_merges_through_the_command(toy_models, write_recipe, run_yaml, tmp_path, monkeypatch, method):
    import moemerge.dense_merge

    names = ("coder",) if method == "slerp" else ("coder", "math", "story")
    models = [{"model": str(toy_models[name]), "parameters": {"weight": 1.0, "density": 0.4}} for name in names]
    recipe = {"merge_method": method, "base_model": str(toy_models["base"]), "models": models, "dtype": "float32"}
    if method == "slerp":
        recipe["models"] = [{"model": str(toy_models["coder"])}]
        recipe["parameters"] = {"t": 0.4}
    config = write_recipe(recipe)
    for label, block in (("whole", 10**9), ("blocks", 1000)):  # toy matrices hold 8192-24576 entries
        monkeypatch.setattr(moemerge.dense_merge, "BLOCK_ELEMENTS", block)
        result = run_yaml(config, tmp_path / label, "--quiet")
        assert result.exit_code == 0, result.output
    whole, blocked = read_tensors(tmp_path / "whole"), read_tensors(tmp_path / "blocks")
    for name, tensor in whole.items():
        if method == "ties":
            assert torch.equal(blocked[name], tensor), name
        elif method == "dare_ties":  # same masks; the rescale factor from block sums may differ in its last bits
            torch.testing.assert_close(blocked[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(blocked[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
