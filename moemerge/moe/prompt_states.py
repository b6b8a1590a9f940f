"""Turn prompts into mean vectors: the base model's hidden states (`hidden`) or its token embeddings (`cheap_embed`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from moemerge.errors import ConfigError, ModelNotFoundError
from moemerge.moe.router import pool_prompts

BATCH_SIZE = 8


def load_tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"base_model: cannot load its tokenizer for prompt routing ({error})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def with_bos(tokenizer, prompt: str) -> str:
    """The prompt as mergekit-moe tokenizes it: the BOS token's text prepended, no other special tokens added."""
    return (tokenizer.bos_token or "") + prompt


def _tokenize(tokenizer, prompts: Sequence[str], what: str) -> dict[str, torch.Tensor]:
    text = [with_bos(tokenizer, prompt) for prompt in prompts]
    batch = tokenizer(text, return_tensors="pt", padding=True, add_special_tokens=False)
    empty = (batch["attention_mask"].sum(dim=1) == 0).nonzero()
    if len(empty):
        raise ConfigError(f"{what}: prompt {prompts[int(empty[0])]!r} has no tokens")
    return batch


class HiddenStateReader:
    """The base model, loaded once with transformers, reading the hidden state that enters each layer."""

    def __init__(self, folder: Path, layers: int, device: str, trust_remote_code: bool, pool: str, base=None):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # moemerge shows its own progress
        self.tokenizer = load_tokenizer(folder, trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=trust_remote_code)
        adapter = getattr(base, "adapter", None)  # a `base+lora` reference: fold its adapter in
        if adapter is not None:
            result = self.model.load_state_dict({name: base.read(name) for name in adapter.changes}, strict=False)
            if result.unexpected_keys:
                raise ModelNotFoundError(f"base_model: cannot apply its LoRA to {result.unexpected_keys[0]!r}")
        self.model.to(device).eval()
        self.device = device
        self.layers = layers
        self.pool = pool

    @torch.no_grad()
    def mean_states(self, prompts: Sequence[str], what: str) -> torch.Tensor:
        """[layers, hidden]: per layer, the mean over prompts of the pooled state entering that layer."""
        total: torch.Tensor | None = None
        for start in range(0, len(prompts), BATCH_SIZE):
            batch = _tokenize(self.tokenizer, prompts[start : start + BATCH_SIZE], what)
            batch = {key: value.to(self.device) for key, value in batch.items()}
            output = self.model(**batch, output_hidden_states=True, use_cache=False)
            # hidden_states[l] is the input of layer l (hidden_states[0] = embeddings)
            pooled = torch.stack(
                [
                    pool_prompts(output.hidden_states[layer].float(), batch["attention_mask"], self.pool)
                    for layer in range(self.layers)
                ]
            )  # [layers, batch, hidden]
            summed = pooled.sum(dim=1).cpu()
            total = summed if total is None else total + summed
        assert total is not None
        return total / len(prompts)


class EmbeddingReader:
    """Token embeddings of the base model, read as one tensor (no model is loaded)."""

    def __init__(self, folder: Path, embeddings: torch.Tensor, trust_remote_code: bool):
        self.tokenizer = load_tokenizer(folder, trust_remote_code)
        self.embeddings = embeddings.float()

    def summed_embedding(self, prompts: Sequence[str], what: str) -> torch.Tensor:
        """[hidden]: the sum of the embeddings of every real token of every prompt."""
        total = torch.zeros(self.embeddings.shape[1])
        for prompt in prompts:
            ids = self.tokenizer(with_bos(self.tokenizer, prompt), add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"{what}: prompt {prompt!r} has no tokens")
            total += self.embeddings[torch.tensor(ids)].sum(dim=0)
        return total
