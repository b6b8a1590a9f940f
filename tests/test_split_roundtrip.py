"""Round trip: a frankenMoE built by moemerge-moe from dense models that share the base's attention, split
with --expert e, gives back expert e's source model tensor for tensor, bit-identical."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from split_fixtures import read_tensors, rewrite_tensors, run_split

from moemerge.toys import make_toy_model


def _mlp_only_finetune(base, folder, seed: int):
    """A copy of the base whose MLP weights (only) moved: it shares the base's attention, norms and embeddings."""
    shutil.copytree(base, folder)
    generator = torch.Generator().manual_seed(seed)

    def move_mlp(tensors):
        for name, tensor in tensors.items():
            if ".mlp." in name:
                tensors[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        return tensors

    rewrite_tensors(folder, move_mlp)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frankenmoe_split_gives_back_each_expert(tmp_path, dtype):
    from moemerge.cli.moe_command import main as moe_main

    name = str(dtype).removeprefix("torch.")
    base = make_toy_model(tmp_path / "base", "mistral", seed=60, dtype=dtype)
    experts = [_mlp_only_finetune(base, tmp_path / f"expert{e}", seed=61 + e) for e in range(3)]
    recipe = {
        "base_model": str(base),
        "gate_mode": "random",
        "dtype": name,
        "experts_per_token": 2,
        "experts": [{"source_model": str(folder)} for folder in experts],
    }
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(moe_main, [str(tmp_path / "moe.yml"), str(tmp_path / "moe"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["model_type"] == "mixtral"

    result = run_split(tmp_path / "moe", tmp_path / "split", "--all-experts")
    assert result.exit_code == 0, result.output
    for e, source_folder in enumerate(experts):
        source, back = read_tensors(source_folder), read_tensors(tmp_path / "split" / f"expert-0{e}")
        assert back.keys() == source.keys()
        for tensor_name, tensor in source.items():
            assert back[tensor_name].dtype == tensor.dtype and torch.equal(back[tensor_name], tensor), tensor_name
        config = json.loads((tmp_path / "split" / f"expert-0{e}" / "config.json").read_text())
        source_config = json.loads((source_folder / "config.json").read_text())
        for key in ("model_type", "architectures", "intermediate_size", "hidden_size", "num_hidden_layers"):
            assert config[key] == source_config[key], key
