"""Load the inputs' tokenizers and build the output tokenizer: `base`, `union`, or another model's, plus `tokens:`.

The union follows mergekit: the base tokenizer, then every other input's ordinary tokens it lacks (added as
plain added tokens, in each input's id order), then every input's added tokens with their own settings
(special, normalized, ...), first seen wins. Unlike mergekit, inputs are visited in recipe order, so the
ids of the added tokens do not depend on set ordering.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from moemerge.errors import ConfigError

log = logging.getLogger(__name__)


def load_tokenizer(folder: Path, label: str, *, required: bool, trust_remote_code: bool = False):
    """A transformers tokenizer from `folder`, or None (with a warning) when there is none and it is optional."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        if required:
            raise ConfigError(f"model {label!r}: cannot load its tokenizer ({error})") from None
        log.warning("model %r: no usable tokenizer (%s); assuming the base model's vocabulary", label, error)
        return None


def usable_vocab(tokenizer, rows: int, label: str) -> dict[str, int]:
    """Token → id for the tokens that have an embedding row (id < rows); the others are ignored, as in mergekit."""
    vocab = tokenizer.get_vocab()
    beyond = sorted((index, token) for token, index in vocab.items() if index >= rows)
    if beyond:
        log.warning("model %r: %d tokens have ids >= its %d embedding rows and are ignored", label, len(beyond), rows)
    return {token: index for token, index in vocab.items() if index < rows}


def copy_tokenizer_object(tokenizer, trust_remote_code: bool = False):
    """A fresh copy (saved and reloaded), so adding tokens never touches the input's tokenizer."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def union_tokenizer(base, others: list[tuple[object, dict[str, int]]], base_vocab: dict[str, int]):
    """The base tokenizer extended by every token of `others` (tokenizer, usable vocab) that it lacks."""
    from tokenizers import AddedToken

    out = copy_tokenizer_object(base)
    known = set(base_vocab)
    added_settings: dict[str, AddedToken] = {}
    plain: list[str] = []
    for tokenizer, vocab in [(base, base_vocab), *others]:
        usable = set(vocab.values())
        added = {info.content: info for index, info in tokenizer.added_tokens_decoder.items() if index in usable}
        for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
            if token in added:
                if token not in added_settings:
                    added_settings[token] = added[token]
                elif added_settings[token] != added[token]:
                    log.warning("token %r is added with different settings by several inputs; the first wins", token)
                continue
            if token not in known:
                plain.append(token)
                known.add(token)
    plain = [token for token in plain if token not in added_settings]
    if plain:
        out.add_tokens(plain)
    new_added = [info for token, info in added_settings.items() if token not in out.get_vocab()]
    if new_added:
        out.add_tokens(new_added)
    return out


def add_recipe_tokens(tokenizer, tokens: list[str]) -> None:
    """The `tokenizer.tokens` keys the output lacks, added as plain tokens (as mergekit does)."""
    existing = set(tokenizer.get_vocab())
    missing = [token for token in dict.fromkeys(tokens) if token not in existing]
    if missing:
        tokenizer.add_tokens(missing)
