"""Every user error of moemerge-split: one readable line, exit 1, no output folder left behind."""

from __future__ import annotations

import json
import shutil

import pytest
from split_fixtures import run_split


def unsupported(models, tmp_path):
    folder = shutil.copytree(models["mixtral"], tmp_path / "dbrx-model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "dbrx"}))
    return [folder, "--expert", 0]


def empty_calibration(models, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    return [models["mixtral"], "--select", "top-usage", "--calibration", tmp_path / "empty.txt"]


CASES = {
    "dense input": (lambda m, t: [m["llama"], "--expert", 0], ["dense 'llama' model, not a mixture of experts"]),
    "unsupported architecture": (unsupported, ["'dbrx' is not supported", "mixtral"]),
    "missing model": (lambda m, t: [t / "nowhere", "--expert", 0], ["nowhere"]),
    "expert out of range": (lambda m, t: [m["mixtral"], "--expert", 4], ["expert 4 is out of range", "0..3"]),
    "no mode": (lambda m, t: [m["mixtral"]], ["choose exactly one of --expert N"]),
    "two modes": (lambda m, t: [m["mixtral"], "--expert", 1, "--average"], ["got --expert, --average"]),
    "select without calibration": (
        lambda m, t: [m["mixtral"], "--select", "top-usage"],
        ["--select needs --calibration"],
    ),
    "prune without calibration": (lambda m, t: [m["mixtral"], "--prune-to", 2], ["--prune-to needs --calibration"]),
    "bad select": (lambda m, t: [m["mixtral"], "--select", "best", "--calibration", m["calibration"]], ["concat:K"]),
    "concat K too big": (
        lambda m, t: [m["mixtral"], "--select", "concat:5", "--calibration", m["calibration"]],
        ["concat:5", "4 experts"],
    ),
    "prune K = all": (
        lambda m, t: [m["mixtral"], "--prune-to", 4, "--calibration", m["calibration"]],
        ["--prune-to 4", "less than the model's 4 experts"],
    ),
    "prune K = 0": (lambda m, t: [m["mixtral"], "--prune-to", 0, "--calibration", m["calibration"]], ["at least 1"]),
    "empty calibration": (empty_calibration, ["empty.txt: the file has no text"]),
    "missing calibration": (
        lambda m, t: [m["mixtral"], "--prune-to", 2, "--calibration", t / "gone.txt"],
        ["gone.txt", "cannot read it"],
    ),
    "report without calibration": (
        lambda m, t: [m["mixtral"], "--expert", 0, "--report", t / "u.png"],
        ["--report needs --calibration"],
    ),
    "score without prune": (lambda m, t: [m["mixtral"], "--average", "--score", "frequency"], ["--score only"]),
    "olmoe as dense": (lambda m, t: [m["olmoe"], "--average"], ["'olmoe' has no dense counterpart", "--prune-to"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_and_leaves_nothing(split_models, tmp_path, case):
    make_args, expected = CASES[case]
    out = tmp_path / "out"
    model, *options = make_args(split_models, tmp_path)
    result = run_split(model, out, *options)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in expected:
        assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging folder left


def test_non_empty_output_needs_overwrite(split_models, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run_split(split_models["mixtral"], tmp_path / "out", "--expert", 0)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert run_split(split_models["mixtral"], tmp_path / "out", "--expert", 0, "--overwrite").exit_code == 0
    assert not (tmp_path / "out" / "keep.txt").exists()
