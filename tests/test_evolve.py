"""moemerge-evolve: the search space, a search that finds a known optimum, and resume = uninterrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from moemerge.errors import ConfigError
from moemerge.evolve.space import SearchSpace

ray = pytest.importorskip("ray")
pytest.importorskip("cmaes")

OBJECTIVES = Path(__file__).with_name("evolve_objectives.py")


def test_space_renders_ranges_and_gradients():
    template = {
        "merge_method": "ties",
        "models": [{"model": "a", "parameters": {"weight": {"min": 0.0, "max": 2.0}, "density": 0.5}}],
        "parameters": {"lambda": {"min": 0.5, "max": 1.5, "knots": 3}},
    }
    space = SearchSpace(template)
    assert space.dimension == 4
    recipe = space.render([0.25, 0.0, 0.5, 1.0])
    assert recipe["models"][0]["parameters"] == {"weight": 0.5, "density": 0.5}
    assert recipe["parameters"]["lambda"] == [0.5, 1.0, 1.5]
    assert template["models"][0]["parameters"]["weight"] == {"min": 0.0, "max": 2.0}  # template untouched
    values = space.values([0.25, 0.0, 0.5, 1.0])
    assert values == {"models[0].parameters.weight": 0.5, "parameters.lambda": [0.5, 1.0, 1.5]}


@pytest.mark.parametrize(
    "value, message",
    [({"min": 1, "max": 1}, "must be below"), ({"min": 0, "max": 1, "knots": 0}, "at least 1"), (0.5, "no parameter")],
)
def test_space_errors_name_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": value}}]})


def _config(toy_models, tmp_path: Path) -> Path:
    template = {
        "merge_method": "task_arithmetic",
        "base_model": str(toy_models["base"]),
        "models": [
            {"model": str(toy_models["coder"]), "parameters": {"weight": {"min": 0.0, "max": 1.0}}},
            {"model": str(toy_models["math"]), "parameters": {"weight": {"min": 0.0, "max": 1.0}}},
        ],
        "dtype": "float32",
    }
    path = tmp_path / "evolve.yml"
    objective = {"callable": f"{OBJECTIVES}:distance_to_target"}
    path.write_text(yaml.safe_dump({"template": template, "objective": objective}))
    return path


def _evolve(config: Path, out: Path, *flags: str):
    from moemerge.cli.evolve_command import main

    return CliRunner().invoke(main, [str(config), str(out), "--population", "6", "--random-seed", "3", *flags])


def test_search_finds_the_known_optimum(local_ray, toy_models, tmp_path, run_yaml):
    config = _config(toy_models, tmp_path)
    result = _evolve(config, tmp_path / "search", "--generations", "12")
    assert result.exit_code == 0, result.output
    assert "generation 12/12" in result.output
    best = yaml.safe_load((tmp_path / "search" / "best.yml").read_text())
    weights = [entry["parameters"]["weight"] for entry in best["models"]]
    assert weights == pytest.approx([0.3, 0.8], abs=0.05)
    lines = (tmp_path / "search" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 72 and all(json.loads(line)["score"] >= 0 for line in lines)
    assert (tmp_path / "search" / "scores.png").stat().st_size > 0
    # the best recipe is a plain recipe moemerge-yaml runs
    assert run_yaml(tmp_path / "search" / "best.yml", tmp_path / "merged", "--quiet").exit_code == 0


def test_resume_ends_where_an_uninterrupted_search_ends(local_ray, toy_models, tmp_path):
    config = _config(toy_models, tmp_path)
    assert _evolve(config, tmp_path / "whole", "--generations", "4").exit_code == 0
    assert _evolve(config, tmp_path / "cut", "--generations", "2").exit_code == 0
    # a crash halfway through generation 2 (0-based): drop its last three candidates, keep three
    results = tmp_path / "cut" / "results.jsonl"
    kept = [line for line in results.read_text().splitlines() if json.loads(line)["generation"] < 1]
    kept += [line for line in results.read_text().splitlines() if json.loads(line)["generation"] == 1][:3]
    results.write_text("\n".join(kept) + "\n")
    refused = _evolve(config, tmp_path / "cut", "--generations", "4")
    assert refused.exit_code == 1 and "--resume" in refused.output
    resumed = _evolve(config, tmp_path / "cut", "--generations", "4", "--resume")
    assert resumed.exit_code == 0, resumed.output

    def scores(folder: Path) -> dict:
        entries = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        return {(entry["generation"], entry["index"]): (entry["x"], entry["score"]) for entry in entries}

    assert scores(tmp_path / "cut") == scores(tmp_path / "whole")
    assert (tmp_path / "cut" / "best.yml").read_text() == (tmp_path / "whole" / "best.yml").read_text()


def test_perplexity_objective_scores_what_moemerge_yaml_writes(local_ray, toy_models, tmp_path, run_yaml):
    """The built-in objective: the recorded score is the perplexity of the merge moemerge-yaml writes."""
    from transformers import AutoTokenizer

    from moemerge.quality import heldout_perplexity
    from moemerge.toys import TOY_TEXT

    text = tmp_path / "heldout.txt"
    text.write_text(TOY_TEXT * 3)
    template = {
        "merge_method": "linear",
        "models": [
            {"model": str(toy_models["coder"]), "parameters": {"weight": {"min": 0.1, "max": 1.0}}},
            {"model": str(toy_models["story"]), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    config = tmp_path / "evolve.yml"
    objective = {"perplexity": [{"file": "heldout.txt", "weight": 2}], "window": 32}
    config.write_text(yaml.safe_dump({"template": template, "objective": objective}))
    result = _evolve(config, tmp_path / "search", "--generations", "1", "--population", "2")
    assert result.exit_code == 0, result.output
    entries = [json.loads(line) for line in (tmp_path / "search" / "results.jsonl").read_text().splitlines()]
    best = min(entries, key=lambda entry: entry["score"])
    assert best["parts"] == {str(text.resolve()): pytest.approx(best["score"])}
    assert run_yaml(tmp_path / "search" / "best.yml", tmp_path / "merged", "--quiet").exit_code == 0
    ids = AutoTokenizer.from_pretrained(tmp_path / "merged")(text.read_text(), add_special_tokens=False)["input_ids"]
    assert heldout_perplexity(tmp_path / "merged", ids, window=32).perplexity == pytest.approx(best["score"], rel=1e-4)
