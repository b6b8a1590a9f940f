"""Resolve a recipe's parameter values for one output tensor: scalars, layer gradients and name filters.

Precedence is mergekit's: source-level > slice-level > global > the method's default.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import ValidationError

from moemerge.config.merge_recipe import Conditional, ParameterValue, Scalar
from moemerge.errors import ConfigError
from moemerge.methods.registry import MergeMethod, Params

log = logging.getLogger(__name__)


def layer_position(index: int, count: int) -> float:
    """Where layer `index` of an output slice of `count` layers sits on a gradient: idx/(n-1), 1 for n = 1."""
    return index / (count - 1) if count > 1 else 1.0


def evaluate(value: ParameterValue, tensor_name: str, t: float) -> Scalar | None:
    """The value for `tensor_name` at gradient position `t` (None when no filter entry matches)."""
    if isinstance(value, list) and value and isinstance(value[0], Conditional):
        for entry in value:
            if entry.filter in (None, "", "*") or entry.filter in tensor_name:
                return evaluate(entry.value, tensor_name, t)
        return None
    if isinstance(value, list):
        if not value:
            return None
        # np.interp over evenly spaced knots: the gradient's first value at t=0, its last at t=1
        return float(np.interp(t, np.linspace(0.0, 1.0, len(value)), value))
    return value


def lookup(name: str, levels: Sequence[Mapping[str, ParameterValue]], tensor_name: str, t: float) -> Scalar | None:
    """First level (most specific first) that has a value for `name` at this tensor."""
    for level in levels:
        if name in level:
            resolved = evaluate(level[name], tensor_name, t)
            if resolved is not None:
                return resolved
    return None


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
    """Unknown parameter names are typos: fail before any tensor is read."""
    known = field_names(method.model_params) | field_names(method.method_params)
    for name in parameters:
        if name not in known:
            choices = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"{where}.{name}: unknown parameter for {method.name} (it takes: {choices})")


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
    for name in field_names(params_type):
        value = lookup(name, levels, tensor_name, t)
        if value is not None:
            values[name] = value
    return _build(params_type, values, where)
