"""Model references: local folders, and `org/name[@revision]` from the Hugging Face cache with no network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moemerge.errors import ModelNotFoundError
from moemerge.io.model_ref import resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(hf_home: Path, repo_id: str, source: Path, revision: str = "main") -> Path:
    """Lay out `source` as huggingface_hub's cache does: models--org--name/{refs,snapshots}."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf"


def test_local_folder_resolves_to_itself(toy_models):
    assert resolve_model(str(toy_models["coder"])) == toy_models["coder"].resolve()


def test_repo_id_and_revision_resolve_from_the_cache(toy_models, offline_hub):
    snapshot = fake_hub_cache(offline_hub, "toyorg/coder", toy_models["coder"], revision="v1")
    assert resolve_model("toyorg/coder@v1") == snapshot
    assert resolve_model(f"toyorg/coder@{COMMIT}") == snapshot
    with pytest.raises(ModelNotFoundError, match="no such folder.*no repo 'toyorg/coder' in the local Hugging Face"):
        resolve_model("toyorg/coder@v2")


def test_merge_from_a_cached_repo_id(toy_models, offline_hub, write_recipe, run_yaml, tmp_path):
    fake_hub_cache(offline_hub, "toyorg/math", toy_models["math"])
    recipe = write_recipe(
        {"merge_method": "linear", "models": [{"model": "toyorg/math", "parameters": {"weight": 1.0}}]}
    )
    result = run_yaml(recipe, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(str(tmp_path / "model.safetensors"))
