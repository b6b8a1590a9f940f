"""Read a recipe file into a YAML mapping: the one loader every command uses.

A file, a pipe (`<(...)`) or /dev/stdin all work: the file is read once, as bytes. Everything a user can get
wrong here (an unreadable or absurdly long path, bytes that are not UTF-8, a key given twice, nesting too deep
for the parser, YAML syntax) is a one-line ConfigError that names the line when there is one.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import yaml

from moemerge.errors import ConfigError
from moemerge.io.output_dir import protect_recipe

MAX_RECIPE_BYTES = 64 * 2**20  # a recipe is a few kilobytes; this only stops a wrong file from filling memory


def shown(text: str, limit: int = 80) -> str:
    """A path or name short enough for a one-line message."""
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 4 :]} ({len(text)} characters)"


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not 'the last one wins'."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys may be overridden by the mapping's own keys, as YAML intends
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not None:
                raise ConfigError(f"line {line}: duplicate key {key!r} (first given on line {first})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_recipe_text(path: Path | str) -> str:
    """The recipe's text: read once as bytes (so pipes work), decoded as UTF-8."""
    name = shown(str(path))
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise ConfigError(f"cannot read recipe {name}: the path is too long") from None
        raise ConfigError(f"cannot read recipe {name}: {error.strerror or error}") from None
    protect_recipe(path)  # --overwrite may not replace a folder that holds the recipe
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {name} is larger than {MAX_RECIPE_BYTES // 2**20} MiB: not a recipe")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(f"recipe {name} line {line}: not UTF-8 text (byte {raw[error.start]:#04x})") from None


def parse_recipe_documents(text: str, name: str = "recipe") -> list[dict[str, Any]]:
    """The YAML mappings in `text`, one per `---` document; duplicate keys, bad syntax and runaway nesting are
    ConfigErrors."""
    try:
        documents = [data for data in yaml.load_all(text, Loader=_RecipeLoader) if data is not None]  # noqa: S506
    except ConfigError as error:
        raise ConfigError(f"{name} {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{name}{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply to be a recipe") from None
    if not documents or not all(isinstance(data, dict) for data in documents):
        raise ConfigError(f"{name}: a recipe must be a YAML mapping of keys (merge_method, models, ...)")
    return documents


def parse_recipe(text: str, name: str = "recipe") -> dict[str, Any]:
    """The single YAML mapping in `text`."""
    documents = parse_recipe_documents(text, name)
    if len(documents) > 1:
        raise ConfigError(f"{name}: {len(documents)} YAML documents where one recipe was expected")
    return documents[0]


def read_recipe_documents(path: Path | str) -> tuple[list[dict[str, Any]], str]:
    """The YAML mappings (one per `---` document) in the recipe file at `path` (a file or a pipe) and its text."""
    text = read_recipe_text(path)
    return parse_recipe_documents(text, shown(str(path))), text


def read_recipe(path: Path | str) -> tuple[dict[str, Any], str]:
    """The YAML mapping in the recipe file at `path` (a file or a pipe) and its text."""
    text = read_recipe_text(path)
    return parse_recipe(text, shown(str(path))), text
