"""Configs every client reads the same way: split's dense and pruned outputs carry transformers 4.x's legacy rope
keys (and the sliding window) beside transformers 5's `rope_parameters`, and those keys alone mean the same model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from split_fixtures import run_split
from transformers import AutoConfig, AutoModelForCausalLM

from moemerge.api import build_moe
from moemerge.toys import make_toy_model

ROPE_THETA = 1e6  # not the dense classes' default (Mistral and Qwen3 default to 1e4 in transformers 4.x)
INPUT_IDS = torch.randint(3, 384, (1, 20), generator=torch.Generator().manual_seed(5))  # longer than the window


@pytest.fixture(scope="module")
def rope_moes(tmp_path_factory, split_models) -> dict[str, Path]:
    """A Mixtral assembled from a Mistral base with rope_theta 1e6 and sliding_window 8; a Qwen3-MoE saved by
    transformers 5 with rope_theta 1e6 (its config.json has rope_parameters only)."""
    root = tmp_path_factory.mktemp("rope-moes")
    base = make_toy_model(root / "mistral", "mistral", seed=80, rope_theta=ROPE_THETA, sliding_window=8)
    experts = [make_toy_model(root / f"ft{n}", "mistral", seed=81 + n, base=base, delta_scale=0.5) for n in range(2)]
    recipe = {
        "base_model": str(base),
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [{"source_model": str(folder)} for folder in experts],
    }
    build_moe(recipe, root / "mixtral", progress=False)
    qwen3_moe = make_toy_model(
        root / "qwen3-moe",
        "qwen3_moe",
        seed=84,
        rope_theta=ROPE_THETA,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
    )
    assert "rope_theta" not in json.loads((qwen3_moe / "config.json").read_text())
    return {"mixtral": root / "mixtral", "qwen3_moe": qwen3_moe, "calibration": split_models["calibration"]}


def _logits(folder: Path, config: dict) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, config=AutoConfig.for_model(**config), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(INPUT_IDS).logits


@pytest.mark.parametrize(
    ("moe", "mode", "model_type"),
    [
        ("mixtral", ["--expert", "1"], "mistral"),
        ("mixtral", ["--select", "concat:2"], "mistral"),
        ("qwen3_moe", ["--expert", "0"], "qwen3"),
        ("qwen3_moe", ["--select", "concat:2"], "qwen3"),
        ("qwen3_moe", ["--prune-to", "2"], "qwen3_moe"),
    ],
)
def test_legacy_keys_alone_give_the_written_models_logits(rope_moes, tmp_path, moe, mode, model_type):
    calibration = ["--calibration", rope_moes["calibration"]] if mode[0] != "--expert" else []
    result = run_split(rope_moes[moe], tmp_path / "out", *mode, *calibration)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == model_type
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == ROPE_THETA
    assert "rope_scaling" in config
    if moe == "mixtral":
        assert config["sliding_window"] == 8
    legacy_only = {key: value for key, value in config.items() if key != "rope_parameters"}
    written = _logits(tmp_path / "out", config)
    torch.testing.assert_close(_logits(tmp_path / "out", legacy_only), written, rtol=0, atol=0)
    neither = {key: value for key, value in legacy_only.items() if key != "rope_theta"}  # the class default base
    assert not torch.allclose(_logits(tmp_path / "out", neither), written, atol=1e-5)


@pytest.mark.skipif(
    not os.environ.get("MOEMERGE_OLD_TRANSFORMERS_PYTHON"),
    reason="set MOEMERGE_OLD_TRANSFORMERS_PYTHON to a Python with transformers 4.x",
)
def test_transformers_4_gives_the_same_logits_for_every_written_family():
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_old_transformers.py"
    result = subprocess.run(
        [sys.executable, str(script), "--old-python", os.environ["MOEMERGE_OLD_TRANSFORMERS_PYTHON"]],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if re.search(r"\d\.\d{3}$", line)]
    assert len(rows) == 18 and rows[-1].startswith("control"), result.stdout  # 17 outputs and the control


def test_partial_rotary_factor_is_written_where_transformers_4_reads_it():
    """GLM-4-MoE from a Llama base rotates whole heads; transformers 4.x reads the top-level key (default 0.5)."""
    from moemerge.architectures import with_legacy_rope_keys

    parameters = {"rope_theta": 5e5, "rope_type": "default", "partial_rotary_factor": 1.0}
    config = with_legacy_rope_keys({"model_type": "glm4_moe", "rope_parameters": parameters})
    assert config["partial_rotary_factor"] == 1.0 and config["rope_theta"] == 5e5
    legacy_only = {key: value for key, value in config.items() if key != "rope_parameters"}
    assert AutoConfig.for_model(**legacy_only).rope_parameters["partial_rotary_factor"] == 1.0
    scaled = with_legacy_rope_keys({"rope_parameters": {**parameters, "rope_type": "linear", "factor": 2.0}})
    assert scaled["rope_scaling"] == {"type": "linear", "rope_type": "linear", "factor": 2.0}
