"""NuSLERP, Multi-SLERP and Karcher in their inputs' memory: the same bits as with full-size temporaries."""

from __future__ import annotations

import pytest
import torch
from methods_support import run_merge

from moemerge.methods import inner_products, multislerp, nuslerp
from moemerge.methods.inner_products import combine, gram
from moemerge.methods.karcher import coefficients as karcher_coefficients
from moemerge.methods.scratch import ThreadBuffer


def inputs(count: int, shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=dtype)
    return base, [base + torch.randn(shape, generator=generator, dtype=dtype) * 0.3 for _ in range(count)]


def nuslerp_with_temporaries(tensors, base, t: float, flatten: bool, row_wise: bool) -> torch.Tensor:
    """NuSLERP as it was: fresh task vectors, a fresh sum."""
    v0, v1 = [tensor.clone() if base is None else tensor - base for tensor in tensors]
    if flatten:
        products = gram([v0, v1])
        cosine = nuslerp._cosine(products[0, 1], products[0, 0].sqrt(), products[1, 1].sqrt())
        scale0, scale1 = (float(scale) for scale in nuslerp.scales(cosine, t))
        merged = combine([scale0, scale1], [v0, v1])
    else:
        dot, square0, square1 = nuslerp._products(v0, v1, 0 if row_wise else -1)
        scale0, scale1 = nuslerp.scales(nuslerp._cosine(dot, square0.sqrt(), square1.sqrt()), t)
        merged = v0 * scale0.to(v0.dtype) + v1 * scale1.to(v1.dtype)
    return merged if base is None else merged.add_(base)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nuslerp_in_place_has_the_bits_of_fresh_temporaries(with_base, flatten, row_wise, dtype) -> None:
    base, tensors = inputs(2, (23, 9), seed=3 + flatten + 2 * row_wise, dtype=dtype)
    base = base if with_base else None
    parameters = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    merged = run_merge("nuslerp", tensors, base, [{"weight": 0.6}, {"weight": 0.4}], parameters)
    expected = nuslerp_with_temporaries(tensors, base, 0.4, flatten, row_wise)
    assert torch.equal(merged, expected)
    assert not torch.equal(merged, combine([0.6, 0.4], tensors))  # the arc differs from the chord


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_in_place_has_the_bits_of_fresh_temporaries(with_base) -> None:
    base, tensors = inputs(3, (31, 7), seed=5)
    base = base if with_base else None
    weights = [1.0, 0.5, 0.5]
    merged = run_merge("multislerp", tensors, base, [{"weight": w} for w in weights])
    vectors = [tensor.clone() if base is None else tensor - base for tensor in tensors]
    k = multislerp.coefficients(gram(vectors), [w / sum(weights) for w in weights], 1e-8)
    expected = combine(k, tensors) if base is None else combine([*k, 1.0 - sum(k)], [*tensors, base])
    assert torch.equal(merged, expected)


def test_karcher_in_place_has_the_bits_of_a_fresh_sum() -> None:
    _, tensors = inputs(3, (31, 7), seed=6)
    merged = run_merge("karcher", tensors, None, [{}, {}, {}])
    assert torch.equal(merged, combine(karcher_coefficients(gram(tensors), 10, 1e-5), tensors))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_in_place_reuses_only_an_input_of_the_compute_dtype(dtype) -> None:
    _, tensors = inputs(3, (5, 4), seed=7)
    tensors = [tensor.to(dtype) for tensor in tensors]
    originals = [tensor.clone() for tensor in tensors]
    merged = combine([0.5, -0.25, 2.0], tensors, in_place=True)
    assert torch.equal(merged, combine([0.5, -0.25, 2.0], originals))
    assert (merged.data_ptr() == tensors[0].data_ptr()) == (dtype == torch.float32)
    if dtype != torch.float32:  # widened: a fresh tensor, the input untouched
        assert torch.equal(tensors[0], originals[0])


def gram_of_fresh_chunks(vectors, origin, chunk_size: int) -> torch.Tensor:
    """The Gram matrix as it was built: a fresh stacked float64 copy of every chunk."""
    flat = [vector.reshape(-1) for vector in vectors]
    total = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for start in range(0, flat[0].numel(), chunk_size):
        rows = [vector[start : start + chunk_size] for vector in flat]
        if origin is not None:
            rows = [row - origin.reshape(-1)[start : start + chunk_size] for row in rows]
        chunk = torch.stack(rows).to(torch.float64)
        total += chunk @ chunk.T
    return total


@pytest.mark.parametrize("with_origin", [False, True])
@pytest.mark.parametrize("chunk_size, numel", [(64, 1000), (64, 1024), (4096, 1000), (64, 0)])
def test_gram_in_one_reused_chunk_has_the_bits_of_fresh_chunks(monkeypatch, with_origin, chunk_size, numel) -> None:
    monkeypatch.setattr(inner_products, "GRAM_CHUNK", chunk_size)
    base, tensors = inputs(3, (numel,), seed=numel + chunk_size)
    origin = base if with_origin else None
    products = gram(tensors, origin=origin)
    assert torch.equal(products, gram_of_fresh_chunks(tensors, origin, chunk_size))
    assert numel == 0 or not torch.equal(products, gram_of_fresh_chunks(tensors, None if with_origin else base, 64))


def test_gram_chunks_reuse_one_kept_buffer_per_thread(monkeypatch) -> None:
    monkeypatch.setattr(inner_products, "GRAM_CHUNK", 64)
    monkeypatch.setattr(inner_products, "GRAM_BUFFER", ThreadBuffer(2**23))  # this test's own thread state
    for count, numel in ((2, 500), (3, 1000), (2, 130), (4, 64)):  # grown, then reused by smaller and larger
        _, tensors = inputs(count, (numel,), seed=count * numel)
        assert torch.equal(gram(tensors), gram_of_fresh_chunks(tensors, None, 64))
    kept = inner_products.GRAM_BUFFER.kept
    assert kept.numel() == 4 * 64  # the largest chunk asked for: 4 inputs × 64 entries
    gram(inputs(2, (100,), seed=1)[1])
    assert inner_products.GRAM_BUFFER.kept is kept
    monkeypatch.setattr(inner_products.GRAM_BUFFER, "retained", 4 * 64)
    _, tensors = inputs(5, (100,), seed=2)
    assert torch.equal(gram(tensors), gram_of_fresh_chunks(tensors, None, 64))
    assert inner_products.GRAM_BUFFER.kept is kept  # a chunk above the cap is used once, not kept
