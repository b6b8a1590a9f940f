"""What a new user meets first: every example config runs on the toy models, startup without torch, clear errors."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize("command", ["yaml", "moe", "split"])
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_answer_without_importing_torch(command, flag):
    code = (
        f"import sys; from moemerge.cli.{command}_command import main\n"
        f"try:\n    main([{flag!r}])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip().endswith("False"), result.stdout
    assert ("moemerge 0.1.0" in result.stdout) if flag == "--version" else ("--out-shard-size" in result.stdout)


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
    assert message.startswith("error: model 'toy-models/mathh' not found: no such folder under ")
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
