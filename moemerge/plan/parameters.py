"""Resolve a recipe's parameter values for one output tensor: scalars, layer gradients and name filters.

Precedence is mergekit's: source-level > slice-level > global > the method's default.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Mapping, Sequence
from typing import Union, get_args, get_origin

import numpy as np
from pydantic import ValidationError

from moemerge.config.keys import did_you_mean
from moemerge.config.merge_recipe import Conditional, ParameterValue, Scalar
from moemerge.errors import ConfigError
from moemerge.methods.registry import METHODS, MergeMethod, Params

log = logging.getLogger(__name__)

# Every parameter name of mergekit 0.1.5's merge methods: a recipe may carry one that its own method does not
# take (mergekit's tests write `weight` under slerp); mergekit ignores it, so moemerge warns and ignores it.
MERGEKIT_PARAMETERS = frozenset(
    {
        "alpha",
        "density",
        "eps",
        "epsilon",
        "filter_wise",
        "gamma",
        "int8_mask",
        "lambda",
        "max_iter",
        "normalize",
        "normalize_weights",
        "nuslerp_flatten",
        "nuslerp_row_wise",
        "r",
        "rescale",
        "scale",
        "select_topk",
        "t",
        "tol",
        "weight",
    }
)


def layer_position(index: int, count: int) -> float:
    """Where layer `index` of an output slice of `count` layers sits on a gradient: idx/(n-1), 1 for n = 1."""
    return index / (count - 1) if count > 1 else 1.0


def evaluate(value: ParameterValue, tensor_name: str, t: float, discrete: bool = False) -> Scalar | None:
    """The value for `tensor_name` at gradient position `t` (None when no filter entry matches).

    A numeric gradient interpolates; a gradient of a boolean or string parameter (`discrete`), or one holding
    booleans, picks entry int(t·(n−1)), as mergekit does.
    """
    if isinstance(value, Conditional):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], Conditional):
        for entry in value:
            if entry.filter in (None, "", "*") or entry.filter in tensor_name:
                return evaluate(entry.value, tensor_name, t, discrete)
        return None
    if isinstance(value, list):
        if not value:
            return None
        if discrete or any(isinstance(item, bool) for item in value):
            return value[int(t * (len(value) - 1))]
        try:
            knots = [float(item) for item in value]  # YAML reads `1e-5` as a string; mergekit parses it too
        except ValueError:
            return value[int(t * (len(value) - 1))]
        # np.interp over evenly spaced knots: the gradient's first value at t=0, its last at t=1
        return float(np.interp(t, np.linspace(0.0, 1.0, len(value)), knots))
    return value


def lookup(
    name: str, levels: Sequence[Mapping[str, ParameterValue]], tensor_name: str, t: float, discrete: bool = False
) -> Scalar | None:
    """First level (most specific first) that has a value for `name` at this tensor."""
    for level in levels:
        if name in level:
            resolved = evaluate(level[name], tensor_name, t, discrete)
            if resolved is not None:
                return resolved
    return None


def _is_discrete(annotation: object) -> bool:
    """A field whose values are picked, not interpolated: anything but int/float (optionally None)."""
    kinds = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return not all(kind in (int, float, type(None)) for kind in kinds)


def _build(params_type: type[Params], values: dict[str, Scalar], where: str) -> Params:
    try:
        return params_type.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "parameters"
        if first["type"] == "missing":
            raise ConfigError(f"{where}: parameter {key!r} is required") from None
        raise ConfigError(f"{where}: parameter {key!r}: {first['msg']}") from None


def field_names(params_type: type[Params]) -> set[str]:
    """The YAML names a parameter model accepts (aliases where a name is a Python keyword)."""
    return {field.alias or name for name, field in params_type.model_fields.items()}


def check_names(method: MergeMethod, parameters: Mapping[str, ParameterValue], where: str) -> None:
    """Another method's parameter is ignored with a warning (as mergekit ignores it); any other unknown name is a
    typo and fails before any tensor is read."""
    known = field_names(method.model_params) | field_names(method.method_params)
    anywhere = set(MERGEKIT_PARAMETERS)
    for other in METHODS.values():
        anywhere |= field_names(other.model_params) | field_names(other.method_params)
    for name in parameters:
        if name in known:
            continue
        if name in anywhere:
            log.warning("%s.%s: ignored (not a parameter of %s)", where, name, method.name)
            continue
        choices = ", ".join(sorted(known)) or "none"
        hint = did_you_mean(name, known) or did_you_mean(name, anywhere)
        raise ConfigError(f"{where}.{name}: unknown parameter for {method.name}{hint} (it takes: {choices})")


def resolve_model_params(
    method: MergeMethod,
    levels: Sequence[Mapping[str, ParameterValue]],
    tensor_name: str,
    t: float,
    where: str,
) -> Params:
    return _resolve(method.model_params, levels, tensor_name, t, f"{where} ({tensor_name})")


def resolve_method_params(
    method: MergeMethod,
    levels: Sequence[Mapping[str, ParameterValue]],
    tensor_name: str,
    t: float,
) -> Params:
    return _resolve(method.method_params, levels, tensor_name, t, f"parameters ({tensor_name})")


def _resolve(
    params_type: type[Params], levels: Sequence[Mapping[str, ParameterValue]], tensor_name: str, t: float, where: str
) -> Params:
    """Each field of `params_type` from the first level that sets it for this tensor, validated together."""
    values = {}
    for name, field in params_type.model_fields.items():
        key = field.alias or name
        value = lookup(key, levels, tensor_name, t, _is_discrete(field.annotation))
        if value is not None:
            values[key] = value
    return _build(params_type, values, where)
