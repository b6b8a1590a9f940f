"""The dense-merge recipe: mergekit's YAML format, validated before any tensor is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moemerge.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}

Scalar = bool | int | float | str


class Conditional(BaseModel):
    """One `{filter, value}` entry: applies to tensors whose name contains `filter` (absent or `*`: all)."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[float]


# A scalar, a gradient (list of numbers over the layers), or a list of filtered values.
ParameterValue = Scalar | list[float] | list[Conditional]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(Strict):
    model: str
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _at_most_one_adapter(cls, model: str) -> str:
        if model.count("+") > 1 or model.startswith("+") or model.endswith("+"):
            raise ValueError(f"{model!r}: expected MODEL or MODEL+LORA_ADAPTER (mergekit's syntax)")
        return model


class SliceSource(ModelEntry):
    layer_range: tuple[int, int]

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, layer_range: tuple[int, int]) -> tuple[int, int]:
        start, end = layer_range
        if not 0 <= start < end:
            raise ValueError(f"layer_range {list(layer_range)} must be [start, end) with 0 <= start < end")
        return layer_range


class OutputSlice(Strict):
    sources: list[SliceSource] = Field(min_length=1)
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)
    base_model: str | None = None

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {source.layer_range[1] - source.layer_range[0] for source in self.sources}
        if len(lengths) > 1:
            ranges = [list(source.layer_range) for source in self.sources]
            raise ValueError(f"sources in one slice must span the same number of layers, got {ranges}")
        return self


class MergeRecipe(Strict):
    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    name: str | None = None  # mergekit multi-stage name; accepted, unused

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
        return value

    @field_validator("tokenizer_source")
    @classmethod
    def _no_union(cls, value: str | None) -> str | None:
        if value == "union":
            raise ValueError("'union' is not supported yet; use 'base' or a model reference")
        return value

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeRecipe:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty")
        return self

    @property
    def math_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None

    @property
    def saved_dtype(self) -> torch.dtype | None:
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else None


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """The first pydantic error as `key.path: message` (one line, naming the key)."""
    first = error.errors()[0]
    location = ".".join(f"[{part}]" if isinstance(part, int) else str(part) for part in first["loc"])
    location = location.replace(".[", "[")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    return f"{prefix}{location}: {message}" if location else f"{prefix}{message}"


def read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    """The YAML mapping in `path` and its text; a missing file or bad YAML is a ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read recipe {path}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of keys (merge_method, models, ...)")
    return data, text


def load_merge_recipe(path: Path) -> tuple[MergeRecipe, str]:
    data, text = read_yaml(path)
    try:
        return MergeRecipe.model_validate(data), text
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, prefix=f"{Path(path).name}: ")) from None
