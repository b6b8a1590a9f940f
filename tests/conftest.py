"""Session fixtures: small seeded models built once with transformers, and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from lora_fixtures import lora_models  # noqa: F401  (session fixture of the LoRA tests)
from safetensors import safe_open
from split_fixtures import calibrated_prune, split_models  # noqa: F401  (session fixtures of the moemerge-split tests)

from moemerge.toys import make_toy_model


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Llama base + three fine-tunes, a Mistral pair, a .bin copy, and misfits for error tests."""
    root = tmp_path_factory.mktemp("toy-models")
    base = make_toy_model(root / "base", "llama", seed=0)
    models = {"base": base}
    for name, seed in (("coder", 1), ("math", 2), ("story", 3)):
        models[name] = make_toy_model(root / name, "llama", seed=seed, base=base, delta_scale=0.05)
    models["coder_bin"] = make_toy_model(
        root / "coder_bin", "llama", seed=1, base=base, delta_scale=0.05, weights_format="bin"
    )
    models["mistral_base"] = make_toy_model(root / "mistral_base", "mistral", seed=10)
    models["mistral_ft"] = make_toy_model(root / "mistral_ft", "mistral", seed=11, base=models["mistral_base"])
    models["wide"] = make_toy_model(root / "wide", "llama", seed=5, intermediate_size=96)
    models["big_vocab"] = make_toy_model(root / "big_vocab", "llama", seed=6, vocab_size=400)
    models["deep"] = make_toy_model(root / "deep", "llama", seed=7, num_hidden_layers=6)
    return models


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write a recipe dict (or raw text) to a YAML file and return its path."""

    def write(recipe: dict | str, name: str = "recipe.yml") -> Path:
        path = tmp_path / name
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


@pytest.fixture
def run_yaml():
    """Run `moemerge-yaml` in-process; returns click's Result."""
    from moemerge.cli.yaml_command import main

    def run(*args: object):
        return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)

    return run


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a model folder, read with safetensors directly (independent of moemerge's loader)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    if not tensors:
        for file in sorted(folder.glob("*.bin")):
            tensors.update(torch.load(file, weights_only=True))
    return tensors


@pytest.fixture(scope="session")
def local_ray(tmp_path_factory: pytest.TempPathFactory):
    """One local Ray of 2 CPUs for the session (starting Ray takes seconds), for --executor ray and evolve.

    Its workers die once, halfway through shard 2 of a Ray merge (the MOEMERGE_TEST_DIE_IN_SHARD hook in
    moemerge.distributed.ray_shards): Ray's retry must still give byte-identical shards.
    """
    import os

    ray = pytest.importorskip("ray")
    marker = tmp_path_factory.mktemp("ray") / "died"
    os.environ["MOEMERGE_TEST_DIE_IN_SHARD"] = f"2:{marker}"  # workers inherit the environment at start
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.death_marker = marker
    yield ray
    ray.shutdown()
    del os.environ["MOEMERGE_TEST_DIE_IN_SHARD"]
