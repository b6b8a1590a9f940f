"""`--device cuda` gives the CPU's results: every command run both ways on the same toy models.

Skipped where there is no GPU (CI); run on a GPU machine with `python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import read_tensors
from moe_support import mistral_recipe
from split_fixtures import run_split

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytest_plugins = ("moe_fixtures",)


def assert_same_tensors(cpu_folder, cuda_folder, atol: float) -> None:
    cpu, cuda = read_tensors(cpu_folder), read_tensors(cuda_folder)
    assert cpu.keys() == cuda.keys()
    for name, tensor in cpu.items():
        assert cuda[name].dtype == tensor.dtype, name
        torch.testing.assert_close(
            cuda[name], tensor, rtol=0, atol=atol, msg=lambda detail, name=name: f"{name}: {detail}"
        )


@pytest.mark.parametrize("method", ["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties"])
def test_dense_merge_on_cuda_matches_cpu(toy_models, write_recipe, run_yaml, tmp_path, method):
    base = str(toy_models["base"])
    parameters = {"weight": 1.0} if method in ("linear", "task_arithmetic") else {"weight": 1.0, "density": 0.4}
    models = [{"model": str(toy_models[name]), "parameters": parameters} for name in ("coder", "math", "story")]
    recipe = {"merge_method": method, "base_model": base, "models": models, "dtype": "float32"}
    if method == "slerp":
        recipe = {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": str(toy_models["coder"])}],
            "parameters": {"t": [0.1, 0.9]},
            "dtype": "float32",
        }
    config = write_recipe(recipe)
    for device in ("cpu", "cuda"):
        result = run_yaml(config, tmp_path / device, "--device", device, "--random-seed", 3, "--quiet")
        assert result.exit_code == 0, result.output
    # float32 sums in another order: a few ulps of weights of size ~0.1
    assert_same_tensors(tmp_path / "cpu", tmp_path / "cuda", atol=1e-6)


def test_hidden_router_on_cuda_matches_cpu(moe_models, moe_recipe_file, run_moe, tmp_path):
    config = moe_recipe_file(mistral_recipe(moe_models))  # hidden routing from each expert's prompts
    for device in ("cpu", "cuda"):
        result = run_moe(config, tmp_path / device, "--device", device, "--quiet")
        assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "cpu", tmp_path / "cuda", atol=1e-4)  # routers: normalised hidden states


@pytest.mark.parametrize("mode", [("--select", "top-usage"), ("--prune-to", "2", "--score", "reap")])
def test_calibrated_split_on_cuda_chooses_as_on_cpu(split_models, tmp_path, mode):
    for device in ("cpu", "cuda"):
        options = (*mode, "--calibration", split_models["calibration"], "--device", device)
        result = run_split(split_models["mixtral"], tmp_path / device, *options)
        assert result.exit_code == 0, result.output
    # the choices are equal, so the written expert weights are the same bits
    assert_same_tensors(tmp_path / "cpu", tmp_path / "cuda", atol=0)
