"""Recipe keys for the output vocabulary and chat template, shared by `moemerge-yaml` and `moemerge-moe` recipes.

They follow mergekit's `tokenizer_source`, `tokenizer:` block and `chat_template` keys.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moemerge.vocab.chat_templates import check_chat_template


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ZeroEmbedding(_Strict):
    """The token's rows are zeros."""

    kind: Literal["zero"]


class ModelTokenEmbedding(_Strict):
    """The token's rows are another token's rows in one model (by token text or by id in that model)."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


class TokenEmbedding(_Strict):
    """Where one output token's embedding and lm_head rows come from; `force` applies it to every input."""

    source: ModelTokenEmbedding | ZeroEmbedding | str | None = None
    force: bool = False


class TokenizerSpec(_Strict):
    """mergekit's `tokenizer:` block."""

    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class VocabularyKeys(BaseModel):
    """The recipe keys that shape the output tokenizer; mixed into the merge and MoE recipes."""

    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is not None:
            check_chat_template(value)
        return value

    @model_validator(mode="after")
    def _one_tokenizer_key(self):
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or a 'tokenizer' block, not both")
        return self

    @property
    def vocabulary_source(self) -> str | None:
        """`base`, `union` or a model reference when the output vocabulary is rebuilt; None to copy the reference's."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source
