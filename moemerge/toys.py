"""Small seeded models built with transformers, for the demo, the tests and the benchmarks.

Nothing is downloaded: weights are random (seeded) and the tokenizer is a byte-level BPE trained
here on a paragraph of text. A "fine-tune" is its base plus a small seeded delta, which is what
real merges look like: models that share most of their weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

TOY_TEXT = (
    "Merging language models combines what several fine-tunes learned into one set of weights. "
    "A coder, a mathematician and a storyteller share a base model; their differences are small "
    "task vectors. Linear averaging, spherical interpolation, task arithmetic, TIES and DARE each "
    "decide how those differences add up. A mixture of experts keeps them apart and lets a router "
    "choose, token by token, which expert should answer. def add(a, b): return a + b. "
    "Once upon a time 1 + 2 = 3 and the quick brown fox jumps over the lazy dog."
)

TOY_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=384,
    max_position_embeddings=256,
)


def toy_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on TOY_TEXT (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TOY_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def toy_config(model_type: str = "llama", **overrides):
    """A transformers config of `model_type` with toy sizes (overridable)."""
    from transformers import AutoConfig

    sizes = {**TOY_SIZES, **overrides}
    if model_type in ("qwen3", "qwen3_moe", "gemma", "gemma2"):
        sizes.setdefault("head_dim", sizes["hidden_size"] // sizes["num_attention_heads"])
    config = AutoConfig.for_model(model_type, **sizes)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 1, 2
    return config


def make_toy_model(
    folder: Path,
    model_type: str = "llama",
    *,
    seed: int = 0,
    base: Path | None = None,
    delta_scale: float = 0.02,
    dtype: torch.dtype = torch.float32,
    weights_format: str = "safetensors",
    tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """Write a seeded random model to `folder`; with `base`, the base's weights plus a seeded delta."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = toy_config(model_type, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if base is not None:
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            base_state = base_model.state_dict()
            for name, parameter in model.state_dict().items():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(base_state[name] + delta_scale * noise * base_state[name].std().clamp_min(1e-3))
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(folder)
    if weights_format == "bin":  # transformers v5 always writes safetensors; convert for .bin tests
        from safetensors.torch import load_file

        state = load_file(folder / "model.safetensors")
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    if tokenizer:
        toy_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder
