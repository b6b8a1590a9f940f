"""Session fixtures for the MoE tests (loaded with `pytest_plugins`): dense toy families built once, CLI runner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from moe_support import EXPERT_SEEDS

from moemerge.toys import make_toy_model


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Mistral base + coder/math/story, Qwen2 and Qwen3 bases + two fine-tunes each, and config misfits."""
    root = tmp_path_factory.mktemp("moe-models")
    models: dict[str, Path] = {"root": root}
    base = models["mistral"] = make_toy_model(root / "mistral-base", "mistral", seed=20)
    for name, seed in EXPERT_SEEDS.items():
        # delta_scale 0.5: experts far enough apart that their logits and routing differ clearly
        models[name] = make_toy_model(root / f"mistral-{name}", "mistral", seed=seed, base=base, delta_scale=0.5)
    for family in ("qwen2", "qwen3"):
        family_base = models[family] = make_toy_model(root / f"{family}-base", family, seed=30)
        for index, name in ((1, "coder"), (2, "story")):  # folder names as in configs/moe-qwen*.yml
            models[f"{family}_ft{index}"] = make_toy_model(
                root / f"{family}-{name}", family, seed=30 + index, base=family_base, delta_scale=0.5
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
