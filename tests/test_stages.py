"""Multi-stage recipes: stages run in order into intermediates, a rerun reuses complete ones, --dry-run shows all."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import read_tensors

from moemerge.config.stages import load_stages
from moemerge.errors import ConfigError
from moemerge.stages import STAGE_MARKER


def three_stages(models) -> list[dict]:
    def entry(name, weight):
        return {"model": name if name in ("blend", "tuned") else str(models[name]), "parameters": {"weight": weight}}

    return [
        {"name": "blend", "merge_method": "linear", "models": [entry("coder", 0.5), entry("math", 0.5)]},
        {
            "name": "tuned",
            "merge_method": "task_arithmetic",
            "base_model": str(models["base"]),
            "models": [entry("blend", 1.0), entry("story", 0.5)],
        },
        {
            "merge_method": "slerp",
            "base_model": str(models["base"]),
            "models": [{"model": str(models["base"])}, {"model": "tuned"}],
            "parameters": {"t": 0.5},
        },
    ]


def write_stages(tmp_path, documents, name="stages.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reference(toy_models, tmp_path_factory):
    """The three stages run one by one as single recipes, each naming the previous output's folder."""
    from click.testing import CliRunner

    from moemerge.cli.yaml_command import main

    root = tmp_path_factory.mktemp("stages-reference")
    documents = three_stages(toy_models)
    folders = {"blend": root / "blend", "tuned": root / "tuned", None: root / "final"}
    for document in documents:
        name = document.pop("name", None)
        text = yaml.safe_dump(document).replace(": blend\n", f": {folders['blend']}\n")
        text = text.replace(": tuned\n", f": {folders['tuned']}\n")
        (root / "recipe.yml").write_text(text)
        result = CliRunner().invoke(main, [str(root / "recipe.yml"), str(folders[name]), "--quiet"])
        assert result.exit_code == 0, result.output
    return read_tensors(folders[None])


def assert_same(folder, expected):
    merged = read_tensors(folder)
    assert set(merged) == set(expected)
    for name, tensor in merged.items():
        assert tensor.equal(expected[name]), name


def test_three_stages_run_in_order_and_clean_up(toy_models, reference, run_yaml, tmp_path):
    path = write_stages(tmp_path, three_stages(toy_models))
    result = run_yaml(path, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert_same(tmp_path / "out", reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stages.yml"]  # intermediates removed
    assert (tmp_path / "out" / "moemerge_config.yml").read_text() == path.read_text()
    card = (tmp_path / "out" / "README.md").read_text()  # names the chain's inputs, not its removed intermediates
    assert "moemerge-stages" not in card and "a merge of 4 models using the `slerp` method" in card


def test_a_rerun_reuses_complete_stages_and_redoes_an_interrupted_one(toy_models, reference, run_yaml, tmp_path):
    path = write_stages(tmp_path, three_stages(toy_models))
    stages_dir = tmp_path / "stages"
    args = ("--intermediate-dir", stages_dir, "--keep-intermediates", "--quiet")
    assert run_yaml(path, tmp_path / "out", *args).exit_code == 0
    assert json.loads((stages_dir / "blend" / STAGE_MARKER).read_text())["stage"] == "blend"
    # a kill during stage 2: its folder lacks the marker and a partial staging folder is left beside it
    blend_shards = {p: p.stat().st_mtime_ns for p in (stages_dir / "blend").glob("*.safetensors")}
    (stages_dir / "tuned" / STAGE_MARKER).unlink()
    (stages_dir / ".tuned.moemerge-partial-999999999-dead").mkdir()
    tuned_before = {p: p.stat().st_mtime_ns for p in (stages_dir / "tuned").glob("*.safetensors")}

    dry = run_yaml(path, tmp_path / "out2", "--dry-run", "--intermediate-dir", stages_dir)
    assert "stage 1/3 'blend': linear" in dry.output and "(complete, reused)" in dry.output
    assert f"{stages_dir / 'tuned'} (to merge)" in dry.output

    result = run_yaml(path, tmp_path / "out2", "--intermediate-dir", stages_dir, "--keep-intermediates", "-v")
    assert result.exit_code == 0, result.output
    assert "stage 1/3 'blend': complete" in result.output and "stage 2/3 'tuned': merging" in result.output
    assert {p: p.stat().st_mtime_ns for p in blend_shards} == blend_shards  # stage 1 was not merged again
    assert all(p.stat().st_mtime_ns != t for p, t in tuned_before.items() if p.exists())
    assert not (stages_dir / ".tuned.moemerge-partial-999999999-dead").exists()
    assert (stages_dir / "tuned" / STAGE_MARKER).exists()
    assert_same(tmp_path / "out2", reference)


def test_a_changed_stage_is_merged_again(toy_models, run_yaml, tmp_path):
    documents = three_stages(toy_models)
    path = write_stages(tmp_path, documents)
    stages_dir = tmp_path / "stages"
    assert (
        run_yaml(path, tmp_path / "out", "--intermediate-dir", stages_dir, "--keep-intermediates", "--quiet").exit_code
        == 0
    )
    documents[0]["models"][0]["parameters"]["weight"] = 0.7
    path = write_stages(tmp_path, documents)
    dry = run_yaml(path, tmp_path / "out2", "--dry-run", "--intermediate-dir", stages_dir)
    assert "(complete, reused)" not in dry.output


def test_dry_run_shows_the_whole_chain_and_writes_nothing(toy_models, run_yaml, tmp_path):
    path = write_stages(tmp_path, three_stages(toy_models))
    result = run_yaml(path, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("3 stages; intermediates in ") and ".out.moemerge-stages" in lines[0]
    assert [line.split(":")[0] for line in lines if line.startswith("stage ")] == [
        "stage 1/3 'blend'",
        "stage 2/3 'tuned'",
        "stage 3/3 (final)",
    ]
    assert "method: linear" in result.output  # stage 1's inputs exist: its plan is shown
    assert "plan after 'blend' exist" in result.output and "plan after 'tuned' exist" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.yml"]


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        ([{"name": "a"}, {"name": "a"}], "two stages are named 'a'"),
        ([{}, {}], "more than one document has no name"),
        ([{"name": "a", "uses": "b"}, {"name": "b", "uses": "a"}, {"uses": "a"}], "stages form a cycle"),
        ([{"name": "a"}, {"name": "b"}], "'a', 'b' are all final"),
        ([{"name": "a", "uses": "a"}, {"uses": "a"}], "uses itself"),
    ],
)
def test_stage_structure_errors(tmp_path, documents, message):
    def recipe(document):
        uses = document.pop("uses", "org/model")
        return {**document, "merge_method": "linear", "models": [{"model": uses}]}

    with pytest.raises(ConfigError, match=message):
        load_stages(write_stages(tmp_path, [recipe(dict(d)) for d in documents]))


def test_stages_run_in_dependency_order_whatever_the_file_order(tmp_path):
    documents = [
        {"merge_method": "linear", "models": [{"model": "second"}]},
        {"name": "second", "merge_method": "linear", "models": [{"model": "first"}, {"model": "org/x"}]},
        {"name": "first", "merge_method": "linear", "models": [{"model": "org/y"}]},
    ]
    stages, _ = load_stages(write_stages(tmp_path, documents))
    assert [stage.name for stage in stages] == ["first", "second", None]
    assert stages[1].needs == ("first",)
    recipe, _ = stages[1].resolved({"first": tmp_path / "first", "second": tmp_path / "second"})
    assert [entry.model for entry in recipe.models] == [str(tmp_path / "first"), "org/x"]
