"""The dense-merge recipe: mergekit's YAML format, validated before any tensor is read."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from moemerge.config.keys import did_you_mean, schema_keys
from moemerge.config.method_names import MERGE_METHODS
from moemerge.config.recipe_file import read_recipe_documents
from moemerge.errors import ConfigError
from moemerge.vocab.config import VocabularyKeys

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

# recipe spelling → torch dtype name (names, not torch objects: a recipe is checked before torch is imported)
DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[name])


Scalar = bool | int | float | str


class Conditional(BaseModel):
    """One `{filter, value}` entry: applies to tensors whose name contains `filter` (absent or `*`: all)."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[Scalar]


# A scalar, a gradient (a list over the layers: numbers interpolate, booleans and strings are picked per layer),
# or filtered values (one `{filter, value}` mapping or a list of them).
ParameterValue = Scalar | list[Scalar] | Conditional | list[Conditional]


def _empty_when_null(value: Any) -> Any:
    return {} if value is None else value  # `parameters:` with every key commented out is an empty mapping


Parameters = Annotated[dict[str, ParameterValue], BeforeValidator(_empty_when_null)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ignored_key(data: Any, key: str, where: str, why: str) -> Any:
    """Drop a key mergekit tolerates but that changes nothing, with a warning that names it."""
    if isinstance(data, dict) and key in data:
        data = dict(data)
        data.pop(key)
        log.warning("%s%s: ignored (%s)", where, key, why)
    return data


def _model_string(model: Any) -> Any:
    """mergekit's mapping forms of a model reference (`{path, revision}`, `{model: {path, revision}}`) as a string."""
    if isinstance(model, dict) and set(model) <= {"model", "lora", "override_architecture"} and "model" in model:
        if model.get("lora") or model.get("override_architecture"):
            raise ValueError("model references with 'lora' or 'override_architecture' are not supported yet")
        model = model["model"]
    if isinstance(model, dict) and set(model) <= {"path", "revision"} and "path" in model:
        return f"{model['path']}@{model['revision']}" if model.get("revision") else model["path"]
    return model


class ModelEntry(Strict):
    model: str
    parameters: Parameters = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _revision(cls, data: Any) -> Any:
        """A per-source `revision:` is the same as `model: name@revision`."""
        if not isinstance(data, dict):
            return data
        data = dict(data, model=_model_string(data.get("model")))
        revision = data.pop("revision", None)
        if revision is not None:
            model = data.get("model")
            if isinstance(model, str) and "@" in model and model.split("@", 1)[1] != str(revision):
                raise ValueError(f"revision {revision!r} contradicts the revision in model {model!r}")
            if isinstance(model, str) and "@" not in model:
                data["model"] = f"{model}@{revision}"
        return data

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
    parameters: Parameters = Field(default_factory=dict)
    base_model: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _stray(cls, data: Any) -> Any:
        return _ignored_key(data, "residual_weight", "slices[]: ", "mergekit 0.1.5 reads it nowhere either")

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {source.layer_range[1] - source.layer_range[0] for source in self.sources}
        if len(lengths) > 1:
            ranges = [list(source.layer_range) for source in self.sources]
            raise ValueError(f"sources in one slice must span the same number of layers, got {ranges}")
        return self


class OutputModule(Strict):
    """One entry of `modules:`: a module group's own `models:` or `slices:`, and its parameters."""

    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters = Field(default_factory=dict)

    @model_validator(mode="after")
    def _models_or_slices(self) -> OutputModule:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices'")
        return self


class MergeRecipe(VocabularyKeys, Strict):
    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    base_model: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    name: str | None = None  # a stage's name in a multi-document recipe; a single recipe ignores it

    @model_validator(mode="before")
    @classmethod
    def _stray(cls, data: Any) -> Any:
        return _ignored_key(data, "out_path", "", "the output folder is the command's OUT argument")

    @field_validator("base_model", "tokenizer_source", mode="before")
    @classmethod
    def _reference(cls, value: Any) -> Any:
        return _model_string(value)

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in MERGE_METHODS:
            hint = did_you_mean(value, MERGE_METHODS)
            raise ValueError(f"unknown method {value!r}{hint}; known: {', '.join(MERGE_METHODS)}")
        return value

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
        return value

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeRecipe:
        given = [key for key in ("models", "slices", "modules") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'models', 'slices' or 'modules'")
        if not getattr(self, given[0]):
            raise ValueError(f"{given[0]!r} is empty")
        return self

    @property
    def math_dtype(self) -> torch.dtype | None:
        return torch_dtype(self.dtype) if self.dtype else None

    @property
    def saved_dtype(self) -> torch.dtype | None:
        name = self.out_dtype or self.dtype
        return torch_dtype(name) if name else None


def describe_validation_error(error: ValidationError, prefix: str = "", schema: type[BaseModel] | None = None) -> str:
    """The first pydantic error as `key.path: message` (one line, naming the key)."""
    first = error.errors()[0]
    location = ".".join(f"[{part}]" if isinstance(part, int) else str(part) for part in first["loc"])
    location = location.replace(".[", "[")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1]) if first["loc"] else ""
        message = "unknown key" + did_you_mean(key, schema_keys(schema or MergeRecipe))
    elif first["type"] == "missing":
        message = "required key is missing"
    return f"{prefix}{location}: {message}" if location else f"{prefix}{message}"


def read_yaml_documents(path: Path) -> tuple[list[dict[str, Any]], str]:
    """The YAML mappings in `path` (one per `---` document) and its text; unreadable or bad YAML is a ConfigError."""
    return read_recipe_documents(path)


def read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    """The one YAML mapping in `path` and its text (a multi-document file is a ConfigError)."""
    documents, text = read_yaml_documents(path)
    if len(documents) > 1:
        raise ConfigError(f"{Path(path).name}: {len(documents)} YAML documents where one recipe was expected")
    return documents[0], text


def parse_merge_recipe(data: dict[str, Any], where: str) -> MergeRecipe:
    """One recipe document, validated; errors name `where` and the key."""
    try:
        return MergeRecipe.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, prefix=f"{where}: ")) from None


def load_merge_recipe(path: Path) -> tuple[MergeRecipe, str]:
    """A single-document recipe and its text (multi-stage files: `moemerge.config.stages.load_stages`)."""
    documents, text = read_yaml_documents(path)
    if len(documents) > 1:
        raise ConfigError(f"{Path(path).name}: {len(documents)} YAML documents: a multi-stage recipe, run it whole")
    return single_recipe(documents[0], Path(path).name), text


def single_recipe(data: dict[str, Any], where: str) -> MergeRecipe:
    """The recipe of a single-document file (where `name:` names nothing, as in mergekit-yaml)."""
    recipe = parse_merge_recipe(data, where)
    if recipe.name is not None:
        log.warning("name: ignored (%r names a stage only in a multi-document recipe)", recipe.name)
    return recipe
