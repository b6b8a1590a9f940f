"""End to end through `moemerge-split` on generated Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE models."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from split_fixtures import W, generates, load, read_tensors, run_split

DENSE_MLP = "model.layers.{layer}.mlp.{proj}.weight"
QWEN_EXPERT = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
QWEN_SHARED = "model.layers.{layer}.mlp.shared_expert.{proj}.weight"


def recipe(folder) -> dict:
    return yaml.safe_load((folder / "moemerge_split_config.yml").read_text())


def ok(result) -> None:
    assert result.exit_code == 0, result.output


def test_expert_n_is_expert_n_bit_for_bit(split_models, tmp_path):
    source = read_tensors(split_models["mixtral"])
    ok(run_split(split_models["mixtral"], tmp_path / "out", "--expert", 2))
    out = tmp_path / "out"
    tensors = read_tensors(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert config["intermediate_size"] == 128
    assert not {"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef"} & set(config)
    for layer in range(4):
        for proj, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            assert torch.equal(
                tensors.pop(DENSE_MLP.format(layer=layer, proj=proj)), source[W.format(layer=layer, expert=2, w=w)]
            )
    for name, tensor in tensors.items():  # everything else is the MoE's own attention, norms, embeddings, lm_head
        assert torch.equal(tensor, source[name]), name
    assert not any("block_sparse_moe" in name for name in tensors)
    assert recipe(out)["layers"][0] == {"experts": [2], "scales": [1.0]}
    assert "gibberish" in (out / "README.md").read_text()
    generates(out)


def test_fused_input_gives_the_same_outputs(split_models, tmp_path):
    for name in ("mixtral", "mixtral_fused"):
        ok(run_split(split_models[name], tmp_path / f"{name}-expert", "--expert", 3))
        ok(run_split(split_models[name], tmp_path / f"{name}-prune", "--prune-to", 2,
                     "--calibration", split_models["calibration"], "--score", "frequency"))  # fmt: skip
    for mode in ("expert", "prune"):
        per_expert, fused = read_tensors(tmp_path / f"mixtral-{mode}"), read_tensors(tmp_path / f"mixtral_fused-{mode}")
        assert per_expert.keys() == fused.keys()
        assert all(torch.equal(per_expert[name], fused[name]) for name in per_expert)
    assert recipe(tmp_path / "mixtral-prune")["layers"] == recipe(tmp_path / "mixtral_fused-prune")["layers"]


def test_all_experts_writes_one_complete_model_each(split_models, tmp_path):
    ok(run_split(split_models["mixtral"], tmp_path / "all", "--all-experts"))
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [f"expert-0{e}" for e in range(4)]
    ok(run_split(split_models["mixtral"], tmp_path / "one", "--expert", 1))
    one, from_all = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "all" / "expert-01")
    assert one.keys() == from_all.keys() and all(torch.equal(one[n], from_all[n]) for n in one)
    for expert in range(4):
        folder = tmp_path / "all" / f"expert-0{expert}"
        assert {"config.json", "tokenizer.json", "README.md", "moemerge_split_config.yml"} <= {
            p.name for p in folder.iterdir()
        }
    generates(tmp_path / "all" / "expert-03")


def test_average_is_the_mean_of_expert_weights(split_models, tmp_path):
    source = read_tensors(split_models["mixtral"])
    ok(run_split(split_models["mixtral"], tmp_path / "avg", "--average"))
    tensors = read_tensors(tmp_path / "avg")
    for proj, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        expected = torch.stack([source[W.format(layer=1, expert=e, w=w)] for e in range(4)]).mean(dim=0)
        torch.testing.assert_close(tensors[DENSE_MLP.format(layer=1, proj=proj)], expected, rtol=1e-6, atol=1e-7)
    generates(tmp_path / "avg")


def test_qwen2_moe_expert_carries_the_shared_expert(split_models, tmp_path):
    source = read_tensors(split_models["qwen2_moe"])
    ok(run_split(split_models["qwen2_moe"], tmp_path / "out", "--expert", 1))
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["intermediate_size"] == 32 + 48
    assert not {"num_experts", "moe_intermediate_size", "shared_expert_intermediate_size"} & set(config)
    tensors = read_tensors(out)
    for proj in ("gate_proj", "up_proj"):
        expected = torch.cat([source[QWEN_EXPERT.format(layer=2, expert=1, proj=proj)],
                              source[QWEN_SHARED.format(layer=2, proj=proj)]])  # fmt: skip
        assert torch.equal(tensors[DENSE_MLP.format(layer=2, proj=proj)], expected)
    down = torch.cat([source[QWEN_EXPERT.format(layer=2, expert=1, proj="down_proj")],
                      source[QWEN_SHARED.format(layer=2, proj="down_proj")]], dim=1)  # fmt: skip
    assert torch.equal(tensors[DENSE_MLP.format(layer=2, proj="down_proj")], down)  # shared gate stands in as 1.0
    assert torch.equal(tensors["model.layers.2.self_attn.q_proj.bias"], source["model.layers.2.self_attn.q_proj.bias"])
    generates(out)


def test_concat_all_experts_with_uniform_routing_equals_the_moe(split_models, tmp_path):
    """Router all zeros and top-4 of 4: the MoE outputs the mean of its experts; concat:4 must be that MLP."""
    model = split_models["mixtral_uniform"]
    ok(run_split(model, tmp_path / "concat", "--select", "concat:4", "--calibration", split_models["calibration"]))
    layers = recipe(tmp_path / "concat")["layers"]
    assert all(sorted(layer["experts"]) == [0, 1, 2, 3] for layer in layers.values())
    assert all(scale == pytest.approx(0.25) for layer in layers.values() for scale in layer["scales"])
    assert json.loads((tmp_path / "concat" / "config.json").read_text())["intermediate_size"] == 4 * 128
    input_ids = torch.tensor([[3, 50, 120, 7, 301, 44, 9, 200]])
    with torch.no_grad():
        expected = load(model)(input_ids).logits
        actual = load(tmp_path / "concat")(input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    generates(tmp_path / "concat")


def test_top_usage_picks_the_most_routed_expert(split_models, tmp_path):
    ok(run_split(split_models["mixtral"], tmp_path / "top", "--select", "top-usage",
                 "--calibration", split_models["calibration"], "--report", tmp_path / "usage.png"))  # fmt: skip
    counts = json.loads((tmp_path / "usage.json").read_text())["counts"]
    layers = recipe(tmp_path / "top")["layers"]
    for layer, described in layers.items():
        assert described["experts"] == [max(range(4), key=lambda e: (counts[layer][e], -e))]
    assert (tmp_path / "usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    generates(tmp_path / "top")


def test_qwen_dense_modes_load_and_generate(split_models, tmp_path):
    calibration = split_models["calibration"]
    ok(run_split(split_models["qwen2_moe"], tmp_path / "q2", "--select", "concat:2", "--calibration", calibration))
    layers = recipe(tmp_path / "q2")["layers"]
    assert all(0.0 < layer["shared_expert_scale"] < 1.0 for layer in layers.values())  # calibration mean of a sigmoid
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["intermediate_size"] == 2 * 32 + 48
    generates(tmp_path / "q2")
    ok(run_split(split_models["qwen3_moe"], tmp_path / "q3", "--select", "top-usage", "--calibration", calibration))
    assert json.loads((tmp_path / "q3" / "config.json").read_text())["model_type"] == "qwen3"
    generates(tmp_path / "q3")


def _top_k_experts(model, input_ids: torch.Tensor, top_k: int) -> list[torch.Tensor]:
    with torch.no_grad():
        router_logits = model(input_ids, output_router_logits=True).router_logits
    return [logits.topk(top_k, dim=-1).indices for logits in router_logits]


@pytest.mark.parametrize(("name", "count_key"), [("mixtral", "num_local_experts"), ("qwen2_moe", "num_experts")])
def test_prune_keeps_logits_of_tokens_whose_experts_survive(split_models, tmp_path, name, count_key):
    """Each vocabulary token alone (so attention mixes nothing in): same logits iff its top-2 survive in every layer."""
    ok(run_split(split_models[name], tmp_path / "pruned", "--prune-to", 3, "--calibration", split_models["calibration"],
                 "--score", "frequency"))  # fmt: skip
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config[count_key] == 3 and config["num_experts_per_tok"] == 2
    kept = {int(layer): described["kept_experts"] for layer, described in recipe(tmp_path / "pruned")["layers"].items()}
    original, pruned = load(split_models[name]), load(tmp_path / "pruned")
    input_ids = torch.arange(384).reshape(-1, 1)
    survives = torch.ones(384, dtype=torch.bool)
    for layer, top in enumerate(_top_k_experts(original, input_ids, 2)):
        survives &= torch.isin(top, torch.tensor(kept[layer])).all(dim=-1)
    with torch.no_grad():
        before, after = original(input_ids).logits[:, -1], pruned(input_ids).logits[:, -1]
    assert 0 < survives.sum() < 384  # both kinds present, so the check below can fail
    torch.testing.assert_close(after[survives], before[survives], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after[~survives], before[~survives], atol=1e-4)
    source, tensors = read_tensors(split_models[name]), read_tensors(tmp_path / "pruned")
    router = "model.layers.1.block_sparse_moe.gate.weight" if name == "mixtral" else "model.layers.1.mlp.gate.weight"
    assert torch.equal(tensors[router], source[router][kept[1]])
    generates(tmp_path / "pruned")


@pytest.mark.parametrize("score", ["reap", "frequency"])
def test_never_routed_expert_is_pruned_first(split_models, tmp_path, score):
    ok(run_split(split_models["mixtral_dead"], tmp_path / "pruned", "--prune-to", 3, "--score", score,
                 "--calibration", split_models["calibration"], "--report", tmp_path / "usage.png"))  # fmt: skip
    usage = json.loads((tmp_path / "usage.json").read_text())
    assert all(counts[3] == 0 and sum(counts[:3]) > 0 for counts in usage["counts"])
    assert all(d["kept_experts"] == [0, 1, 2] for d in recipe(tmp_path / "pruned")["layers"].values())
    source, tensors = read_tensors(split_models["mixtral_dead"]), read_tensors(tmp_path / "pruned")
    assert torch.equal(tensors[W.format(layer=0, expert=2, w="w2")], source[W.format(layer=0, expert=2, w="w2")])
    assert not any(".experts.3." in name for name in tensors)
    input_ids = torch.tensor([[3, 50, 120, 7, 301, 44]])
    with torch.no_grad():  # expert 3 never wins a top-1 choice, so removing it changes nothing
        torch.testing.assert_close(
            load(tmp_path / "pruned")(input_ids).logits, load(split_models["mixtral_dead"])(input_ids).logits
        )


def test_olmoe_prunes_but_has_no_dense_twin(split_models, tmp_path):
    result = run_split(split_models["olmoe"], tmp_path / "dense", "--expert", 0)
    assert result.exit_code == 1 and "'olmoe' has no dense counterpart" in result.output
    ok(
        run_split(
            split_models["olmoe"], tmp_path / "pruned", "--prune-to", 2, "--calibration", split_models["calibration"]
        )
    )
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["num_experts"] == 2
    generates(tmp_path / "pruned")


def test_dry_run_writes_nothing(split_models, tmp_path):
    result = run_split(split_models["mixtral"], tmp_path / "out", "--expert", 0, "--dry-run")
    ok(result)
    assert "mistral, 39 tensors" in result.output and not (tmp_path / "out").exists()
