"""moemerge against mergekit 0.1.5 itself, on a few recipes (runs only where MOEMERGE_MERGEKIT_PYTHON is set).

MOEMERGE_MERGEKIT_PYTHON=/work/mkvenv/bin/python python3 -m pytest tests/test_methods_mergekit_parity.py
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import yaml

MERGEKIT_PYTHON = os.environ.get("MOEMERGE_MERGEKIT_PYTHON")
pytestmark = pytest.mark.skipif(not MERGEKIT_PYTHON, reason="set MOEMERGE_MERGEKIT_PYTHON to a python with mergekit")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mergekit_parity.py"


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("mergekit_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path_factory.mktemp("parity")
    return module, folder, module.make_models(folder / "models")


@pytest.mark.parametrize("name", ["ties", "model_stock", "nuslerp-rows", "multislerp-base", "sce", "ramplus_tl"])
def test_same_tensors_as_mergekit(parity, name):
    module, folder, models = parity
    config = folder / f"{name}.yml"
    config.write_text(yaml.safe_dump(module.resolve(module.RECIPES[name], models), sort_keys=False))
    module.run_moemerge(config, folder / f"ours-{name}", 0)
    module.run_mergekit(Path(MERGEKIT_PYTHON).parent / "mergekit-yaml", config, folder / f"theirs-{name}", 0)
    worst, where, _ = module.compare(
        module.read_all(folder / f"ours-{name}"), module.read_all(folder / f"theirs-{name}")
    )
    assert worst < 1e-6, where
