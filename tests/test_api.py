"""The Python API: `import moemerge` is cheap, the three jobs take a path, a dict or a recipe, plans pickle."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml
from conftest import read_tensors
from moe_support import mistral_recipe

import moemerge
from moemerge.config.merge_recipe import MergeRecipe

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ("moe_fixtures",)


def dare_recipe(toy_models) -> dict:
    return {
        "merge_method": "dare_ties",
        "base_model": str(toy_models["base"]),
        "models": [
            {"model": str(toy_models["coder"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(toy_models["math"]), "parameters": {"weight": [0.2, 0.8], "density": 0.7}},
        ],
        "dtype": "float32",
    }


def test_import_moemerge_does_not_import_torch():
    code = "import sys, moemerge; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


def test_merge_takes_a_dict_a_path_or_a_recipe_and_says_what_it_wrote(toy_models, tmp_path):
    recipe = dare_recipe(toy_models)
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    outputs = {}
    for label, given in (("dict", recipe), ("path", path), ("model", MergeRecipe.model_validate(recipe))):
        summary = moemerge.merge(given, tmp_path / label, progress=False, random_seed=3)
        assert isinstance(summary, moemerge.WriteSummary)
        assert (summary.path, summary.tensors, summary.shards, summary.dtype) == (tmp_path / label, 39, 1, "float32")
        assert summary.bytes == sum(file.stat().st_size for file in (tmp_path / label).glob("*.safetensors"))
        assert "plan" in summary.timings and summary.seconds >= summary.timings["plan"]
        outputs[label] = read_tensors(tmp_path / label)
    for name, tensor in outputs["dict"].items():
        assert torch.equal(tensor, outputs["path"][name]) and torch.equal(tensor, outputs["model"][name]), name
    # the stored recipe is the recipe given, whichever form it came in
    stored = yaml.safe_load((tmp_path / "model" / "moemerge_config.yml").read_text())
    assert MergeRecipe.model_validate(stored) == MergeRecipe.model_validate(recipe)


def test_merge_state_dict_is_bit_for_bit_what_merge_writes(toy_models, tmp_path):
    recipe = dare_recipe(toy_models)
    moemerge.merge(recipe, tmp_path / "out", progress=False, random_seed=5)
    written = read_tensors(tmp_path / "out")
    in_memory = moemerge.merge_state_dict(recipe, random_seed=5)
    assert in_memory.keys() == written.keys()
    for name, tensor in written.items():
        assert torch.equal(in_memory[name], tensor), name
    names = ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    assert [name for name, _ in moemerge.iter_merged(recipe, names=names, random_seed=5)] == [
        name for name in written if name in names
    ]


def test_a_pickled_plan_runs_in_another_process(toy_models, tmp_path):
    plan = moemerge.plan_merge(dare_recipe(toy_models))
    part = [merge.spec.name for merge in plan.merges if ".layers.2." in merge.spec.name]
    (tmp_path / "plan.pkl").write_bytes(pickle.dumps(plan))
    code = textwrap.dedent(
        f"""
        import pickle, torch, moemerge
        plan = pickle.loads(open({str(tmp_path / "plan.pkl")!r}, "rb").read())
        torch.save(dict(moemerge.iter_merged(plan, names={part!r}, random_seed=5)), {str(tmp_path / "part.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    there = torch.load(tmp_path / "part.pt")
    here = moemerge.merge_state_dict(dare_recipe(toy_models), random_seed=5)
    assert sorted(there) == sorted(part) and len(part) == 9
    for name in part:
        assert torch.equal(there[name], here[name]), name


def test_build_moe_and_split_from_python(moe_models, tmp_path):
    recipe = mistral_recipe(moe_models, gate_mode="random")
    plan_text = moemerge.build_moe(recipe, tmp_path / "moe", dry_run=True)
    assert isinstance(plan_text, str) and "experts: 3" in plan_text and not (tmp_path / "moe").exists()
    built = moemerge.build_moe(recipe, tmp_path / "moe", progress=False)
    assert built.tensors == len(read_tensors(tmp_path / "moe"))
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["num_local_experts"] == 3
    split = moemerge.split(tmp_path / "moe", tmp_path / "experts", all_experts=True, progress=False)
    assert split.folders == 3 and split.shards == 3
    dense = read_tensors(tmp_path / "experts" / "expert-01")
    coder = read_tensors(moe_models["math"])  # experts in recipe order: coder, math, story
    assert torch.equal(dense["model.layers.2.mlp.down_proj.weight"], coder["model.layers.2.mlp.down_proj.weight"])
    assert callable(moemerge.split) and moemerge.split.run.split_model  # the package is callable; submodules stay
