"""The MoE assembly recipe: mergekit-moe's YAML format, validated before any tensor is read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moemerge.config.keys import did_you_mean, schema_keys
from moemerge.config.recipe_file import read_recipe
from moemerge.errors import ConfigError
from moemerge.vocab.config import VocabularyKeys

if TYPE_CHECKING:
    import torch

MOE_DTYPES = ("float32", "float16", "bfloat16")  # names, not torch objects: recipes are checked before torch loads

GateMode = Literal["hidden", "cheap_embed", "random", "uniform_random", "fitted"]
MoeArchitecture = Literal[
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen", "glm4_moe"
]  # qwen: qwen3_moe from a Qwen3 base, else qwen2_moe
# mergekit-moe picks the output whose name ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE") starts with the
# value, ignoring case. Its DeepSeek output (model_type `deepseek`, remote code) is written as GLM-4-MoE, the
# native transformers class with the same attention, unweighted shared experts and n_shared_experts.
ARCHITECTURE_ALIASES = {
    "qwen2": "qwen2_moe",
    "qwen3": "qwen3_moe",
    "qwen moe": "qwen",
    "qwen3 moe": "qwen3_moe",
    "deepseek": "glm4_moe",
    "deepseek moe": "glm4_moe",
    "deepseek_moe": "glm4_moe",
}
PROMPT_GATE_MODES = ("hidden", "cheap_embed")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExpertEntry(Strict):
    """One expert: whose MLP it is, which prompts should route to it, and how to scale it."""

    source_model: str
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    calibration_files: list[str] = Field(default_factory=list)  # gate_mode fitted: plain-text files of this expert
    noise: float = Field(default=0.0, ge=0.0)  # std of seeded Gaussian noise added to this expert's router row
    # mergekit's: std of seeded Gaussian noise added to this expert's MLP weights (sparse upcycling of one model)
    noise_scale: float | None = Field(default=None, ge=0.0)
    residual_scale: float = 1.0  # multiplies the expert's down projection (after any noise, as mergekit)


class MoeRecipe(VocabularyKeys, Strict):
    """mergekit-moe's keys, plus moemerge's `tokenizer_source` / `tokenizer` / `chat_template` (as in dense recipes)."""

    base_model: str
    architecture: MoeArchitecture | None = None
    gate_mode: GateMode = "hidden"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    experts_per_token: int = Field(default=2, ge=1)
    # moemerge's: renormalise the top-k routing weights (Qwen MoEs' config key); unset, the family's default
    norm_topk_prob: bool | None = None
    experts: list[ExpertEntry] = Field(min_length=1)
    shared_experts: list[ExpertEntry] = Field(default_factory=list)

    @field_validator("architecture", mode="before")
    @classmethod
    def _mergekit_spelling(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return ARCHITECTURE_ALIASES.get(value, value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MoeRecipe:
        if self.experts_per_token > len(self.experts):
            raise ValueError(
                f"experts_per_token is {self.experts_per_token} but only {len(self.experts)} experts are listed"
            )
        if self.gate_mode == "fitted":
            for index, expert in enumerate(self.experts):
                if not expert.positive_prompts and not expert.calibration_files:
                    raise ValueError(
                        f"experts[{index}]: gate_mode 'fitted' needs positive_prompts or calibration_files "
                        f"({expert.source_model})"
                    )
        elif self.gate_mode in PROMPT_GATE_MODES:
            for index, expert in enumerate(self.experts):
                if not expert.positive_prompts:
                    raise ValueError(
                        f"experts[{index}].positive_prompts: gate_mode {self.gate_mode!r} needs at least one "
                        f"positive prompt per expert ({expert.source_model})"
                    )
        return self

    @property
    def torch_dtype(self) -> torch.dtype | None:
        if not self.dtype:
            return None
        import torch

        return getattr(torch, self.dtype)


def _location(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def explain_validation_error(error: ValidationError) -> str:
    """The first pydantic problem as one line that names the recipe key."""
    first = error.errors()[0]
    where = _location(first["loc"])
    if first["type"] == "extra_forbidden":
        hint = did_you_mean(str(first["loc"][-1]), schema_keys(MoeRecipe)) or " (check its spelling)"
        return f"recipe key {where!r} is not a mergekit-moe key{hint}"
    if first["type"] == "missing":
        return f"recipe key {where!r} is required"
    message = first["msg"].removeprefix("Value error, ")
    return f"recipe key {where!r}: {message}" if where else f"recipe: {message}"


def parse_moe_recipe(data: Any) -> MoeRecipe:
    if not isinstance(data, dict):
        raise ConfigError("recipe must be a YAML mapping with base_model and experts")
    try:
        return MoeRecipe.model_validate(data)
    except ValidationError as error:
        raise ConfigError(explain_validation_error(error)) from None


def load_moe_recipe(path: Path) -> tuple[MoeRecipe, dict]:
    """The validated recipe and the raw mapping (copied into the output as written); a pipe works too."""
    data, _ = read_recipe(path)
    return parse_moe_recipe(data), data
