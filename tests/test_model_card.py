"""The output model card: `base_model:` holds hub repo ids only (local folders are named in the text), and the card
links no package page that does not exist."""

from __future__ import annotations

import pytest
import yaml
from split_fixtures import run_split

from moemerge.io.model_folder import write_model_card
from moemerge.io.model_ref import hub_ids, is_hub_id


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize(
    "reference, hub",
    [
        ("mistralai/Mixtral-8x7B-v0.1", True),
        ("org/name@main", True),
        ("org/name@0123abc", True),
        ("/models/org/name", False),  # absolute path
        ("~/models/name", False),
        ("./org/name", False),
        ("../name", False),
        ("toy-models/math/v2", False),  # more than one slash: a path (as mergekit)
        ("gpt2", False),  # only org/name resolves from the hub here
        ("org/bad name", False),  # not a valid repo id
        ("org/", False),
    ],
)
def test_hub_id_or_local_path(reference, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id(reference) is hub


def test_an_existing_folder_is_local_even_if_shaped_like_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("toy-models/base")
    (tmp_path / "toy-models" / "base").mkdir(parents=True)
    assert not is_hub_id("toy-models/base") and not is_hub_id("toy-models/base@main")


def test_card_lists_hub_ids_once_without_revisions_and_names_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "coder").mkdir(parents=True)
    write_model_card(
        tmp_path,
        title="Merged model",
        base_models=["org/base@v1", "local/coder", str(tmp_path / "local" / "coder"), "org/base", "org/math"],
        summary="A merge.",
        recipe_text="merge_method: linear\n",
    )
    card = (tmp_path / "README.md").read_text()
    assert front_matter(card)["base_model"] == ["org/base", "org/math"]
    assert "- `local/coder` (local folder)" in card and "[org/math](https://huggingface.co/org/math)" in card
    assert "pypi" not in card.lower() and "Made with moemerge" in card


def test_all_local_inputs_give_an_empty_base_model(tmp_path):
    write_model_card(tmp_path, title="t", base_models=["/models/a", "./b"], summary="s", recipe_text="x: 1\n")
    assert front_matter((tmp_path / "README.md").read_text())["base_model"] == []
    assert hub_ids(["/models/a", "org/a@main", "org/a"]) == ["org/a"]


def test_split_card_of_a_local_model_has_no_base_model_and_no_package_link(split_models, tmp_path):
    result = run_split(split_models["mixtral"], tmp_path / "out", "--expert", 1)
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert front_matter(card)["base_model"] == []
    assert f"- `{split_models['mixtral']}` (local folder)" in card
    assert "pypi.org" not in card and "](http" not in card
