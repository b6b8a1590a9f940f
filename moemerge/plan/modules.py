"""`modules:` in a recipe: named module groups, each with its own models or slices and parameters.

mergekit names the one module of a plain decoder model `default` (its architecture definitions list several
only for multimodal models, e.g. `text_decoder` and `vision_tower`). A recipe without `modules:` is one module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moemerge.architectures import Architecture
from moemerge.config.keys import did_you_mean
from moemerge.config.merge_recipe import MergeRecipe, ModelEntry, OutputSlice, ParameterValue
from moemerge.errors import ConfigError

DEFAULT_MODULE = "default"


@dataclass(frozen=True)
class ModuleRecipe:
    """One module group's inputs: `models` or `slices`, its parameters, and where it sits in the recipe."""

    name: str
    models: list[ModelEntry] | None
    slices: list[OutputSlice] | None
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    where: str = ""  # prefix for keys in error messages: "" or "modules.default."


def module_names(arch: Architecture) -> tuple[str, ...]:
    """The module groups of an architecture, as `modules:` names them."""
    return tuple(getattr(arch, "modules", None) or (DEFAULT_MODULE,))


def recipe_modules(recipe: MergeRecipe, arch: Architecture) -> list[ModuleRecipe]:
    """The recipe's module groups; without `modules:` the whole recipe is the `default` one."""
    if recipe.modules is None:
        return [ModuleRecipe(DEFAULT_MODULE, recipe.models, recipe.slices)]
    known = module_names(arch)
    for name in recipe.modules:
        if name not in known:
            listed = ", ".join(map(repr, known))
            raise ConfigError(
                f"modules.{name}: {arch.name} models have no module {name!r}{did_you_mean(name, known)} "
                f"(their modules: {listed})"
            )
    if len(known) > 1:
        raise ConfigError(f"modules: {arch.name} has several module groups; moemerge merges single-module models")
    return [
        ModuleRecipe(name, module.models, module.slices, module.parameters, f"modules.{name}.")
        for name, module in recipe.modules.items()
    ]
