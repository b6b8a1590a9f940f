"""`moemerge-lora extract`: a PEFT adapter of a fine-tune's difference from its base, checked with peft."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import read_tensors

from moemerge.cli.lora_command import main
from moemerge.io.loader import LazyModel

PROMPT_IDS = torch.tensor([[5, 17, 42, 99, 150, 7, 201, 33]])


def run_extract(*args: object):
    return CliRunner().invoke(main, ["extract", *(str(a) for a in args)], catch_exceptions=False)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT_IDS).logits


def adapted_logits(base, adapter) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return logits(PeftModel.from_pretrained(model, adapter).eval())


@pytest.fixture(scope="module")
def finetune_logits(toy_models) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(toy_models["coder"], dtype=torch.float32))


def test_peft_loads_the_adapter_and_logit_error_falls_with_rank(toy_models, finetune_logits, tmp_path):
    errors = []
    for rank in (2, 16, 64):  # 64 = the toy's hidden size: full rank, exact
        out = tmp_path / f"rank{rank}"
        result = run_extract(
            toy_models["coder"], toy_models["base"], out, "--rank", rank, "--save-embeddings", "--quiet"
        )
        assert result.exit_code == 0, result.output
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == rank and config["lora_alpha"] == rank
        got = adapted_logits(toy_models["base"], out)
        errors.append(float((got - finetune_logits).norm() / finetune_logits.norm()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-4, errors


def test_full_rank_adapter_read_back_as_base_plus_lora_is_the_finetune(toy_models, tmp_path):
    out = tmp_path / "adapter"
    assert run_extract(toy_models["coder"], toy_models["base"], out, "--rank", 64, "--quiet").exit_code == 0
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == []  # a local base is no hub id (as mergekit)
    adapted = LazyModel.open(f"{toy_models['base']}+{out}")
    finetune = read_tensors(toy_models["coder"])
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"):
        torch.testing.assert_close(adapted.read(name), finetune[name], rtol=1e-4, atol=1e-5)
    norm = "model.layers.1.input_layernorm.weight"  # changed norms are saved whole by default
    torch.testing.assert_close(adapted.read(norm), finetune[norm])


def test_energy_picks_the_fewest_singular_values_per_tensor(toy_models, tmp_path):
    out = tmp_path / "adapter"
    result = run_extract(toy_models["coder"], toy_models["base"], out, "--energy", 0.9, "--quiet")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    base, finetune = read_tensors(toy_models["base"]), read_tensors(toy_models["coder"])
    ranks = {}
    for module in ("model.layers.0.self_attn.k_proj", "model.layers.2.mlp.up_proj", "model.layers.3.self_attn.o_proj"):
        delta = finetune[module + ".weight"] - base[module + ".weight"]
        energy = torch.linalg.svdvals(delta.double()).square()
        share = energy.cumsum(0) / energy.sum()
        expected = int((share < 0.9).sum()) + 1  # the first k whose share reaches 0.9
        ranks[module] = config["rank_pattern"].get(module, config["r"])
        assert ranks[module] == expected, (module, ranks[module], expected)
        assert config["alpha_pattern"].get(module, config["lora_alpha"]) == ranks[module]  # scale 1
    assert len(set(ranks.values())) > 1  # ranks differ per tensor (k_proj is narrower)
    adapted_logits(toy_models["base"], out)  # peft accepts the rank pattern


def test_embeddings_are_left_out_unless_asked(toy_models, tmp_path):
    out = tmp_path / "plain"
    result = run_extract(toy_models["coder"], toy_models["base"], out, "--rank", 4)
    assert result.exit_code == 0 and "not in the adapter" in result.stderr
    keys = set(read_tensors(out))
    assert not any("embed_tokens" in key or "lm_head" in key for key in keys)
    out = tmp_path / "embed-lora"
    assert (
        run_extract(toy_models["coder"], toy_models["base"], out, "--rank", 4, "--embed-lora", "--quiet").exit_code == 0
    )
    keys = read_tensors(out)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 384)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (64, 4)
    assert "base_model.model.lm_head.lora_A.weight" in keys
    adapted_logits(toy_models["base"], out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", 4, "--save-embeddings", "--embed-lora"], "exclude each other"),
        (["--rank", 4, "--exclude-regex", "("], "regex '('"),
    ],
)
def test_bad_options_fail_in_one_line(toy_models, tmp_path, args, message):
    result = run_extract(toy_models["coder"], toy_models["base"], tmp_path / "out", *args)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_mismatched_models_and_busy_output_fail_in_one_line(toy_models, tmp_path):
    result = run_extract(toy_models["big_vocab"], toy_models["base"], tmp_path / "out", "--rank", 4)
    assert result.exit_code == 1 and "resized vocabulary" in result.stderr and result.stderr.count("\n") == 1
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("keep")
    result = run_extract(toy_models["coder"], toy_models["base"], tmp_path / "busy", "--rank", 4)
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    assert (tmp_path / "busy" / "file").read_text() == "keep"
