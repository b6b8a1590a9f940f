"""Round a method's result once to the math dtype.

Methods accumulate in float32, and `linear` in float64. torch converts float64 to bfloat16 or float16 through
float32, rounding twice; rounding to float32 *to odd* first (truncate, then set the last bit when anything
was dropped) keeps the information that the second rounding needs, so the result is the correctly rounded
one (float32 carries more than two bits beyond either half format).
"""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


def round_once(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, rounded to nearest (ties to even) in one step from its own precision."""
    if tensor.dtype != torch.float64 or dtype not in HALF_DTYPES:
        return tensor.to(dtype)
    return float32_round_to_odd(tensor).to(dtype)


def float32_round_to_odd(tensor: torch.Tensor) -> torch.Tensor:
    """float64 → float32, rounded toward zero with the lowest bit set when the conversion was inexact."""
    nearest = tensor.to(torch.float32)
    widened = nearest.to(torch.float64)
    bits = nearest.view(torch.int32)
    # rounded away from zero: step one unit back toward zero (the magnitude bits are the int32's low 31)
    bits.sub_((widened.abs() > tensor.abs()).to(torch.int32))
    bits.bitwise_or_((widened != tensor).to(torch.int32))
    return bits.view(torch.float32)
