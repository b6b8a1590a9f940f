"""What a new user meets first: every example config runs on the toy models, startup without torch, clear errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yml"))


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy models exactly as the README's `python scripts/make_toy_models.py` makes them."""
    root = tmp_path_factory.mktemp("first-hour")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_toy_models.py"), str(root / "toy-models")],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
    )
    return root


@pytest.mark.parametrize("config", CONFIGS, ids=[config.name for config in CONFIGS])
def test_every_example_config_runs_on_the_toy_models(config, toy_folder, monkeypatch):
    from moemerge.cli.moe_command import main as moe_main
    from moemerge.cli.yaml_command import main as yaml_main

    monkeypatch.chdir(toy_folder)  # the configs name toy-models/... relative to the working directory
    command = moe_main if config.name.startswith("moe-") else yaml_main
    result = CliRunner().invoke(command, [str(config), f"out/{config.stem}", "--quiet", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (toy_folder / "out" / config.stem / "config.json").is_file()


HELP_SHOWS = {  # an option each command's --help must list
    "yaml": "--out-shard-size",
    "moe": "--out-shard-size",
    "split": "--out-shard-size",
    "lora": "extract",
    "lora extract": "--lora-merge-cache",
    "evolve": "--task-memory",
}


@pytest.mark.parametrize("command", list(HELP_SHOWS))
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_answer_without_importing_torch(command, flag):
    module, *subcommand = command.split()
    code = (
        f"import sys; from moemerge.cli.{module}_command import main\n"
        f"try:\n    main({[*subcommand, flag]!r})\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip().endswith("False"), result.stdout
    assert ("moemerge 0.1.0" in result.stdout) if flag == "--version" else (HELP_SHOWS[command] in result.stdout)


def test_a_mistyped_local_path_says_no_such_folder_relative_to_the_working_directory(toy_folder, monkeypatch):
    from moemerge.cli.yaml_command import main

    monkeypatch.chdir(toy_folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (toy_folder / "typo.yml").write_text(
        "merge_method: linear\nmodels:\n  - model: toy-models/mathh\n    parameters: {weight: 1}\n"
    )
    result = CliRunner().invoke(main, ["typo.yml", "out/typo"])
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: models[0].model: model 'toy-models/mathh' not found: no such folder under ")
    assert str(toy_folder) in message
    assert "Error" not in message.removeprefix("error:")  # no internal exception names


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--max-memory", "4", "has no unit"),
        ("--out-shard-size", "1", "one file per tensor"),
        ("--max-memory", "1K", "too small"),
    ],
)
def test_sizes_need_units_and_sense(option, value, expected, toy_folder, monkeypatch):
    from moemerge.cli.yaml_command import main

    monkeypatch.chdir(toy_folder)
    result = CliRunner().invoke(main, [str(ROOT / "configs" / "linear.yml"), "out/sizes", option, value])
    assert result.exit_code == 2 and expected in result.output


def test_one_b_is_a_billion_as_in_mergekit():
    from moemerge.sizes import parse_shard_size

    assert parse_shard_size("1B") == 10**9 and parse_shard_size("5GB") == 5 * 10**9


# ---- a mistyped local path names the recipe key it came from ---------------------------------------------------

TYPO = "toy-models/mathh"
DENSE_TYPOS = {
    "models[1].model": {"merge_method": "linear", "models": [{"model": "toy-models/coder"}, {"model": TYPO}]},
    "base_model": {"merge_method": "task_arithmetic", "base_model": TYPO, "models": [{"model": "toy-models/coder"}]},
    "slices[1].sources[0].model": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "toy-models/coder", "layer_range": [0, 2]}]},
            {"sources": [{"model": TYPO, "layer_range": [2, 4]}]},
        ],
    },
}
MOE_TYPOS = {
    "base_model": {
        "base_model": TYPO,
        "gate_mode": "random",
        "experts": [{"source_model": "toy-models/qwen2-coder"}, {"source_model": "toy-models/qwen2-story"}],
    },
    "experts[1].source_model": {
        "base_model": "toy-models/mistral-base",
        "gate_mode": "random",
        "experts": [{"source_model": "toy-models/mistral-coder"}, {"source_model": TYPO}],
    },
    "shared_experts[0].source_model": {
        "base_model": "toy-models/qwen2-base",
        "architecture": "qwen2_moe",
        "gate_mode": "random",
        "experts": [{"source_model": "toy-models/qwen2-coder"}, {"source_model": "toy-models/qwen2-story"}],
        "shared_experts": [{"source_model": TYPO}],
    },
}


