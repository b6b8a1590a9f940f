"""Row maps from each input's vocabulary onto the output's, and the default rows of tokens an input lacks.

This is plan data (tuples of ints), built from tokenizers and headers only. The rules are mergekit's
(`PermutedVocabulary`): every input gets a full output-sized tensor; an input that has a token keeps its
own row; for an input that lacks it (or every input, with `force`) the row comes from

- the `tokenizer.tokens` entry for that token, if any: a model's row for it, another token's row, or zeros;
- else the only input that has the token;
- else the base model, when it has the token and takes part in this tensor;
- else the mean of the rows of the inputs that have it;
- zeros when no input has it.

Padding rows (`pad_to_multiple_of`) are the mean of that input's token rows. The merge method then runs on
the aligned tensors as on any others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from moemerge.errors import ConfigError
from moemerge.vocab.config import ModelTokenEmbedding, TokenEmbedding, ZeroEmbedding

log = logging.getLogger(__name__)

MISSING = -1  # the input lacks this token: the row takes the token's default
PAD = -2  # a padding row past the tokens: the mean of the input's token rows


@dataclass(frozen=True)
class DefaultRow:
    """The row for `out_row` where an input has none: the mean of `sources` (input index, row); zeros if empty."""

    out_row: int
    sources: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class VocabRows:
    """One vocabulary-indexed output tensor: per input (in the merge's order), the source row of each output row."""

    rows: tuple[tuple[int, ...], ...]
    defaults: tuple[DefaultRow, ...]
    tokens: int  # output rows that are tokens; the rest are padding


@dataclass
class OutputVocabulary:
    """The output tokenizer, its vocabulary, and each input model's row map onto it."""

    tokenizer: object  # a transformers tokenizer, saved into the output folder
    vocab: dict[str, int]  # output token → row
    size: int  # output rows, padded
    model_rows: dict[str, tuple[int, ...]]  # model → its row for each output row (MISSING, PAD)
    model_vocabs: dict[str, dict[str, int]]  # model → its own token → row (for `model_token` sources)
    model_sizes: dict[str, int]  # model → its embedding rows
    token_configs: dict[str, TokenEmbedding]
    reference_tokens: dict[int, str]  # the reference model's id → token, to carry its special-token ids over

    def rows_for(self, models: list[str], base: str | None, tensor: str) -> VocabRows:
        """The row maps and default rows of one tensor merged from `models` (base preferred, as in mergekit)."""
        maps = [self.model_rows[model] for model in models]
        unique = list(dict.fromkeys(models))
        first_index = {model: models.index(model) for model in unique}
        defaults: list[DefaultRow] = []
        forced: list[int] = []
        for token, out_row in self.vocab.items():
            present = [model for model in unique if self.model_rows[model][out_row] >= 0]
            config = self.token_configs.get(token)
            if config is not None:
                if not config.force and len(present) == len(unique):
                    continue
                if config.force:
                    forced.append(out_row)
                sources = self._configured_sources(token, out_row, config, first_index, tensor)
            elif len(present) == len(unique):
                continue
            elif len(present) == 1:
                sources = ((first_index[present[0]], self.model_rows[present[0]][out_row]),)
            elif not present:
                log.warning("%s: token %r is in no input; its rows are zeros", tensor, token)
                sources = ()
            elif base in present:
                sources = ((first_index[base], self.model_rows[base][out_row]),)
            else:
                sources = tuple((first_index[model], self.model_rows[model][out_row]) for model in present)
            defaults.append(DefaultRow(out_row, sources))
        if forced:
            forced_rows = set(forced)
            maps = [tuple(MISSING if row in forced_rows else value for row, value in enumerate(m)) for m in maps]
        return VocabRows(tuple(maps), tuple(defaults), len(self.vocab))

    def _configured_sources(
        self, token: str, out_row: int, config: TokenEmbedding, first_index: dict[str, int], tensor: str
    ) -> tuple[tuple[int, int], ...]:
        key = f"tokenizer.tokens[{token!r}].source"
        source = config.source
        if isinstance(source, ZeroEmbedding):
            return ()
        if source is None:
            raise ConfigError(f"{key}: some inputs of {tensor} lack {token!r}; say where its rows come from")
        model = source.model if isinstance(source, ModelTokenEmbedding) else source
        if model not in first_index:
            raise ConfigError(f"{key}: model {model!r} is not an input of {tensor}")
        if isinstance(source, ModelTokenEmbedding):
            row = source.token_id if source.token is None else self.model_vocabs[model].get(source.token, MISSING)
            if not 0 <= row < self.model_sizes[model]:
                wanted = source.token if source.token is not None else f"id {source.token_id}"
                raise ConfigError(f"{key}: model {model!r} has no token {wanted!r}")
        else:
            row = self.model_rows[model][out_row]
            if row < 0:
                raise ConfigError(f"{key}: model {model!r} has no token {token!r}")
        return ((first_index[model], row),)


def row_map(out_vocab: dict[str, int], size: int, model_vocab: dict[str, int]) -> tuple[int, ...]:
    """An input's source row for each output row: its id of the same token, MISSING, or PAD past the tokens."""
    rows = [PAD] * size
    for token, out_row in out_vocab.items():
        rows[out_row] = model_vocab.get(token, MISSING)
    return tuple(rows)


def padded_size(tokens: int, multiple: int | None) -> int:
    if multiple and tokens % multiple:
        return tokens + multiple - tokens % multiple
    return tokens
