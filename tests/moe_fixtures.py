"""Session fixtures for the MoE tests: dense toy families (Mistral, Qwen2, Qwen3) built once, and helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from moemerge.toys import make_toy_model

# Distinct prompt sets drawn from the toy tokenizer's training text, one per expert.
PROMPTS = {
    "coder": ["def add(a, b): return a + b", "return a + b", "def add(a, b):"],
    "math": ["1 + 2 = 3", "2 + 2 = 3", "1 + 2"],
    "story": ["Once upon a time the quick brown fox", "the lazy dog", "Once upon a time"],
}
EXPERT_SEEDS = {"coder": 21, "math": 22, "story": 23}


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Mistral base + coder/math/story, Qwen2 and Qwen3 bases + two fine-tunes each, and config misfits."""
    root = tmp_path_factory.mktemp("moe-models")
    models: dict[str, Path] = {}
    base = models["mistral"] = make_toy_model(root / "mistral-base", "mistral", seed=20)
    for name, seed in EXPERT_SEEDS.items():
        # delta_scale 0.5: experts far enough apart that their logits and routing differ clearly
        models[name] = make_toy_model(root / f"mistral-{name}", "mistral", seed=seed, base=base, delta_scale=0.5)
    for family in ("qwen2", "qwen3"):
        family_base = models[family] = make_toy_model(root / f"{family}-base", family, seed=30)
        for index in (1, 2):
            models[f"{family}_ft{index}"] = make_toy_model(
                root / f"{family}-ft{index}", family, seed=30 + index, base=family_base, delta_scale=0.5
            )
    # Misfits differ from the Mistral base only in config.json: size checks run before any tensor is read.
    for key, value in (("hidden_size", 32), ("intermediate_size", 96), ("vocab_size", 400), ("num_hidden_layers", 6)):
        misfit = root / f"misfit-{key}"
        shutil.copytree(models["coder"], misfit)
        config = json.loads((misfit / "config.json").read_text())
        config[key] = value
        (misfit / "config.json").write_text(json.dumps(config))
        models[f"misfit_{key}"] = misfit
    return models


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


@pytest.fixture
def moe_recipe_file(tmp_path: Path):
    def write(recipe: dict, name: str = "moe.yml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


@pytest.fixture
def run_moe():
    """Run `moemerge-moe` in-process; returns click's Result."""
    from moemerge.cli.moe_command import main

    def run(*args: object):
        return CliRunner().invoke(main, [str(arg) for arg in args])

    return run


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
