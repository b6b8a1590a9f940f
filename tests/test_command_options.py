"""The commands agree with each other and with mergekit: every mergekit flag its counterpart accepts runs here too.

The commands are run in-process with the job they call replaced by a recorder, so each case costs milliseconds
and shows what the flag changed (or the note that it changed nothing).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

# From mergekit 0.1.5's click definitions: mergekit-yaml, mergekit-multi and mergekit-extract-lora take
# `add_merge_options` (every flag below, each also as --no-FLAG, --lora-merge-cache PATH); mergekit-moe adds its
# confirmation flag; mergekit-evolve takes none of them but has its own --allow-crimes.
MERGE_OPTIONS = [
    "--cuda",
    "--lazy-unpickle",
    "--low-cpu-memory",
    "--copy-tokenizer",
    "--clone-tensors",
    "--lora-merge-cache",
    "--allow-crimes",
]
ACCEPTED = {
    "yaml": MERGE_OPTIONS,
    "moe": [*MERGE_OPTIONS, "--i-understand-this-is-not-useful-without-training"],
    "lora": MERGE_OPTIONS,
    "evolve": ["--allow-crimes"],
}
NO_EFFECT = {  # flags that change nothing in our command (a note says so when given)
    "yaml": {"--lazy-unpickle", "--low-cpu-memory", "--clone-tensors", "--lora-merge-cache"},
    "moe": {"--lazy-unpickle", "--low-cpu-memory", "--clone-tensors", "--lora-merge-cache", "--allow-crimes"}
    | {"--i-understand-this-is-not-useful-without-training"},
    "lora": {"--lazy-unpickle", "--low-cpu-memory", "--clone-tensors", "--lora-merge-cache", "--copy-tokenizer"}
    | {"--allow-crimes"},
    "evolve": set(),
}
NEGATABLE = {"--cuda", "--lazy-unpickle", "--low-cpu-memory", "--copy-tokenizer", "--clone-tensors", "--allow-crimes"}


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Run a command with its job replaced by a recorder; returns (click result, the keyword arguments it got)."""
    import moemerge.api
    import moemerge.cli.lora_command
    import moemerge.evolve.search
    import moemerge.lora.extract

    calls: list[dict] = []

    def record(result):
        def job(*args, **kwargs):
            calls.append(kwargs)
            return result

        return job

    monkeypatch.setattr(moemerge.api, "merge", record("merged"))
    monkeypatch.setattr(moemerge.api, "build_moe", record("assembled"))
    monkeypatch.setattr(moemerge.lora.extract, "extract_lora", lambda *args: calls.append(vars(args[3])) or report())
    monkeypatch.setattr(moemerge.cli.lora_command, "resolve_device", lambda device: device)  # no GPU needed
    monkeypatch.setattr(
        moemerge.evolve.search,
        "run_search",
        lambda template, objective, out, settings, **kwargs: (
            calls.append(vars(objective) | vars(settings)) or SimpleNamespace(best_score=1.0)
        ),
    )
    evolve_config = tmp_path / "evolve.yml"
    evolve_config.write_text("template: {merge_method: linear}\nobjective: {callable: 'os:getcwd'}\n")

    def run(command: str, *flags: str):
        from moemerge.cli import evolve_command, lora_command, moe_command, yaml_command

        main, args = {
            "yaml": (yaml_command.main, ["recipe.yml", "out"]),
            "moe": (moe_command.main, ["recipe.yml", "out"]),
            "lora": (lora_command.main, ["extract", "finetune", "base", "out"]),
            "evolve": (evolve_command.main, [str(evolve_config), str(tmp_path / "search")]),
        }[command]
        calls.clear()
        result = CliRunner().invoke(main, [*args, *flags], catch_exceptions=False)
        return result, (calls[0] if calls else None)

    return run


def report():
    from moemerge.lora.extract import ExtractReport

    return ExtractReport()


CASES = [(command, flag) for command, flags in ACCEPTED.items() for flag in flags]


@pytest.mark.parametrize(("command", "flag"), CASES, ids=[f"{command}{flag}" for command, flag in CASES])
def test_mergekit_flags_are_accepted_where_mergekit_accepts_them(command, flag, recorded):
    given = [flag, "cache-dir"] if flag == "--lora-merge-cache" else [flag]
    result, options = recorded(command, *given)
    assert result.exit_code == 0, result.output
    noted = f"INFO: {flag} is accepted for mergekit compatibility and has no effect: " in result.output
    assert noted == (flag in NO_EFFECT[command]), result.output
    if flag == "--cuda":
        assert options["device"] == "cuda"
    if flag in ("--copy-tokenizer", "--allow-crimes") and flag not in NO_EFFECT[command]:
        assert options[flag.removeprefix("--").replace("-", "_")] is True
    if flag in NEGATABLE:  # mergekit's boolean options come in pairs
        negative = f"--no-{flag.removeprefix('--')}"
        result, options = recorded(command, negative)
        assert result.exit_code == 0, result.output
        assert "has no effect" not in result.output
        if flag == "--copy-tokenizer" and command in ("yaml", "moe"):
            assert options["copy_tokenizer"] is False


@pytest.mark.parametrize("command", list(ACCEPTED))
def test_without_flags_nothing_is_noted_and_defaults_hold(command, recorded):
    result, options = recorded(command)
    assert result.exit_code == 0, result.output
    assert "mergekit compatibility" not in result.output
    assert options["device"] == "cpu"
    if command in ("yaml", "evolve"):
        assert options["allow_crimes"] is False


def test_evolve_task_memory_is_read_as_other_commands_read_memory(recorded):
    result, _ = recorded("evolve", "--task-memory", "4")
    assert result.exit_code == 2 and "'4' has no unit" in result.output
    result, options = recorded("evolve", "--task-memory", "2GiB")
    assert result.exit_code == 0, result.output
    assert options["task_memory"] == 2 * 2**30
