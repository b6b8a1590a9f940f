"""Round a method's result once to the math dtype.

Methods accumulate in float32, and `linear` in float64. torch converts float64 to bfloat16 or float16 through
float32, rounding twice; rounding to float32 *to odd* first (truncate, then set the last bit when anything
was dropped) keeps the information that the second rounding needs, so the result is the correctly rounded
one (float32 carries more than two bits beyond either half format).
"""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)
# entries rounded at once on the CPU: the chunk's temporaries stay in cache and are reused, where whole-tensor
# temporaries (five full-size float64/float32 copies) cost more in page faults than the rounding itself
ROUND_CHUNK = 2**16


def round_once(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, rounded to nearest (ties to even) in one step from its own precision."""
    if tensor.dtype != torch.float64 or dtype not in HALF_DTYPES:
        return tensor.to(dtype)
    # (several intra-op threads split a whole tensor between them; on small chunks they only get in each other's way)
    if tensor.device.type != "cpu" or tensor.numel() <= ROUND_CHUNK or torch.get_num_threads() > 1:
        return float32_round_to_odd(tensor).to(dtype)
    rounded = torch.empty(tensor.shape, dtype=dtype)
    flat_in, flat_out = tensor.reshape(-1), rounded.view(-1)
    scratch = _RoundScratch()
    for start in range(0, flat_in.numel(), ROUND_CHUNK):
        chunk = flat_in[start : start + ROUND_CHUNK]
        flat_out[start : start + ROUND_CHUNK].copy_(scratch.round_to_odd(chunk))
    return rounded


def float32_round_to_odd(tensor: torch.Tensor) -> torch.Tensor:
    """float64 → float32, rounded toward zero with the lowest bit set when the conversion was inexact."""
    nearest = tensor.to(torch.float32)
    widened = nearest.to(torch.float64)
    bits = nearest.view(torch.int32)
    # rounded away from zero: step one unit back toward zero (the magnitude bits are the int32's low 31)
    bits.sub_((widened.abs() > tensor.abs()).to(torch.int32))
    bits.bitwise_or_((widened != tensor).to(torch.int32))
    return bits.view(torch.float32)


class _RoundScratch:
    """`float32_round_to_odd` on chunks of at most ROUND_CHUNK entries, in buffers allocated once."""

    def __init__(self) -> None:
        self.nearest = torch.empty(ROUND_CHUNK, dtype=torch.float32)
        self.widened = torch.empty(ROUND_CHUNK, dtype=torch.float64)
        self.magnitude = torch.empty(ROUND_CHUNK, dtype=torch.float64)
        self.inexact = torch.empty(ROUND_CHUNK, dtype=torch.bool)
        self.away = torch.empty(ROUND_CHUNK, dtype=torch.bool)
        self.step = torch.empty(ROUND_CHUNK, dtype=torch.int32)

    def round_to_odd(self, chunk: torch.Tensor) -> torch.Tensor:
        """The same steps as `float32_round_to_odd`, into this scratch (valid until the next call)."""
        size = chunk.numel()
        nearest, widened, magnitude = self.nearest[:size], self.widened[:size], self.magnitude[:size]
        inexact, away, step = self.inexact[:size], self.away[:size], self.step[:size]
        nearest.copy_(chunk)
        widened.copy_(nearest)
        torch.ne(widened, chunk, out=inexact)
        torch.gt(widened.abs_(), torch.abs(chunk, out=magnitude), out=away)
        bits = nearest.view(torch.int32)
        bits.sub_(step.copy_(away))
        bits.bitwise_or_(step.copy_(inexact))
        return nearest