def _run_in(folder: Path, command: str, recipe: dict | str, *args: str):
    import yaml

    from moemerge.cli.moe_command import main as moe_main
    from moemerge.cli.yaml_command import main as yaml_main

    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    (folder / "recipe.yml").write_text(text)
    main = moe_main if command == "moe" else yaml_main
    return CliRunner().invoke(main, ["recipe.yml", "out/recipe", *args])


@pytest.mark.parametrize(
    ("command", "key"), [("yaml", key) for key in DENSE_TYPOS] + [("moe", key) for key in MOE_TYPOS]
)
def test_a_missing_model_names_its_recipe_key(command, key, toy_folder, monkeypatch):
    monkeypatch.chdir(toy_folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = (DENSE_TYPOS if command == "yaml" else MOE_TYPOS)[key]
    result = _run_in(toy_folder, command, recipe)
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith(f"error: {key}: model {TYPO!r} not found: no such folder under {toy_folder} "), message
    assert "(recipe paths are relative to it)" in message


def test_a_missing_model_in_a_later_stage_fails_before_the_first_stage_merges(toy_folder, monkeypatch):
    monkeypatch.chdir(toy_folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stages = (
        "name: blend\nmerge_method: linear\nmodels:\n  - model: toy-models/coder\n  - model: toy-models/math\n"
        "---\nmerge_method: linear\nmodels:\n  - model: blend\n  - model: toy-models/storyy\n"
    )
    result = _run_in(toy_folder, "yaml", stages, "--intermediate-dir", "stages-typo")
    assert result.exit_code == 1, result.output
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith("error: stage (final): models[1].model: model 'toy-models/storyy' not found: no such folder under ")
    )
    assert not (toy_folder / "stages-typo").exists()  # nothing was merged


# ---- mixing architectures needs --allow-crimes, as in mergekit -------------------------------------------------

LLAMA_AND_MISTRAL = {  # toy-models/coder is a Llama, toy-models/mistral-coder a Mistral of the same sizes
    "models": {
        "merge_method": "linear",
        "models": [
            {"model": "toy-models/coder", "parameters": {"weight": 1}},
            {"model": "toy-models/mistral-coder", "parameters": {"weight": 1}},
        ],
    },
    "slices": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "toy-models/coder", "layer_range": [0, 2]}]},
            {"sources": [{"model": "toy-models/mistral-coder", "layer_range": [2, 4]}]},
        ],
    },
}


@pytest.mark.parametrize("key", list(LLAMA_AND_MISTRAL))
def test_mixing_architectures_is_refused_naming_both(key, toy_folder, monkeypatch):
    monkeypatch.chdir(toy_folder)
    result = _run_in(toy_folder, "yaml", LLAMA_AND_MISTRAL[key], "--overwrite")
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: {key}: architectures differ: LlamaForCausalLM (llama) in 'toy-models/coder' and "
        "MistralForCausalLM (mistral) in 'toy-models/mistral-coder' (--allow-crimes merges them anyway)"
    )
    assert not (toy_folder / "out" / "recipe").exists()


