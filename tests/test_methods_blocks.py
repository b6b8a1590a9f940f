"""The new two-pass methods merge a tensor in row blocks as they merge it whole (statistics summed over blocks)."""

from __future__ import annotations

import pytest
import torch

from moemerge.methods import get_method
from moemerge.methods.registry import BlockSource


class Blocks(BlockSource):
    """Row blocks of in-memory tensors, fresh copies on every pass; `base` may be None (no base model)."""

    def __init__(self, base: torch.Tensor | None, tensors: list[torch.Tensor], rows_per_block: int):
        self.base, self.tensors, self.rows_per_block = base, tensors, rows_per_block
        self.numel = tensors[0].numel()

    def blocks(self, models=None):
        chosen = [self.tensors[i] for i in models] if models is not None else self.tensors
        rows = self.tensors[0].shape[0]
        row_numel = self.numel // rows
        for start in range(0, rows, self.rows_per_block):
            stop = start + self.rows_per_block
            base = None if self.base is None else self.base[start:stop].clone()
            yield start * row_numel, base, [t[start:stop].clone() for t in chosen]


def merge_both_ways(name, base, tensors, models, parameters, rows_per_block):
    method = get_method(name)
    model_params = [method.model_params.model_validate(m) for m in models]
    method_params = method.method_params.model_validate(parameters)
    whole_base = None if base is None else base.clone()
    whole = method.merge(
        [t.clone() for t in tensors], whole_base, model_params, method_params, torch.Generator().manual_seed(9)
    )
    source = Blocks(base, tensors, rows_per_block)
    stats = method.two_pass.statistics(source, model_params, method_params, torch.Generator().manual_seed(9))
    blocks = [
        method.two_pass.merge_block(blocks, block_base, model_params, method_params, stats, first)
        for first, block_base, blocks in source.blocks()
    ]
    return whole, torch.cat(blocks)


GEN = torch.Generator().manual_seed(11)
BASE = torch.randn(30, 8, generator=GEN)
TENSORS = [BASE + torch.randn(30, 8, generator=GEN) * 0.1 for _ in range(3)]
CASES = [
    ("della", True, [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.7}, {"weight": 0.8}], {}),
    ("della_linear", True, [{"weight": 1.0, "density": 0.4, "epsilon": 0.3}] * 3, {"rescale": False}),
    ("model_stock", True, [{}] * 3, {}),
    ("model_stock", True, [{}] * 3, {"filter_wise": True}),
    ("nuslerp", True, [{"weight": 0.3}, {"weight": 0.7}], {}),
    ("nuslerp", False, [{"weight": 0.3}, {"weight": 0.7}], {"nuslerp_flatten": False}),
    ("nuslerp", True, [{"weight": 0.3}, {"weight": 0.7}], {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", True, [{"weight": w} for w in (0.2, 0.3, 0.5)], {}),
    ("multislerp", False, [{"weight": w} for w in (0.2, 0.3, 0.5)], {}),
    ("karcher", False, [{}] * 3, {}),
    ("ramplus_tl", True, [{}] * 3, {"epsilon": 0.05, "r": 0.5, "alpha": 1.0}),
]


@pytest.mark.parametrize("name, with_base, models, parameters", CASES)
@pytest.mark.parametrize("rows_per_block", [1, 7])
def test_blocks_match_the_whole_tensor(name, with_base, models, parameters, rows_per_block):
    tensors = TENSORS[: len(models)]
    whole, blocked = merge_both_ways(name, BASE if with_base else None, tensors, models, parameters, rows_per_block)
    # statistics summed by block may differ in their last bits; masks and per-row math are exact
    torch.testing.assert_close(blocked, whole, rtol=2e-6, atol=2e-6)
    if parameters.get("rescale") is False:  # DELLA without rescale: the same masks give the same bits
        assert torch.equal(blocked, whole)
