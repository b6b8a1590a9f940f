"""`moemerge-split --report`: what the heatmap says (title, integer ticks, marks, numbers, caption), read from the
figure object and the PNG's metadata, and `--usage` reusing a calibration pass instead of running another."""

from __future__ import annotations

import json
import sys

import torch
import yaml
from PIL import Image
from split_fixtures import read_tensors, run_split

import moemerge.split.run
from moemerge.split.report import ReportMarks, usage_figure
from moemerge.split.usage import RouterUsage


def synthetic_usage(layers: int, experts: int) -> RouterUsage:
    usage = RouterUsage.empty(layers, experts)
    usage.counts = torch.arange(layers * experts, dtype=torch.float64).reshape(layers, experts) % 7
    usage.tokens, usage.moe_layers = 10, list(range(layers))
    return usage


def cells(axes, gid: str) -> set[tuple[int, int]]:
    """(expert, layer row) of the cell patches marked `gid`."""
    return {
        (round(patch.get_x() + 0.5), round(patch.get_y() + 0.5)) for patch in axes.patches if patch.get_gid() == gid
    }


def test_small_grid_has_title_integer_ticks_numbers_marks_and_top_k():
    usage = synthetic_usage(3, 4)
    kept = {0: [1, 2], 1: [0, 3], 2: [2, 3]}
    figure = usage_figure(usage, model_label="/models/toy-mixtral/", experts_per_token=2,
                          marks=ReportMarks("kept (--prune-to 2)", kept, pruned=True))  # fmt: skip
    axes = figure.axes[0]
    assert axes.get_title() == "Expert usage: toy-mixtral"
    assert [label.get_text() for label in axes.get_xticklabels()] == ["0", "1", "2", "3"]
    assert list(axes.get_xticks()) == [0, 1, 2, 3]
    assert [label.get_text() for label in axes.get_yticklabels()] == ["0", "1", "2"]
    assert cells(axes, "kept") == {(expert, layer) for layer, experts in kept.items() for expert in experts}
    assert cells(axes, "pruned") == {(e, layer) for layer in range(3) for e in range(4) if e not in kept[layer]}
    numbers = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in axes.texts}
    assert numbers == {(e, layer): f"{float(usage.counts[layer, e]) / 10:.2f}" for layer in range(3) for e in range(4)}
    caption = next(text.get_text() for text in figure.texts if text.get_gid() == "caption")
    assert "top-2 of 4 experts per token" in caption and "10 calibration tokens" in caption
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend == ["kept (--prune-to 2)", "pruned (dimmed)"]


def test_large_grid_thins_integer_ticks_and_drops_the_numbers():
    figure = usage_figure(synthetic_usage(48, 128), model_label="org/big-moe", experts_per_token=8)
    axes = figure.axes[0]
    labels = [label.get_text() for label in axes.get_xticklabels()]
    assert 16 <= len(labels) <= 32 and all(label.isdigit() for label in labels) and labels[0] == "0"
    assert [int(label) for label in labels] == [int(tick) for tick in axes.get_xticks()]
    assert not axes.texts and not axes.patches and axes.get_legend() is None
    assert axes.get_title() == "Expert usage: big-moe"


def test_report_png_says_what_it_shows(calibrated_prune):
    png = Image.open(calibrated_prune / "usage.png")
    assert png.text["Title"] == "Expert usage: mixtral"
    assert "708 calibration tokens" in png.text["Description"]
    assert "top-2 of 4 experts per token" in png.text["Description"]
    assert "outlined: kept (--prune-to 2); dimmed: pruned" in png.text["Description"]
    assert json.loads((calibrated_prune / "usage.json").read_text())["experts_per_token"] == 2


def test_usage_gives_the_same_prune_without_calibrating(split_models, calibrated_prune, tmp_path, monkeypatch):
    def no_calibration(*args, **kwargs):
        raise AssertionError("--usage must not run the calibration pass")

    monkeypatch.setattr(moemerge.split.run, "collect_usage", no_calibration)
    result = run_split(split_models["mixtral"], tmp_path / "again", "--prune-to", 2,
                       "--usage", calibrated_prune / "usage.json", "--report", tmp_path / "again.png")  # fmt: skip
    assert result.exit_code == 0, result.output

    def recipe(folder):
        return yaml.safe_load((folder / "moemerge_split_config.yml").read_text())

    first, second = recipe(calibrated_prune / "pruned"), recipe(tmp_path / "again")
    assert second["layers"] == first["layers"]
    assert second["calibration"]["tokens"] == first["calibration"]["tokens"] == 708
    assert second["calibration"]["usage_file"] == "usage.json"
    again, before = read_tensors(tmp_path / "again"), read_tensors(calibrated_prune / "pruned")
    assert again.keys() == before.keys() and all(torch.equal(again[name], before[name]) for name in before)
    first_report = json.loads((calibrated_prune / "usage.json").read_text())
    second_report = json.loads((tmp_path / "again.json").read_text())
    assert second_report["counts"] == first_report["counts"] and second_report["reap"] == first_report["reap"]


def test_select_report_outlines_the_dense_experts(split_models, calibrated_prune, tmp_path, monkeypatch):
    monkeypatch.setattr(moemerge.split.run, "collect_usage", None)  # calling it would fail the run
    result = run_split(split_models["mixtral"], tmp_path / "top", "--select", "top-usage", "--usage",
                       calibrated_prune / "usage.json", "--report", tmp_path / "top.png", "--dry-run")  # fmt: skip
    assert result.exit_code == 0, result.output
    description = Image.open(tmp_path / "top.png").text["Description"]
    assert "outlined: in the dense MLP" in description and "pruned" not in description


def test_missing_matplotlib_hint_works_from_a_checkout(split_models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = run_split(split_models["mixtral"], tmp_path / "out", "--prune-to", 2,
                       "--calibration", split_models["calibration"], "--report", tmp_path / "u.png")  # fmt: skip
    assert result.exit_code != 0
    assert "error: --report needs matplotlib: pip install matplotlib, or from a moemerge checkout: " in result.output
    assert "pip install -e '.[report]'" in result.output and "moemerge[report]" not in result.output
    assert not (tmp_path / "u.png").exists() and not (tmp_path / "out").exists()
