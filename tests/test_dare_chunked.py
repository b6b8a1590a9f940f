"""DARE's chunked drops (masks drawn a chunk at a time, packed between passes) give the bits of whole-tensor draws.

The reference below is DARE as it was before the masks were chunked: one `torch.rand` over each whole task vector
in model order, the mask multiplied in, the L1 rescale and the weight as whole-tensor passes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_two_pass import Blocks

from moemerge.methods import get_method, sparsify
from moemerge.methods.task_vectors import add_task_vectors


def l1(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor, ord=1, dtype=torch.float32))


def reference_dare(tensors, base, models, rescale, sign_consensus, normalize, seed, block_rows=None):
    """Whole-mask DARE; with `block_rows` the rescale factor sums L1 norms over those row blocks (two-pass rule)."""
    generator = torch.Generator().manual_seed(seed)
    weighted = []
    for tensor, model in zip(tensors, models, strict=True):
        delta = tensor - base
        if model["density"] < 1.0:
            keep = torch.rand(delta.shape, generator=generator) < model["density"]
            if block_rows is None:
                before = l1(delta)
                delta = delta * keep
                kept = l1(delta)
                if rescale and kept > 0.0:
                    delta = delta * (before / kept)
            else:
                blocks = range(0, delta.shape[0], block_rows)
                before = sum(l1(delta[s : s + block_rows].abs()) for s in blocks)
                delta = delta * keep
                kept = sum(l1(delta[s : s + block_rows].abs()) for s in blocks)
                factor = before / kept if kept > 0.0 else 1.0
                if rescale and factor != 1.0:
                    delta = delta * factor
        weighted.append(delta * model["weight"])
    weights = [model["weight"] for model in models]
    return add_task_vectors(base, weighted, weights, sign_consensus=sign_consensus, normalize=normalize, scale=0.7)


def inputs(shape=(53, 37), count=3, seed=3):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    tensors = [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(count)]
    tensors[0].view(-1)[::5] = base.view(-1)[::5]  # exact zeros in δ: the sign election's and -0.0's edge cases
    return base, tensors


MODELS = {
    "mixed": [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.2}, {"weight": -0.4, "density": 0.9}],
    "edges": [{"weight": 1.0, "density": 0.0}, {"weight": 0.5, "density": 1.0}, {"weight": 0.8, "density": 0.3}],
}


def merge_with(name, base, tensors, models, parameters, seed=11):
    method = get_method(name)
    model_params = [method.model_params.model_validate(m) for m in models]
    method_params = method.method_params.model_validate(parameters)
    return method, model_params, method_params, torch.Generator().manual_seed(seed)


@pytest.fixture(params=[7, 1000, 2**16])
def small_chunks(request, monkeypatch):
    """Chunk sizes that split tensors and blocks unevenly (7: not a multiple of 8, the packed masks' byte)."""
    monkeypatch.setattr(sparsify, "DRAW_CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("models", ["mixed", "edges"])
def test_whole_tensor_merge_is_bit_identical_to_whole_masks(small_chunks, name, rescale, models) -> None:
    base, tensors = inputs()
    parameters = {"rescale": rescale, "normalize": True, "lambda": 0.7}
    method, model_params, method_params, generator = merge_with(name, base, tensors, MODELS[models], parameters)
    merged = method.merge([t.clone() for t in tensors], base, model_params, method_params, generator)
    expected = reference_dare(tensors, base, MODELS[models], rescale, name == "dare_ties", normalize=True, seed=11)
    assert torch.equal(merged, expected)
    assert torch.equal(torch.signbit(merged), torch.signbit(expected))  # -0.0 where the reference has it


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("rows_per_block", [1, 5, 53])
def test_two_pass_merge_is_bit_identical_to_whole_masks(small_chunks, name, rescale, rows_per_block) -> None:
    base, tensors = inputs()
    models = MODELS["mixed"]
    parameters = {"rescale": rescale, "normalize": False, "lambda": 0.7}
    method, model_params, method_params, generator = merge_with(name, base, tensors, models, parameters)
    source = Blocks(base, tensors, rows_per_block)
    cuts = method.two_pass.statistics(source, model_params, method_params, generator)
    assert all(cut.keep is None for cut in cuts)  # packed masks, not one byte per entry
    merged = torch.cat(
        [
            method.two_pass.merge_block(blocks, block_base, model_params, method_params, cuts, first)
            for first, block_base, blocks in source.blocks()
        ]
    )
    expected = reference_dare(
        tensors, base, models, rescale, name == "dare_ties", normalize=False, seed=11, block_rows=rows_per_block
    )
    assert torch.equal(merged, expected)
    assert torch.equal(torch.signbit(merged), torch.signbit(expected))


def test_chunked_draws_leave_the_generator_where_whole_draws_do(small_chunks) -> None:
    generator, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    delta = torch.randn(1001)
    expected = delta * (torch.rand(1001, generator=reference) < 0.4)
    sparsify.drop_random_in_chunks(delta, 0.4, generator)
    assert torch.equal(delta, expected)
    assert torch.equal(torch.rand(9, generator=generator), torch.rand(9, generator=reference))


@pytest.mark.parametrize("start, count", [(0, 1), (3, 17), (8, 8), (13, 300), (999, 2)])
def test_packed_masks_unpack_any_range(start, count) -> None:
    keep = torch.rand(1001, generator=torch.Generator().manual_seed(1)) < 0.5
    packed = np.packbits(keep.numpy())
    assert torch.equal(sparsify.unpack_keep(packed, start, count), keep[start : start + count])


def bool_sign_election(base, weighted_deltas, weights, normalize, scale):
    """The sign election as it was: bool masks, converted to a float factor once per model."""
    total = weighted_deltas[0].clone()
    for weighted in weighted_deltas[1:]:
        total += weighted
    positive = total >= 0
    divisor = torch.zeros_like(base) if normalize else None
    terms = []
    for weighted, weight in zip(weighted_deltas, weights, strict=True):
        factor = ((weighted > 0) & positive | (weighted < 0) & ~positive).to(weighted.dtype)
        terms.append(weighted * factor)
        if divisor is not None:
            divisor.add_(factor, alpha=weight)
    mixed = terms[0]
    for term in terms[1:]:
        mixed += term
    if divisor is not None:
        divisor += divisor == 0
        mixed /= divisor
    return mixed.mul_(scale).add_(base)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[1.0, 0.5, 0.8], [1.0, -1.0, 0.3], [0.7]])
def test_float_sign_election_has_the_bits_of_the_bool_one(normalize, weights) -> None:
    """Signed zeros, infinities, NaN and cancelling weights: byte-equal, -0.0 and NaN payloads included."""
    generator = torch.Generator().manual_seed(2)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-30, -1e-30, 3.0, -3.0])
    size = 4000
    base = special[torch.randint(0, len(special), (size,), generator=generator)].clone()
    base[::3] = torch.randn(base[::3].shape, generator=generator)
    deltas = []
    for _ in weights:
        delta = torch.randn(size, generator=generator)
        pick = torch.rand(size, generator=generator) < 0.4
        delta[pick] = special[torch.randint(0, len(special), (int(pick.sum()),), generator=generator)]
        deltas.append(delta)
    expected = bool_sign_election(base, [d.clone() for d in deltas], weights, normalize, 0.9)
    merged = add_task_vectors(
        base, [d.clone() for d in deltas], weights, sign_consensus=True, normalize=normalize, scale=0.9
    )
    assert torch.equal(merged.view(torch.int32), expected.view(torch.int32))
