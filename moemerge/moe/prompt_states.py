"""Turn prompts into mean vectors: the base model's hidden states (`hidden`, run layer by layer) or its token
embeddings (`cheap_embed`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from moemerge.errors import ConfigError, ModelNotFoundError
from moemerge.io.loader import LazyModel
from moemerge.layerwise import Batch, LayerwiseModel, mlp_module
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
    """The base model run layer by layer on prompts, reading per layer the state a router would see.

    `router_input="layer"` (mergekit's definition) is the hidden state entering layer l; `"mlp"` is the state
    entering layer l's MLP (after attention and its norm), which is what the MoE's router multiplies.
    """

    def __init__(
        self,
        folder: Path,
        layers: int,
        device: str,
        trust_remote_code: bool,
        pool: str,
        *,
        max_memory: int | None = None,
        router_input: str = "layer",
        progress: bool = False,
        base: LazyModel | None = None,
    ):
        self.tokenizer = load_tokenizer(folder, trust_remote_code)
        # `base`: the already-open base model (a `base+lora` reference reads its tensors with the adapter folded in)
        model = base if base is not None else LazyModel(Path(folder))
        self.runner = LayerwiseModel(model, device=device, trust_remote_code=trust_remote_code)
        self.layers = layers
        self.pool = pool
        self.max_memory = max_memory
        self.router_input = router_input
        self.progress = progress

    def mean_states(self, prompts: Sequence[str], what: str) -> torch.Tensor:
        """[layers, hidden]: per layer, the mean over prompts of the pooled state a router sees."""
        return self.mean_states_of([(prompts, what)])[0]

    @torch.no_grad()
    def mean_states_of(self, groups: Sequence[tuple[Sequence[str], str]]) -> list[torch.Tensor]:
        """mean_states for several prompt lists in one pass over the layers."""
        batches: list[Batch] = []
        group_of: list[int] = []
        for group, (prompts, what) in enumerate(groups):
            for start in range(0, len(prompts), BATCH_SIZE):
                tokens = _tokenize(self.tokenizer, prompts[start : start + BATCH_SIZE], what)
                batches.append(Batch(tokens["input_ids"], tokens["attention_mask"]))
                group_of.append(group)
        hidden = int(self.runner.config.get_text_config().hidden_size)
        totals = [torch.zeros(self.layers, hidden) for _ in groups]
        current = {"batch": 0}

        def add(layer: int, index: int, states: torch.Tensor) -> None:
            if layer < self.layers:
                pooled = pool_prompts(states.float(), batches[index].attention_mask.to(states.device), self.pool)
                totals[group_of[index]][layer] += pooled.sum(dim=0).cpu()

        def note_batch(layer: int, index: int, states: torch.Tensor) -> None:
            current["batch"] = index
            if self.router_input == "layer":
                add(layer, index, states)

        def hook_mlp(layer: int, module: torch.nn.Module, _probe):
            if self.router_input != "mlp":
                return None
            mlp = mlp_module(module)
            return mlp.register_forward_pre_hook(lambda _m, args: add(layer, current["batch"], args[0])).remove

        self.runner.run(
            batches,
            max_memory=self.max_memory,
            on_input=note_batch,
            on_layer=hook_mlp,
            progress=self.progress,
            description="prompt states",
        )
        return [total / len(prompts) for total, (prompts, _) in zip(totals, groups, strict=True)]


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
