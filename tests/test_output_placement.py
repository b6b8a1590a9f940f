"""Output placement under kills, signals, races and mistakes: the target always holds the complete old folder or the
complete new one, the next run cleans up after a killed one, and --overwrite never replaces what a run reads."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from placement_child import FILES, build
from test_bad_inputs import linear

from moemerge.errors import OutputError
from moemerge.io import output_dir
from moemerge.io.output_dir import check_target, staged_output

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("placement_child.py")


def contents(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(folder.iterdir())}


def complete(version: str) -> dict[str, str]:
    return {name: f"{version}:{name}\n" * 1000 for name in sorted(FILES)}


def run_child(target: Path, version: str, *, kill_at: str | None = None, exchange: bool = True) -> int:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{CHILD.parent}"}
    env.pop(output_dir.KILL_POINT_ENV, None)
    if kill_at:
        env[output_dir.KILL_POINT_ENV] = kill_at
    if not exchange:
        env[output_dir.NO_EXCHANGE_ENV] = "1"
    return subprocess.run([sys.executable, str(CHILD), str(target), version, "overwrite"], env=env).returncode


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}"))


def old_target(tmp_path: Path) -> Path:
    target = tmp_path / "out"
    target.mkdir()
    build(target, "old")
    return target


KILL_POINTS = [
    ("staged", True, "old"),  # output complete in staging, not yet moved
    ("exchanged", True, "new"),  # swapped; the old folder waits under the staging name
    ("journaled", False, "old"),  # two-step fallback: journal written, nothing moved yet
    ("retired", False, "new"),  # two-step fallback: old moved aside, nothing at the path: the next run finishes
    ("replaced", False, "new"),  # two-step fallback: new in place, old not yet deleted
]


@pytest.mark.parametrize("kill_at, exchange, after_recovery", KILL_POINTS, ids=[k[0] for k in KILL_POINTS])
def test_a_kill_at_any_step_of_placement_loses_nothing(kill_at, exchange, after_recovery, tmp_path):
    target = old_target(tmp_path)
    assert run_child(target, "new", kill_at=kill_at, exchange=exchange) == -signal.SIGKILL
    if target.exists():
        assert contents(target) in (complete("old"), complete("new"))  # never a mixture, never partial
    else:
        assert kill_at == "retired"  # the one gap of the fallback, closed by the journal below
    check_target(target, overwrite=True)  # the next run's first check finishes or undoes the placement
    assert contents(target) == complete(after_recovery)
    assert run_child(target, "newer") == 0  # ... and the next run removes the killed run's staging folders
    assert contents(target) == complete("newer")
    assert leftovers(target) == []


def test_the_exchange_keeps_the_old_folder_complete_until_the_swap(tmp_path, monkeypatch):
    """With renameat2 the swap is one step: at the instant before it the old folder is whole, after it the new one."""
    target = old_target(tmp_path)
    seen = []
    real_exchange = output_dir._exchange

    def watched(first, second):
        seen.append(contents(second))
        done = real_exchange(first, second)
        seen.append(contents(second))
        return done

    monkeypatch.setattr(output_dir, "_exchange", watched)
    with staged_output(target, overwrite=True) as staging:
        build(staging, "new")
    if seen[0] == seen[1]:
        pytest.skip("this file system cannot exchange (the journaled path is tested above)")
    assert seen == [complete("old"), complete("new")]
    assert contents(target) == complete("new") and leftovers(target) == []


def test_a_folder_that_appears_during_the_run_is_kept(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="not empty"):
        with staged_output(target, overwrite=False) as staging:
            build(staging, "new")
            target.mkdir()
            (target / "precious.txt").write_text("made by the user meanwhile")
    assert contents(target) == {"precious.txt": "made by the user meanwhile"}
    assert leftovers(target) == []


def test_a_second_run_into_the_same_target_is_refused(tmp_path):
    target = tmp_path / "out"
    with staged_output(target, overwrite=False) as staging:
        build(staging, "first")
        with pytest.raises(OutputError, match=f"another moemerge run \\(pid {os.getpid()}\\) is writing"):
            check_target(target, overwrite=True)
        with pytest.raises(OutputError, match="another moemerge run"):
            with staged_output(target, overwrite=True):
                pass
    assert contents(target) == complete("first") and leftovers(target) == []


def test_stale_staging_of_dead_runs_is_removed_and_live_ones_are_kept(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    for pid in (dead_pid, os.getppid()):
        folder = tmp_path / f".out{output_dir.PARTIAL_MARKER}{pid}-abcd1234"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(bytes(1000))
    with staged_output(target, overwrite=False) as staging:
        build(staging, "new")
    assert leftovers(target) == [f".out{output_dir.PARTIAL_MARKER}{os.getppid()}-abcd1234"]


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_termination_signals_stop_the_run_like_ctrl_c(signal_number, toy_models, write_recipe, run_yaml, tmp_path):
    """SIGTERM and SIGHUP (as from `kill` or a closed terminal) clean up exactly as Ctrl-C does."""
    from moemerge.io import model_folder

    target = old_target(tmp_path)
    real = model_folder.write_config

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal_number)
        return real(*args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    mp = pytest.MonkeyPatch()
    mp.setattr("moemerge.dense_merge.write_config", signalled)
    try:
        result = run_yaml(write_recipe(linear(toy_models["coder"])), target, "--overwrite", "--quiet")
    finally:
        mp.undo()
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert contents(target) == complete("old") and leftovers(target) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are put back


def test_a_signal_during_the_move_is_held_until_the_output_is_in_place(tmp_path, monkeypatch, caplog):
    """Ctrl-C right at the swap used to delete the finished output and say 'no output was written'."""
    target = old_target(tmp_path)
    real_place = output_dir._place

    def interrupted_place(staging, destination):
        os.kill(os.getpid(), signal.SIGINT)
        real_place(staging, destination)

    monkeypatch.setattr(output_dir, "_place", interrupted_place)
    with staged_output(target, overwrite=True) as staging:
        build(staging, "new")
    assert contents(target) == complete("new") and leftovers(target) == []
    assert "SIGINT arrived while the output was being moved" in caplog.text


def test_overwrite_never_replaces_an_input_the_recipe_or_the_working_directory(
    toy_models, write_recipe, run_yaml, tmp_path, monkeypatch
):
    import shutil

    out = tmp_path / "out"
    inside = shutil.copytree(toy_models["coder"], out / "models" / "coder")
    result = run_yaml(write_recipe(linear(inside)), out, "--overwrite")
    assert result.exit_code == 1 and "refusing to replace" in result.stderr and "input model" in result.stderr
    assert (inside / "config.json").is_file()

    recipe = out / "recipe.yml"
    recipe.write_text((tmp_path / "recipe.yml").read_text().replace(str(inside), str(toy_models["math"])))
    result = run_yaml(recipe, out, "--overwrite")
    assert result.exit_code == 1 and "refusing to replace" in result.stderr and "recipe" in result.stderr
    assert recipe.is_file()

    monkeypatch.chdir(out)
    result = run_yaml(write_recipe(linear(toy_models["math"]), "elsewhere.yml"), out, "--overwrite")
    assert result.exit_code == 1 and "current directory" in result.stderr
    assert (inside / "config.json").is_file() and recipe.is_file()


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_outputs_get_plain_mkdir_permissions(umask, folder_mode, file_mode, toy_models, write_recipe, tmp_path):
    """A serving process under another user must be able to read the model (mkdtemp made the folder 0700)."""
    from click.testing import CliRunner

    from moemerge.cli.yaml_command import main

    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        result = CliRunner().invoke(main, [str(write_recipe(linear(toy_models["coder"]))), str(out), "--quiet"])
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert modes and all(mode == file_mode for mode in modes.values()), modes


def test_any_full_disk_in_the_staged_folder_is_one_error(tmp_path):
    """Writers other than ours (a tokenizer's save_pretrained) may fill the disk: still one line, nothing left."""
    import errno

    target = tmp_path / "out"
    with pytest.raises(OutputError, match="disk full while writing tokenizer.json of .*out"):
        with staged_output(target, overwrite=False) as staging:
            raise OSError(errno.ENOSPC, "No space left on device", str(staging / "tokenizer.json"))
    assert not target.exists() and leftovers(target) == []


def test_sigterm_while_planning_is_an_interrupt(toy_models, write_recipe, run_yaml, tmp_path, monkeypatch):
    import moemerge.plan.dense_plan as dense_plan  # the command plans through moemerge.api, which calls this

    real_plan = dense_plan.plan_merge

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(dense_plan, "plan_merge", terminated)
    out = tmp_path / "out"
    result = run_yaml(write_recipe(linear(toy_models["coder"])), out)
    assert result.exit_code == 130 and "interrupted: no output was written" in result.stderr
    assert not out.exists() and leftovers(out) == []
