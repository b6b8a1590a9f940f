"""`--executor ray`: output shards written as Ray tasks are byte-identical to the local run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest_plugins = ("moe_fixtures",)


def digests(folder: Path) -> dict[str, str]:
    return {
        file.name: hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(folder.iterdir())
        if file.suffix == ".safetensors" or file.name.endswith(".index.json")
    }


def test_ray_shards_equal_local_bytes(local_ray, toy_models, write_recipe, run_yaml, tmp_path):
    recipe = write_recipe(
        {
            "merge_method": "ties",
            "base_model": str(toy_models["base"]),
            "models": [
                {"model": str(toy_models["coder"]), "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": str(toy_models["math"]), "parameters": {"weight": 0.4, "density": 0.7}},
            ],
            "dtype": "float32",
        }
    )
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert run_yaml(recipe, local, "--out-shard-size", "20K", "--quiet").exit_code == 0
    result = run_yaml(recipe, distributed, "--out-shard-size", "20K", "--executor", "ray", "--quiet")
    assert result.exit_code == 0, result.output
    shards = digests(local)
    assert len(shards) > 3  # several shards, so several tasks
    assert digests(distributed) == shards
    assert not [path for path in distributed.iterdir() if path.name.startswith(".shard-")]
    assert local_ray.death_marker.exists()  # the worker did die once, and the retried shard is still byte-identical


def test_ray_moe_equals_local_bytes(local_ray, moe_models, moe_recipe_file, run_moe, tmp_path):
    """moemerge-moe --executor ray: routers computed by the driver, experts streamed by the shard tasks."""
    recipe = moe_recipe_file(
        {
            "base_model": str(moe_models["mistral"]),
            "gate_mode": "cheap_embed",
            "experts": [
                {"source_model": str(moe_models[name]), "positive_prompts": [f"{name} prompt"]}
                for name in ("coder", "story")
            ],
        }
    )
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert run_moe(recipe, local, "--out-shard-size", "50K", "--quiet").exit_code == 0
    result = run_moe(recipe, distributed, "--out-shard-size", "50K", "--executor", "ray", "--quiet")
    assert result.exit_code == 0, result.output
    shards = digests(local)
    assert len(shards) > 3
    assert digests(distributed) == shards
