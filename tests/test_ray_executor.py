"""`--executor ray`: output shards written as Ray tasks are byte-identical to the local run."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray of 2 CPUs for the module (starting Ray takes seconds)."""
    # a worker dies once, halfway through shard 2 (see write_one_shard): Ray's retry must rewrite it whole
    marker = tmp_path_factory.mktemp("die") / "died"
    os.environ["MOEMERGE_TEST_DIE_IN_SHARD"] = f"2:{marker}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.marker = marker
    yield ray
    ray.shutdown()
    del os.environ["MOEMERGE_TEST_DIE_IN_SHARD"]


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
    assert local_ray.marker.exists()  # the worker did die once, and the retried shard is still byte-identical
