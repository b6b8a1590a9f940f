"""moemerge-split on GPT-OSS: experts stored only fused (gate_up [E, H, 2I] with gate and up columns interleaved,
down [E, I, H], per-expert biases) and a biased router (top-k of the logits, softmax over those k)."""

from __future__ import annotations

import json

import torch
import yaml
from safetensors.torch import save_file
from split_fixtures import generates, load, read_tensors, run_split

from moemerge.io.loader import LazyModel
from moemerge.split.experts import MoeSource

LAYER = "model.layers.{layer}.mlp."
FUSED = ("experts.gate_up_proj", "experts.gate_up_proj_bias", "experts.down_proj", "experts.down_proj_bias")


def test_expert_parts_deinterleave_the_fused_tensors(split_models):
    source = MoeSource(LazyModel.open(str(split_models["gpt_oss"])))
    stored = read_tensors(split_models["gpt_oss"])
    gate_up = stored["model.layers.2.mlp.experts.gate_up_proj"][3]
    down = stored["model.layers.2.mlp.experts.down_proj"][3]
    assert source.fused_only and source.num_experts == 4 and source.intermediate_size == 24
    assert torch.equal(source.expert_part(2, 3, "gate"), gate_up[:, 0::2].T)  # [I, H] like every other family
    assert torch.equal(source.expert_part(2, 3, "up"), gate_up[:, 1::2].T)
    assert torch.equal(source.expert_part(2, 3, "down"), down.T)
    assert source.part_shape(2, "gate") == (24, 64) and source.part_shape(2, "down") == (64, 24)


def test_pruned_gpt_oss_is_the_original_with_the_dropped_experts_never_chosen(split_models, tmp_path):
    """GPT-OSS takes the top-k logits and a softmax over those k alone, so the pruned model must equal the original
    whose router bias is -inf for the dropped experts, on every token (not only those whose experts survive)."""
    out, report = tmp_path / "pruned", tmp_path / "usage.png"
    result = run_split(split_models["gpt_oss"], out, "--prune-to", 3, "--calibration", split_models["calibration"],
                       "--report", report)  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 2
    layers = yaml.safe_load((out / "moemerge_split_config.yml").read_text())["layers"]
    kept = {int(layer): described["kept_experts"] for layer, described in layers.items()}
    assert sorted(kept) == [0, 1, 2, 3] and all(len(experts) == 3 for experts in kept.values())
    usage = json.loads(report.with_suffix(".json").read_text())
    assert usage["tokens"] > 0 and len(usage["counts"][0]) == 4
    usage_file = report.with_suffix(".json")
    plan = run_split(
        split_models["gpt_oss"], tmp_path / "plan", "--prune-to", 3, "--usage", usage_file, "--dry-run", "-v"
    )
    assert plan.exit_code == 0, plan.output
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" in plan.output and "slice of experts" in plan.output

    source, tensors = read_tensors(split_models["gpt_oss"]), read_tensors(out)
    assert not any(".experts.0." in name for name in tensors)  # no per-expert layout exists for GPT-OSS
    for layer, experts in kept.items():
        for suffix in (*FUSED, "router.weight", "router.bias"):
            name = LAYER.format(layer=layer) + suffix
            assert torch.equal(tensors[name], source[name][experts]), name

    pruned, original = load(out), load(split_models["gpt_oss"])
    with torch.no_grad():
        for layer, decoder_layer in enumerate(original.model.layers):
            dropped = [expert for expert in range(4) if expert not in kept[layer]]
            decoder_layer.mlp.router.bias[dropped] = float("-inf")
        input_ids = torch.tensor([[5, 17, 42, 99, 7, 8, 9, 10, 11, 12, 13, 14]])  # longer than the sliding window
        reference, logits = original(input_ids).logits, pruned(input_ids).logits
        unpruned = load(split_models["gpt_oss"])(input_ids).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, unpruned, atol=1e-3)  # dropping experts did change the model
    generates(out)


def test_dense_extraction_is_refused_in_one_line(split_models, tmp_path):
    for mode in (["--expert", "0"], ["--average"]):
        result = run_split(split_models["gpt_oss"], tmp_path / "dense", *mode)
        assert result.exit_code == 1
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "'gpt_oss' has no dense counterpart" in errors[0], result.output
        assert not (tmp_path / "dense").exists()


def test_mxfp4_experts_are_refused_in_one_line(split_models, tmp_path):
    """Hub GPT-OSS checkpoints store experts as MXFP4 blocks and scales: say so instead of a missing-tensor error."""
    folder = tmp_path / "mxfp4"
    folder.mkdir()
    stored = read_tensors(split_models["gpt_oss"])
    for name in [name for name in stored if name.endswith(("gate_up_proj", "down_proj"))]:
        experts, rows = stored[name].shape[:2]
        stored[name + "_blocks"] = torch.zeros(experts, rows, 2, 16, dtype=torch.uint8)
        stored[name + "_scales"] = torch.zeros(experts, rows, 2, dtype=torch.uint8)
        del stored[name]
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text((split_models["gpt_oss"] / "config.json").read_text())
    result = run_split(folder, tmp_path / "out", "--prune-to", 2, "--usage", tmp_path / "absent.json")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "MXFP4" in errors[0], result.output
