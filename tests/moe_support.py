"""Helpers for the MoE tests: prompt sets, recipe builders, reference logits (imported by test modules)."""

from __future__ import annotations

from pathlib import Path

import torch

# Distinct prompt sets drawn from the toy tokenizer's training text, one per expert.
PROMPTS = {
    "coder": ["def add(a, b): return a + b", "return a + b", "def add(a, b):"],
    "math": ["1 + 2 = 3", "2 + 2 = 3", "1 + 2"],
    "story": ["Once upon a time the quick brown fox", "the lazy dog", "Once upon a time"],
}
EXPERT_SEEDS = {"coder": 21, "math": 22, "story": 23}


def expert_entry(model: Path, prompts: list[str] | None = None, **extra: object) -> dict:
    entry: dict = {"source_model": str(model)}
    if prompts:
        entry["positive_prompts"] = prompts
    return {**entry, **extra}


def mistral_recipe(models: dict[str, Path], **overrides: object) -> dict:
    """coder/math/story over the Mistral base, hidden routing from PROMPTS."""
    recipe = {
        "base_model": str(models["mistral"]),
        "gate_mode": "hidden",
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [expert_entry(models[name], PROMPTS[name]) for name in EXPERT_SEEDS],
    }
    return {**recipe, **overrides}


def dense_logits(folder: Path, input_ids: torch.Tensor, mlp_from: Path | None = None) -> torch.Tensor:
    """Logits of a dense model; with `mlp_from`, its MLPs replaced by another model's (attention kept)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if mlp_from is not None:
        donor = AutoModelForCausalLM.from_pretrained(mlp_from, dtype=torch.float32).state_dict()
        state = model.state_dict()
        model.load_state_dict({name: donor[name] if ".mlp." in name else value for name, value in state.items()})
    with torch.no_grad():
        return model(input_ids).logits


def moe_logits(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids).logits
