"""Inner products of whole flattened tensors, for the methods whose result is a linear combination of inputs.

Multi-SLERP, the Karcher mean and Model Stock (and NuSLERP on flattened tensors) only ever need the inputs'
norms and pairwise dot products: the merged tensor is Σ_i c_i x_i with coefficients found from the Gram
matrix. Computing that matrix in float64 (chunk by chunk, or summed over row blocks in a two-pass merge) and
the coefficients in Python floats keeps the geometry exact to float64 while the tensors stay in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GRAM_CHUNK = 2**20  # entries per input converted to float64 at once


def gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """G_ij = ⟨v_i, v_j⟩ over the flattened tensors, accumulated in float64; an n × n float64 CPU tensor."""
    flat = [vector.reshape(-1) for vector in vectors]
    total = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    numel = flat[0].numel()
    for start in range(0, numel, GRAM_CHUNK):
        chunk = torch.stack([vector[start : start + GRAM_CHUNK] for vector in flat]).to(torch.float64)
        total += (chunk @ chunk.T).cpu()
    return total


def combine(coefficients: Sequence[float], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i c_i x_i as a new tensor in the inputs' dtype (at least float32)."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    merged = torch.mul(tensors[0].to(dtype), coefficients[0])
    for tensor, coefficient in zip(tensors[1:], coefficients[1:], strict=True):
        merged.add_(tensor.to(dtype), alpha=coefficient)
    return merged
