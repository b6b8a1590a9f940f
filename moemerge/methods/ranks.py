"""The stable ascending order of each row of magnitudes, by radix sorts of their bits (MAGPRUNE's ranking).

The bits of a non-negative float order as an unsigned integer. numpy's stable argsort of 16-bit integers is a
radix sort (linear time), so a float32 row is ordered in two stable passes: by the low 16 bits, then by the high
16 bits (least significant digit first), which gives torch's stable float order, ties by column. Measured ~4× less
CPU than torch's comparison-based stable sort on 2048- and 5632-wide rows. NaN sorts last as in torch: every NaN
bit pattern becomes one, just above infinity, so NaNs tie and rank by column; the sign bit is dropped, so −0.0
ties with +0.0. Other dtypes (float64) take torch's stable argsort.
"""

from __future__ import annotations

import numpy as np
import torch

# dtype → (same-width integer view, bits of +inf): the canonical NaN is the pattern just above +inf
_KEY_BITS = {
    torch.float32: (torch.int32, 0x7F800000),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
}


def ascending_columns(rows: torch.Tensor) -> torch.Tensor:
    """Column indices (int64, same shape) that sort each row of a 2-d CPU tensor of |values| stably ascending.

    The same order as `torch.argsort(rows, dim=1, stable=True)` for non-negative values, NaN and ±0.0 included.
    """
    if rows.dtype not in _KEY_BITS or rows.numel() == 0:
        return torch.argsort(rows, dim=1, stable=True)
    integer, infinity = _KEY_BITS[rows.dtype]
    bits = rows.contiguous().view(integer) & torch.iinfo(integer).max  # without the sign bit
    bits.clamp_(max=infinity + 1)  # every NaN → one NaN, above +inf
    if integer == torch.int16:
        return _stable_argsort_16(bits)
    by_low = _stable_argsort_16(bits.to(torch.int16))  # the cast keeps the low 16 bits
    high_in_that_order = (bits >> 16).to(torch.int16).gather(1, by_low)
    return by_low.gather(1, _stable_argsort_16(high_in_that_order))


def _stable_argsort_16(keys: torch.Tensor) -> torch.Tensor:
    """Stable argsort along dim 1 of 16-bit keys read as unsigned (numpy's radix sort), as int64 torch indices."""
    return torch.from_numpy(np.argsort(keys.numpy().view(np.uint16), axis=1, kind="stable"))
