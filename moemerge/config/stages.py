"""Multi-stage recipes (mergekit-multi's format): several YAML documents, each a merge with a `name:`; a later
document uses an earlier merge as a model by writing its name. The one unnamed document (or the named one no
other stage uses) is the final merge."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moemerge.config.merge_recipe import MergeRecipe, parse_merge_recipe, read_yaml_documents, single_recipe
from moemerge.errors import ConfigError

log = logging.getLogger(__name__)

# Keys whose string values are model references (a stage name there means that stage's output folder).
REFERENCE_KEYS = ("model", "base_model", "tokenizer_source", "source")


@dataclass(frozen=True)
class Stage:
    name: str | None  # None: the unnamed final document
    document: dict[str, Any]  # as written (less `name`), stage names unresolved
    recipe: MergeRecipe  # validated; references to other stages are still their names
    needs: tuple[str, ...]  # stages whose outputs this one reads, in first-use order

    @property
    def label(self) -> str:
        return repr(self.name) if self.name is not None else "(final)"

    def resolved(self, folders: dict[str, Path]) -> tuple[MergeRecipe, dict[str, Any]]:
        """The recipe with every stage name replaced by that stage's output folder."""
        document = _replace_references(self.document, {name: str(folder) for name, folder in folders.items()})
        return parse_merge_recipe(document, f"stage {self.label}"), document


def _stage_of(reference: str, names: set[str]) -> str | None:
    """The stage a model reference points at (`name`, or `name+lora` for a LoRA on top of it), if any."""
    head = reference.split("+", 1)[0]
    return head if head in names else None


def _references(value: Any, names: set[str], key: str | None = None) -> list[str]:
    if isinstance(value, dict):
        return [found for child_key, child in value.items() for found in _references(child, names, child_key)]
    if isinstance(value, list):
        return [found for child in value for found in _references(child, names, key)]
    if isinstance(value, str) and key in REFERENCE_KEYS:
        stage = _stage_of(value, names)
        return [stage] if stage else []
    return []


def _replace_references(value: Any, folders: dict[str, str], key: str | None = None) -> Any:
    if isinstance(value, dict):
        return {child_key: _replace_references(child, folders, child_key) for child_key, child in value.items()}
    if isinstance(value, list):
        return [_replace_references(child, folders, key) for child in value]
    if isinstance(value, str) and key in REFERENCE_KEYS and (stage := _stage_of(value, set(folders))):
        return folders[stage] + value[len(stage) :]
    return value


def _ordered(stages: dict[str | None, Stage]) -> list[Stage]:
    """Every stage after the stages it needs (file order otherwise); a cycle is a ConfigError."""
    done: list[Stage] = []
    visiting: list[str | None] = []

    def visit(stage: Stage) -> None:
        if stage in done:
            return
        if stage.name in visiting:
            cycle = " -> ".join(map(str, [*visiting[visiting.index(stage.name) :], stage.name]))
            raise ConfigError(f"stages form a cycle: {cycle}")
        visiting.append(stage.name)
        for name in stage.needs:
            visit(stages[name])
        visiting.pop()
        done.append(stage)

    for stage in stages.values():
        visit(stage)
    return done


def load_stages(path: Path) -> tuple[list[Stage], str]:
    """The stages of a recipe file in run order (the final merge last) and the file's text.

    A single-document file is one unnamed stage (a `name:` there is ignored, as mergekit-yaml ignores it).
    """
    documents, text = read_yaml_documents(path)
    if len(documents) == 1:
        recipe = single_recipe(documents[0], Path(path).name)  # the file is read once: it may be a pipe
        document = {key: value for key, value in documents[0].items() if key != "name"}
        return [Stage(None, document, recipe, ())], text
    stages: dict[str | None, Stage] = {}
    parsed: list[tuple[str | None, dict[str, Any], MergeRecipe]] = []
    for index, data in enumerate(documents, start=1):
        name = data.get("name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"document {index}: name: must be a string, got {name!r}")
        if name in [seen for seen, _, _ in parsed]:
            what = f"two stages are named {name!r}" if name else "more than one document has no name"
            raise ConfigError(f"document {index}: {what}; every stage but the final one needs its own name")
        document = {key: value for key, value in data.items() if key != "name"}
        parsed.append((name, document, parse_merge_recipe(document, f"document {index} ({name or 'unnamed'})")))
    names = {name for name, _, _ in parsed if name is not None}
    for name, document, recipe in parsed:
        needs = tuple(dict.fromkeys(_references(document, names)))
        if name in needs:
            raise ConfigError(f"stage {name!r} uses itself as a model")
        stages[name] = Stage(name, document, recipe, needs)
    used = {need for stage in stages.values() for need in stage.needs}
    finals = [stage for stage in stages.values() if stage.name is None] or [
        stage for stage in stages.values() if stage.name not in used
    ]
    if len(finals) != 1:
        listed = ", ".join(stage.label for stage in finals)
        raise ConfigError(
            f"stages {listed} are all final (no other stage uses them); a recipe file builds one model: "
            "leave the final stage unnamed, or use each of the others in a later stage"
        )
    ordered = _ordered(stages)
    ordered.remove(finals[0])
    return [*ordered, finals[0]], text
