"""The registry of merge methods, keyed by the name a recipe's `merge_method` uses.

A method is a pure function: it receives the tensors already loaded (same shape, math dtype),
one validated parameter object per input model, one validated parameter object for the method,
and a seeded generator; it returns the merged tensor. No files, no YAML, no globals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict

from moemerge.config.keys import did_you_mean
from moemerge.errors import ConfigError


class Params(BaseModel):
    """Base for parameter models: unknown keys are errors, so typos fail before any tensor is read."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NoParams(Params):
    pass


# merge(tensors, base, model_params, method_params, generator) -> merged tensor
#   tensors:       the non-base inputs, in recipe order (for methods without a base: all inputs), read fresh
#                  for this call: the method may overwrite them (task vectors are built in their memory, which
#                  saves one full-size copy per model); `base` is shared and read-only
#   base:          the base model's tensor, or None when the method does not use one
#   model_params:  one validated per-model parameter object per entry of `tensors`
#   method_params: the validated method-level parameters
#   generator:     seeded per output tensor (random methods only)
MergeFunction = Callable[
    [Sequence[torch.Tensor], "torch.Tensor | None", Sequence[BaseModel], BaseModel, "torch.Generator | None"],
    torch.Tensor,
]


class BlockSource:
    """Row blocks of one output tensor's inputs, read fresh on every pass (for two-pass methods).

    `blocks(models)` yields (first flat entry, base block or None, [blocks of the inputs at `models`]) in row
    order; `models=None` reads every input. Blocks are in the math dtype and owned by the caller.
    """

    numel: int

    def blocks(
        self, models: Sequence[int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor | None, list[torch.Tensor]]]:
        raise NotImplementedError


@dataclass(frozen=True)
class TwoPass:
    """How a method merges a large tensor in row blocks when its entries also depend on per-tensor statistics.

    `statistics(source, model_params, method_params, generator)` reads the blocks as often as it needs (norms, top-k
    thresholds) and returns what `merge_block(tensors, base, model_params, method_params, stats, first_entry)`
    needs to merge one block like the whole tensor would: memory stays at a few blocks and one statistics buffer
    instead of several full-size float32 copies per input.
    """

    statistics: Callable[..., object]
    merge_block: Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: MergeFunction
    model_params: type[Params] = NoParams  # per input model, e.g. weight, density
    method_params: type[Params] = NoParams  # per output tensor, e.g. t, normalize, lambda
    uses_base: bool = False  # needs base_model; the base is passed separately, not in `tensors`
    optional_base: bool = False  # uses base_model when the recipe names one (nuslerp, multislerp), else None
    base_is_input: bool = False  # base_model, when named, is one more plain input (karcher), as in mergekit
    random: bool = False  # draws from the generator (DARE)
    single_source: bool = False  # takes exactly one input (passthrough)
    model_count: int | None = None  # exactly this many non-base inputs (slerp: 1); None = any number
    min_model_count: int = 1  # at least this many non-base inputs (model_stock: 2)
    # Each output entry depends only on the same entry of each input (no norms, top-k or random draws over
    # the tensor), so a large tensor can be merged one block of rows at a time with the same bits.
    elementwise: bool = False
    # Takes its inputs in the math dtype as stored (bfloat16 too) and widens them chunk by chunk itself (linear):
    # no full-size float32 copy of each input.
    widens_inputs: bool = False
    two_pass: TwoPass | None = None  # per-tensor statistics, then blocks (SLERP, TIES); None: whole tensors

    def takes_base(self, base_model: str | None) -> bool:
        """Whether `base` is passed apart from `tensors` for a recipe whose base_model is `base_model`."""
        return self.uses_base or (self.optional_base and base_model is not None)

    def __reduce__(self) -> tuple:
        """Pickled as its registry name: a plan shipped to another process finds the same method there."""
        return get_method, (self.name,)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    METHODS[method.name] = method
    return method


def register_against_base(name: str, merge: MergeFunction, method_params: type[Params] = NoParams, **fields) -> None:
    """Register a method that merges base_model with exactly one other model (nearswap, arcee_fusion)."""
    register(
        MergeMethod(
            name=name,
            merge=merge,
            model_params=NoParams,
            method_params=method_params,
            uses_base=True,
            model_count=1,
            **fields,
        )
    )


def base_and_other(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The base and the one other input of a method registered against the base, the other in at least float32.

    The other input is this call's own copy (see MergeFunction): the method may compute in its memory.
    """
    assert base is not None
    (other,) = tensors
    return base, other.to(torch.promote_types(base.dtype, torch.float32))


def get_method(name: str) -> MergeMethod:
    from moemerge.methods import catalogue  # noqa: F401  (imports every method module, which registers itself)

    if name not in METHODS:
        hint = did_you_mean(name, METHODS)
        raise ConfigError(f"merge_method: unknown method {name!r}{hint}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]
