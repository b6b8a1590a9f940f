"""Build the output vocabulary of a merge: the output tokenizer first, then every input's row map onto it."""

from __future__ import annotations

import logging
from pathlib import Path

from moemerge.architectures import Architecture
from moemerge.errors import ConfigError, MoemergeError, TensorError
from moemerge.io.loader import ModelPool
from moemerge.io.model_ref import resolve_model
from moemerge.io.writer import TensorSpec
from moemerge.vocab.alignment import OutputVocabulary, padded_size, row_map
from moemerge.vocab.config import TokenEmbedding
from moemerge.vocab.tokenizers import add_recipe_tokens, load_tokenizer, union_tokenizer, usable_vocab

log = logging.getLogger(__name__)


def build_vocabulary(
    source: str,
    models: list[str],
    base: str,
    pool: ModelPool,
    embedding_rows: dict[str, int],
    *,
    tokens: dict[str, TokenEmbedding] | None = None,
    pad_to_multiple_of: int | None = None,
) -> OutputVocabulary:
    """The output tokenizer for `source` (`base`, `union` or a model reference) and each model's row map.

    `models` are every input (base included); `embedding_rows` their embedding row counts, read from headers.
    A model without a tokenizer is taken to share the base's (as mergekit does).
    """
    base_tokenizer = load_tokenizer(pool.get(base).folder, base, required=True)
    base_vocab = usable_vocab(base_tokenizer, embedding_rows[base], base)
    tokenizers = {base: base_tokenizer}
    vocabs = {base: base_vocab}
    for model in models:
        if model in vocabs:
            continue
        tokenizer = load_tokenizer(pool.get(model).folder, model, required=False)
        tokenizers[model] = tokenizer or base_tokenizer
        vocabs[model] = usable_vocab(tokenizer, embedding_rows[model], model) if tokenizer else base_vocab
    if source == "base":
        from moemerge.vocab.tokenizers import copy_tokenizer_object

        output = copy_tokenizer_object(base_tokenizer)
    elif source == "union":
        others = [(tokenizers[model], vocabs[model]) for model in vocabs if model != base]
        output = union_tokenizer(base_tokenizer, others, base_vocab)
    else:
        output = load_tokenizer(tokenizer_folder(source), source, required=True)
    add_recipe_tokens(output, list(tokens or {}))
    vocab = dict(output.get_vocab())
    size = padded_size(max(len(vocab), max(vocab.values(), default=-1) + 1), pad_to_multiple_of)
    return OutputVocabulary(
        tokenizer=output,
        vocab=vocab,
        size=size,
        model_rows={model: row_map(vocab, size, model_vocab) for model, model_vocab in vocabs.items()},
        model_vocabs=vocabs,
        model_sizes=dict(embedding_rows),
        token_configs=dict(tokens or {}),
        reference_tokens={index: token for token, index in base_tokenizer.get_vocab().items()},
    )


def tokenizer_folder(source: str) -> Path:
    """The folder of a tokenizer source given as a model reference (it needs no weights, only tokenizer files)."""
    try:
        return resolve_model(source)
    except MoemergeError as error:
        raise ConfigError(f"tokenizer source: {error}") from None


def embedding_rows(pool: ModelPool, models: list[str], arch: Architecture) -> dict[str, int]:
    """Each model's embedding row count (from the safetensors headers): how many of its token ids have rows."""
    rows = {}
    for model in models:
        lazy = pool.get(model)
        name = next((name for name in arch.embeddings if lazy.has(name)), None)
        if name is None:
            raise TensorError(f"model {model!r} has no embedding tensor ({', '.join(arch.embeddings)})")
        rows[model] = lazy.shape(name)[0]
    return rows


def output_vocab_config(
    config: dict, arch: Architecture, written: list[TensorSpec], vocabulary: OutputVocabulary | None
) -> dict:
    """config.json for what was written: vocab_size = the output rows, tie_word_embeddings = no lm_head written.

    mergekit leaves tie_word_embeddings as the base model has it; a tied base with an lm_head written would then
    load with the lm_head ignored, so it is set from the tensors instead.
    """
    config = dict(config)
    names = {spec.name for spec in written}
    if any(name in names for name in arch.embeddings):
        wrote_head = any(name in names for name in arch.lm_head)
        if bool(config.get("tie_word_embeddings")) == wrote_head:
            log.info("output lm_head %s: tie_word_embeddings = %s", "written" if wrote_head else "tied", not wrote_head)
            config["tie_word_embeddings"] = not wrote_head
    if vocabulary is not None:
        settings = config.get("text_config") if "vocab_size" not in config else None
        target = settings if isinstance(settings, dict) else config
        target["vocab_size"] = vocabulary.size
        remap_token_ids(config, vocabulary)
    return config


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def remap_token_ids(settings: dict, vocabulary: OutputVocabulary) -> None:
    """bos/eos/pad ids (config.json or generation_config.json) moved to the same tokens' ids in the output vocabulary.

    A token the output lacks falls back to the output tokenizer's own special token of that kind.
    """
    tokenizer = vocabulary.tokenizer
    fallbacks = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }

    def moved(key: str, index):
        if not isinstance(index, int):
            return index
        token = vocabulary.reference_tokens.get(index)
        new = vocabulary.vocab.get(token) if token is not None else None
        return new if new is not None else fallbacks.get(key, index)

    for key in TOKEN_ID_KEYS:
        value = settings.get(key)
        if isinstance(value, list):
            settings[key] = list(dict.fromkeys(moved(key, index) for index in value))
        elif value is not None:
            settings[key] = moved(key, value)
