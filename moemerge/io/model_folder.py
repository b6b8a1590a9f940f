"""The non-tensor files of an output model folder: config, tokenizer, model card, recipe."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from moemerge import __version__
from moemerge.errors import OutputError
from moemerge.io.model_ref import hub_ids, is_hub_id, split_revision

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing `path` (disk full, permissions) into one readable OutputError."""
    try:
        yield
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise OutputError(f"disk full while writing {path}: free space or choose another output folder") from None
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_config(folder: Path, config: dict, *, out_dtype: torch.dtype | None = None) -> None:
    """config.json, with `dtype`/`torch_dtype` set to the saved dtype so transformers loads it as written."""
    config = dict(config)
    if out_dtype is not None:
        config["torch_dtype"] = dtype_name(out_dtype)
        config["dtype"] = dtype_name(out_dtype)
    with writing(folder / "config.json"):
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(source: Path, folder: Path) -> list[str]:
    """Copy the tokenizer files that exist in `source`; returns their names."""
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        with writing(folder / name):
            shutil.copyfile(source / name, folder / name)
    if not copied:
        log.warning("no tokenizer files in %s; the output has no tokenizer", source)
    return copied


def copy_generation_config(source: Path, folder: Path) -> None:
    if (source / "generation_config.json").is_file():
        with writing(folder / "generation_config.json"):
            shutil.copyfile(source / "generation_config.json", folder / "generation_config.json")


def write_recipe(folder: Path, file_name: str, recipe: dict) -> str:
    text = yaml.safe_dump(recipe, sort_keys=False)
    with writing(folder / file_name):
        (folder / file_name).write_text(text)
    return text


def write_model_card(
    folder: Path,
    *,
    title: str,
    base_models: Sequence[str],
    summary: str,
    recipe_text: str,
    extra_tags: Sequence[str] = (),
) -> None:
    """README.md with Hugging Face front-matter, what was done, the inputs, and the recipe that did it.

    `base_model:` lists only hub repo ids (as mergekit, which writes `[]` when every input is a local folder);
    local folders are named in the text instead.
    """
    front = {
        "base_model": hub_ids(base_models),
        "library_name": "transformers",
        "tags": ["merge", "moemerge", *extra_tags],
    }
    card = (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False)
        + "---\n\n"
        + f"# {title}\n\n"
        + f"{summary}\n\n"
        + _inputs(base_models)
        + f"Made with moemerge {__version__}.\n\n"
        + "## Recipe\n\n```yaml\n"
        + recipe_text
        + "```\n"
    )
    with writing(folder / "README.md"):
        (folder / "README.md").write_text(card)


def _inputs(references: Sequence[str]) -> str:
    """The input models as a list: hub repos linked to their pages, local folders as written in the recipe."""
    lines = [
        f"- [{reference}](https://huggingface.co/{split_revision(reference)[0]})"
        if is_hub_id(reference)
        else f"- `{reference}` (local folder)"
        for reference in dict.fromkeys(references)
    ]
    return "Inputs:\n\n" + "\n".join(lines) + "\n\n" if lines else ""
