"""Inner products of whole flattened tensors, for the methods whose result is a linear combination of inputs.

Multi-SLERP, the Karcher mean and Model Stock (and NuSLERP on flattened tensors) only ever need the inputs'
norms and pairwise dot products: the merged tensor is Σ_i c_i x_i with coefficients found from the Gram
matrix. Computing that matrix in float64 (chunk by chunk, or summed over row blocks in a two-pass merge) and
the coefficients in Python floats keeps the geometry exact to float64 while the tensors stay in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moemerge.methods.scratch import ThreadBuffer

GRAM_CHUNK = 2**20  # entries per input converted to float64 at once
# per worker thread: the float64 chunk its Gram matrices reuse, kept up to 64 MiB
GRAM_BUFFER = ThreadBuffer(retained=2**23)


def gram(vectors: Sequence[torch.Tensor], origin: torch.Tensor | None = None) -> torch.Tensor:
    """G_ij = ⟨v_i − o, v_j − o⟩ over the flattened tensors (o = `origin`, or 0), accumulated in float64.

    An n × n float64 CPU tensor. The offsets from `origin` are formed a chunk at a time, never as full-size copies.
    """
    flat = [vector.reshape(-1) for vector in vectors]
    flat_origin = origin.reshape(-1) if origin is not None else None
    total = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    numel = flat[0].numel()
    # one float64 chunk (and one offset row) filled in place for every chunk: the same values as stacking fresh
    # copies, without two new chunk-sized allocations per chunk (which fragment the allocator's heaps)
    device = flat[0].device
    buffer = GRAM_BUFFER.get(len(flat) * min(GRAM_CHUNK, numel), device)
    offset = None
    if flat_origin is not None:
        dtype = torch.promote_types(flat[0].dtype, flat_origin.dtype)
        offset = torch.empty(min(GRAM_CHUNK, numel), dtype=dtype, device=device)
    for start in range(0, numel, GRAM_CHUNK):
        size = min(GRAM_CHUNK, numel - start)
        chunk = buffer[: len(flat) * size].view(len(flat), size)  # contiguous, as a fresh stacked chunk
        for row, vector in zip(chunk, flat, strict=True):
            part = vector[start : start + size]
            if flat_origin is not None and offset is not None:
                part = torch.sub(part, flat_origin[start : start + size], out=offset[:size])
            row.copy_(part)
        total += (chunk @ chunk.T).cpu()
    return total


def combine(coefficients: Sequence[float], tensors: Sequence[torch.Tensor], in_place: bool = False) -> torch.Tensor:
    """Σ_i c_i x_i in the inputs' dtype (at least float32): a new tensor, or with `in_place` built in the first
    input's memory when it already has that dtype (a method's own input; the same bits either way)."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    first = tensors[0].to(dtype)
    merged = first.mul_(coefficients[0]) if in_place else torch.mul(first, coefficients[0])
    for tensor, coefficient in zip(tensors[1:], coefficients[1:], strict=True):
        merged.add_(tensor.to(dtype), alpha=coefficient)
    return merged