def test_allow_crimes_merges_them_with_a_warning(toy_folder, monkeypatch):
    import torch
    from conftest import read_tensors

    monkeypatch.chdir(toy_folder)
    result = _run_in(toy_folder, "yaml", LLAMA_AND_MISTRAL["models"], "--allow-crimes", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "WARNING: models: architectures differ: LlamaForCausalLM (llama)" in result.output
    merged = read_tensors(toy_folder / "out" / "recipe")
    llama, mistral = (
        read_tensors(toy_folder / "toy-models" / "coder"),
        read_tensors(toy_folder / "toy-models" / "mistral-coder"),
    )
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(merged[name], (llama[name] + mistral[name]) / 2)


def test_the_api_takes_allow_crimes(toy_folder, monkeypatch, tmp_path):
    import moemerge
    from moemerge.errors import ConfigError

    monkeypatch.chdir(toy_folder)
    with pytest.raises(ConfigError, match="architectures differ"):
        moemerge.merge(LLAMA_AND_MISTRAL["models"], tmp_path / "refused", progress=False)
    summary = moemerge.merge(LLAMA_AND_MISTRAL["models"], tmp_path / "crimes", allow_crimes=True, progress=False)
    assert summary.tensors == 39 and not (tmp_path / "refused").exists()


def test_a_tokenizer_from_another_architecture_is_no_crime(toy_folder, monkeypatch):
    monkeypatch.chdir(toy_folder)
    recipe = {**DENSE_TYPOS["models[1].model"], "tokenizer_source": "toy-models/mistral-coder"}
    recipe["models"] = [{"model": f"toy-models/{name}", "parameters": {"weight": 1}} for name in ("coder", "math")]
    result = _run_in(toy_folder, "yaml", recipe, "--dry-run")
    assert result.exit_code == 0, result.output


# ---- what a run says: the end-of-run line, and -v adds the plan and the timings ---------------------------------

END_LINE = re.compile(
    r"^wrote (?P<path>\S+): (?P<tensors>\d+) tensors \((?P<dtype>\w+)\), (?P<size>[\d.]+ k?[MGT]?B) "
    r"in (?P<shards>\d+) shards?, (?P<seconds>\d+\.\d) s$"
)
END_RUNS = {  # command, arguments (in the toy folder), what the plan printed by -v shows
    "yaml": ("yaml", [str(ROOT / "configs" / "ties.yml"), "out/end-yaml", "--out-shard-size", "300K"], "method: ties"),
    "moe": ("moe", ["moe-random.yml", "out/end-moe"], "architecture: mixtral from mistral base"),
    "split": ("split", ["out/end-moe", "out/end-split", "--expert", "1"], "dense MLP from"),
}


def _end_run(toy_folder: Path, name: str, *extra: str):
    from moemerge.cli.moe_command import main as moe_main
    from moemerge.cli.split_command import main as split_main
    from moemerge.cli.yaml_command import main as yaml_main

    command, args, _ = END_RUNS[name]
    (toy_folder / "moe-random.yml").write_text(
        "base_model: toy-models/mistral-base\ngate_mode: random\nexperts:\n"
        "  - source_model: toy-models/mistral-coder\n  - source_model: toy-models/mistral-math\n"
    )
    if name == "split" and not (toy_folder / "out" / "end-moe").is_dir():
        assert _end_run(toy_folder, "moe").exit_code == 0
    main = {"yaml": yaml_main, "moe": moe_main, "split": split_main}[command]
    return CliRunner().invoke(main, [*args, "--overwrite", *extra])


@pytest.mark.parametrize("name", list(END_RUNS))
def test_a_run_ends_with_what_it_wrote_and_v_adds_the_plan_and_timings(name, toy_folder, monkeypatch):
    from safetensors import safe_open

    from moemerge.sizes import format_bytes

    monkeypatch.chdir(toy_folder)
    plain = _end_run(toy_folder, name)
    assert plain.exit_code == 0, plain.output
    out = toy_folder / END_RUNS[name][1][1]
    shards = sorted(out.glob("*.safetensors"))
    dtypes = set()
    tensors = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            tensors += len(handle.keys())
            dtypes |= {str(handle.get_slice(key).get_dtype()) for key in handle.keys()}
    end = END_LINE.match(plain.stdout.strip().splitlines()[-1])
    assert end, plain.output
    assert end["path"] == END_RUNS[name][1][1] and int(end["tensors"]) == tensors
    assert int(end["shards"]) == len(shards) and (len(shards) > 1) == (name == "yaml")  # 300K shards: several
    assert end["size"] == format_bytes(sum(shard.stat().st_size for shard in shards))
    assert dtypes == {"F32"} and end["dtype"] == "float32"
    assert "DEBUG" not in plain.output and "timings" not in plain.output

    verbose = _end_run(toy_folder, name, "-v")
    assert verbose.exit_code == 0, verbose.output
    assert END_LINE.match(verbose.stdout.strip().splitlines()[-1]), verbose.output
    assert "DEBUG: plan:\n" in verbose.output and END_RUNS[name][2] in verbose.output
    timings = next(line for line in verbose.output.splitlines() if line.startswith("DEBUG: timings: "))
    assert re.search(r"plan \d+\.\d\d s", timings) and re.search(r"(write|merge and write) \d+\.\d\d s", timings)


@pytest.mark.skipif(not os.environ.get("MOEMERGE_MERGEKIT_PYTHON"), reason="set MOEMERGE_MERGEKIT_PYTHON")
@pytest.mark.parametrize(("other", "refused"), [("mistral-math", True), ("alias", False)])
def test_mergekit_refuses_the_same_mixes(other, refused, toy_folder, monkeypatch, tmp_path):
    """Llama + Mistral needs --allow-crimes in both tools; a Llama whose config says LLaMaForCausalLM does not."""
    import json
    import shutil

    monkeypatch.chdir(toy_folder)
    if other == "alias" and not (toy_folder / "toy-models" / "alias").is_dir():
        shutil.copytree(toy_folder / "toy-models" / "math", toy_folder / "toy-models" / "alias")
        config_file = toy_folder / "toy-models" / "alias" / "config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "architectures": ["LLaMaForCausalLM"]}))
    models = [str(toy_folder / "toy-models" / name) for name in ("coder", other)]
    recipe = {"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1}} for model in models]}
    ours = _run_in(toy_folder, "yaml", recipe, "--dry-run")
    mergekit_yaml = Path(os.environ["MOEMERGE_MERGEKIT_PYTHON"]).parent / "mergekit-yaml"
    theirs = subprocess.run(
        [str(mergekit_yaml), "recipe.yml", str(tmp_path / "theirs"), "--no-copy-tokenizer"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert (ours.exit_code == 1 and "architectures differ" in ours.output) == refused, ours.output
    assert ("--allow-crimes" in theirs.stderr) == refused, theirs.stderr[-2000:]
    assert (theirs.returncode != 0) == refused


def test_evolve_refuses_a_mixed_template_before_any_candidate_runs(toy_folder, monkeypatch):
    import yaml

    import moemerge.distributed.ray_shards
    from moemerge.cli.evolve_command import main

    monkeypatch.chdir(toy_folder)
    monkeypatch.setattr(moemerge.distributed.ray_shards, "start_ray", lambda *args: pytest.fail("Ray was started"))
    template = LLAMA_AND_MISTRAL["models"] | {"models": [{"model": "toy-models/coder", "parameters": {"weight": 1}}]}
    template["models"].append({"model": "toy-models/mistral-coder", "parameters": {"weight": {"min": 0, "max": 1}}})
    (toy_folder / "evolve-mixed.yml").write_text(
        yaml.safe_dump({"template": template, "objective": {"callable": "os:getcwd"}})
    )
    result = CliRunner().invoke(main, ["evolve-mixed.yml", "out/evolve-mixed"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: models: architectures differ: LlamaForCausalLM")
    assert not (toy_folder / "out" / "evolve-mixed").exists()
