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


def make_vocab_variant(
    base: Path,
    folder: Path,
    *,
    seed: int,
    added_tokens: tuple[str, ...] = (),
    special: bool = True,
    permute: bool = False,
    tie: bool = False,
    delta_scale: float = 0.05,
) -> Path:
    """A fine-tune of toy `base` with another vocabulary: ids shuffled, tokens added (seeded rows), lm_head tied or not.

    Every tensor is the base's plus a seeded delta; a token keeps its (perturbed) rows under its new id, so a merge
    that maps rows by token string lines the models up again. Config and generation ids follow the shuffle.
    """
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    base, folder = Path(base), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    state = load_file(base / "model.safetensors")
    head = state.pop("lm_head.weight", None)
    embed = state["model.embed_tokens.weight"]
    head = embed.clone() if head is None else head
    vocab = embed.shape[0]
    order = torch.randperm(vocab, generator=generator) if permute else torch.arange(vocab)  # old id -> new id
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(vocab)

    def perturb(tensor: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(tensor.shape, generator=generator)
        return tensor + delta_scale * noise * tensor.float().std().clamp_min(1e-3)

    def vocab_rows(tensor: torch.Tensor) -> torch.Tensor:
        extra = torch.randn((len(added_tokens), tensor.shape[1]), generator=generator) * tensor.float().std()
        return torch.cat([perturb(tensor)[inverse], extra.to(tensor.dtype)]).contiguous()

    out = {name: perturb(tensor).contiguous() for name, tensor in state.items() if name != "model.embed_tokens.weight"}
    out["model.embed_tokens.weight"] = vocab_rows(embed)
    if not tie:
        out["lm_head.weight"] = vocab_rows(head)
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})

    tokenizer_json = json.loads((base / "tokenizer.json").read_text())
    tokenizer_json["model"]["vocab"] = {token: int(order[i]) for token, i in tokenizer_json["model"]["vocab"].items()}
    for entry in tokenizer_json["added_tokens"]:
        entry["id"] = int(order[entry["id"]])
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    shutil.copyfile(base / "tokenizer_config.json", folder / "tokenizer_config.json")
    if added_tokens:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.add_tokens(list(added_tokens), special_tokens=special)
        tokenizer.save_pretrained(folder)

    for name in ("config.json", "generation_config.json"):
        if not (base / name).is_file():
            continue
        settings = json.loads((base / name).read_text())
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(settings.get(key), int):
                settings[key] = int(order[settings[key]])
        if name == "config.json":
            settings["vocab_size"] = vocab + len(added_tokens)
            settings["tie_word_embeddings"] = tie
        (folder / name).write_text(json.dumps(settings, indent=2))
    return folder
