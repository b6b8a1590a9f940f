"""Write the output's tokenizer and generation config so they agree with the rows that were written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from moemerge.io.model_folder import copy_generation_config, copy_tokenizer
from moemerge.vocab.alignment import OutputVocabulary
from moemerge.vocab.build import remap_token_ids
from moemerge.vocab.chat_templates import resolve_chat_template
from moemerge.vocab.tokenizers import load_tokenizer

log = logging.getLogger(__name__)


def write_tokenizer(
    folder: Path,
    *,
    vocabulary: OutputVocabulary | None,
    tokenizer_folder: Path,
    chat_template: str | None,
    input_folders: list[Path],
    copy: bool = True,
) -> None:
    """The rebuilt tokenizer, or the reference's files copied; re-saved with the recipe's chat template if it has one.

    As in mergekit, a rebuilt tokenizer is written even with --no-copy-tokenizer: the rows follow it.
    """
    if vocabulary is None and not chat_template:
        if copy:
            copy_tokenizer(tokenizer_folder, folder)
        return
    if vocabulary is None and not copy:
        log.warning("chat_template is set but --no-copy-tokenizer writes no tokenizer: the template is not saved")
        return
    tokenizer = vocabulary.tokenizer if vocabulary is not None else None
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_folder, str(tokenizer_folder), required=True)
    if chat_template:
        templates = []
        if chat_template == "auto":
            for input_folder in input_folders:
                model_tokenizer = load_tokenizer(input_folder, str(input_folder), required=False)
                templates.append(getattr(model_tokenizer, "chat_template", None))
        text = resolve_chat_template(chat_template, templates)
        if text is None:
            log.warning("chat_template auto: no input has a chat template; none is written")
        else:
            tokenizer.chat_template = text
    tokenizer.save_pretrained(folder)


def write_generation_config(reference_folder: Path, folder: Path, vocabulary: OutputVocabulary | None) -> None:
    """The reference's generation_config.json, its bos/eos/pad ids moved to the output vocabulary's."""
    copy_generation_config(reference_folder, folder)
    path = folder / "generation_config.json"
    if vocabulary is None or not path.is_file():
        return
    settings = json.loads(path.read_text())
    remap_token_ids(settings, vocabulary)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
