"""gate_mode fitted: logistic-regression router rows, fitted layer by layer on the MoE being built."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from moe_support import EXPERT_SEEDS, PROMPTS, expert_entry, mistral_recipe
from split_fixtures import read_tensors, run_split
from transformers import AutoModelForCausalLM

from moemerge.config.moe_recipe import parse_moe_recipe
from moemerge.errors import ConfigError
from moemerge.layerwise import moe_block
from moemerge.moe.fitted import (
    FIT_SUMMARY,
    batch_sequences,
    calibration_sequences,
    loss_labels,
    posterior_targets,
    routing_targets,
    shared_gate_labels,
)
from moemerge.moe.prompt_states import load_tokenizer
from moemerge.moe.router import fit_router_rows

pytest_plugins = ("moe_fixtures",)


def test_rows_fitted_on_separable_data_route_it_correctly():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 3
    labels = torch.randint(0, 3, (600,), generator=generator)
    states = centres[labels] + torch.randn(600, 16, generator=generator)
    rows, summary = fit_router_rows(states, labels, 3, groups=torch.arange(600) // 10)
    assert rows.shape == (3, 16) and summary["held_out_accuracy"] > 0.97
    fresh_labels = torch.randint(0, 3, (300,), generator=generator)
    fresh = centres[fresh_labels] + torch.randn(300, 16, generator=generator)
    assert ((fresh @ rows.T).argmax(dim=1) == fresh_labels).float().mean() > 0.97
    # the L2 strength is chosen on held-out sequences: the strongest one fits separable data worse
    by_l2 = summary["by_l2"]
    assert by_l2[summary["l2"]]["nll"] == min(entry["nll"] for entry in by_l2.values())


def test_fitted_recipes_need_calibration_text(tmp_path):
    recipe = {"base_model": "b", "gate_mode": "fitted", "experts_per_token": 1, "experts": [{"source_model": "e"}]}
    with pytest.raises(ConfigError, match=r"experts\[0\]: gate_mode 'fitted' needs positive_prompts or calib"):
        parse_moe_recipe(recipe)
    recipe["experts"][0]["calibration_files"] = [str(tmp_path / "code.txt")]
    assert parse_moe_recipe(recipe).experts[0].calibration_files == [str(tmp_path / "code.txt")]


def fitted_recipe(moe_models, tmp_path) -> dict:
    names = list(EXPERT_SEEDS)
    (tmp_path / "story.txt").write_text("Once upon a time the quick brown fox jumps over the lazy dog.\n" * 20)
    experts = [expert_entry(moe_models[name], PROMPTS[name]) for name in names]
    experts[2]["calibration_files"] = [str(tmp_path / "story.txt")]
    return mistral_recipe(moe_models, gate_mode="fitted", experts=experts)


@torch.no_grad()
def whole_model_reference(folder, recipe: dict) -> dict[int, torch.Tensor]:
    """The same fit with the whole MoE in memory: routers zeroed, then fitted in layer order."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(folder, False)
    texts = [
        list(e.get("positive_prompts", [])) + [open(f).read() for f in e.get("calibration_files", [])]
        for e in recipe["experts"]
    ]
    batches, labels, groups = batch_sequences(calibration_sequences(tokenizer, texts))
    flat_labels, flat_groups = torch.cat([t.reshape(-1) for t in labels]), torch.cat([g.reshape(-1) for g in groups])
    blocks = [moe_block(layer) for layer in model.model.layers]
    for block in blocks:
        block.gate.weight.zero_()
    rows = {}
    for layer, block in enumerate(blocks):
        states: list[torch.Tensor] = []
        handle = block.register_forward_pre_hook(lambda _m, args, states=states: states.append(args[0].reshape(-1, 64)))
        for batch in batches:
            model(input_ids=batch.input_ids, use_cache=False)
        handle.remove()
        rows[layer], _ = fit_router_rows(torch.cat(states), flat_labels, 3, groups=flat_groups)
        block.gate.weight.copy_(rows[layer])
    return rows


def test_layer_by_layer_fit_equals_the_whole_model_reference_and_splits_with_a_report(
    moe_models, moe_recipe_file, run_moe, tmp_path
):
    recipe = fitted_recipe(moe_models, tmp_path)
    out = tmp_path / "fitted-moe"
    result = run_moe(moe_recipe_file(recipe), out, "--quiet", "--fit-labels", "source")
    assert result.exit_code == 0, result.output
    stored = read_tensors(out)
    reference = whole_model_reference(out, recipe)
    for layer, rows in reference.items():
        written = stored[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert written.abs().sum() > 0
        torch.testing.assert_close(written, rows, rtol=1e-3, atol=1e-3)
    # the fitted router sends each expert's own prompts mostly to that expert in the last layer
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model(torch.tensor([[5, 17, 42]])).logits.isfinite().all()

    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(p for prompts in PROMPTS.values() for p in prompts) * 4)
    report = tmp_path / "usage.png"
    split = run_split(out, tmp_path / "pruned", "--calibration", calibration, "--prune-to", 2, "--report", report)
    assert split.exit_code == 0, split.output
    usage = json.loads(report.with_suffix(".json").read_text())
    assert len(usage["counts"]) == 4 and sum(usage["counts"][0]) == usage["tokens"] * 2
    assert yaml.safe_load((out / "moemerge_moe_config.yml").read_text())["gate_mode"] == "fitted"


def test_unreadable_calibration_file_fails_before_any_tensor_is_read(moe_models, moe_recipe_file, run_moe, tmp_path):
    recipe = fitted_recipe(moe_models, tmp_path)
    recipe["experts"][0]["calibration_files"] = [str(tmp_path / "missing.txt")]
    result = run_moe(moe_recipe_file(recipe), tmp_path / "out")
    assert result.exit_code == 1
    assert "experts[0].calibration_files: cannot read" in result.output and not (tmp_path / "out").exists()


def test_negative_text_is_routed_away_from_its_expert():
    # clusters 0 and 1 are experts 0 and 1's text; cluster 2 is expert 0's negative text (label ~0)
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 8, generator=generator) * 3
    clusters = torch.randint(0, 3, (300,), generator=generator)
    states = centres[clusters] + torch.randn(300, 8, generator=generator)
    labels = torch.where(clusters == 2, ~torch.tensor(0), clusters)
    for experts in (2, 3):
        targets = routing_targets(labels, experts)
        assert targets.shape == (300, experts) and torch.allclose(targets.sum(dim=1), torch.ones(300))
        rows, summary = fit_router_rows(states, targets, experts, groups=torch.arange(300) // 10)
        routed = (centres[2] + torch.randn(200, 8, generator=generator)) @ rows.T
        assert (routed.argmax(dim=1) != 0).float().mean() > 0.97  # never to expert 0
        assert summary["held_out_accuracy"] > 0.95
    assert routing_targets(labels, 2)[clusters == 2].tolist()[0] == [0.0, 1.0]
    assert routing_targets(labels, 3)[clusters == 2].tolist()[0] == [0.0, 0.5, 0.5]
    hard = torch.tensor([0, 1, 1])
    assert routing_targets(hard, 2) is hard  # only experts' own text: plain class indices
    assert routing_targets(torch.tensor([2]), 2).tolist() == [[0.5, 0.5]]  # the shared expert's text: no preference


def test_loss_labels_pick_the_best_allowed_expert_and_shared_gate_labels_compare_to_it():
    # one batch of one sequence, 4 tokens (3 with a next token); label ~0 forbids expert 0
    first, second = torch.tensor([[1.0, 3.0, 1.0]]), torch.tensor([[2.0, 2.0, 5.0]])
    losses = [[first, first], [second, second]]  # per expert model, per batch (two batches, same text)
    source = [torch.tensor([[0, 0, 0, 0]]), torch.tensor([[~0, ~0, ~0, ~0]])]
    labels = loss_labels(losses, source)
    assert labels[0].tolist() == [[0, 1, 0, 0]]  # argmin per token, last token keeps its source label
    assert labels[1].tolist() == [[1, 1, 1, ~0]]  # expert 0 never, whatever its loss
    shared = [torch.tensor([[1.5, 1.0, 0.5]]), torch.tensor([[9.0, 9.0, 9.0]])]
    gate = shared_gate_labels(2, [torch.tensor([[0, 0, 0, 2]]), torch.tensor([[2, 2, 2, 2]])], shared, losses)
    assert gate[0].tolist() == [[0, 1, 1, 1]] and gate[1].tolist() == [[0, 0, 0, 1]]
    by_text = shared_gate_labels(2, [torch.tensor([[0, 2, 2]])])
    assert by_text[0].tolist() == [[0, 1, 1]]


def qwen2_fitted_recipe(moe_models, shared: dict) -> dict:
    return {
        "base_model": str(moe_models["qwen2"]),
        "gate_mode": "fitted",
        "dtype": "float32",
        "experts_per_token": 1,
        "experts": [
            expert_entry(moe_models["qwen2_ft1"], PROMPTS["coder"], negative_prompts=PROMPTS["story"]),
            expert_entry(moe_models["qwen2_ft2"], PROMPTS["story"]),
        ],
        "shared_experts": [expert_entry(moe_models["qwen2"], **shared)],
    }


def test_shared_expert_gate_is_fitted_to_open_on_its_own_text(moe_models, moe_recipe_file, run_moe, tmp_path):
    shared_text = PROMPTS["math"] * 3
    recipe = qwen2_fitted_recipe(moe_models, {"positive_prompts": shared_text})
    out = tmp_path / "qwen2-fitted"
    result = run_moe(moe_recipe_file(recipe), out, "--quiet", "--fit-labels", "source")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / FIT_SUMMARY).read_text())
    assert summary["shared_gate"] == "fitted" and set(summary["layers"]) == {"0", "1", "2", "3"}
    stored = read_tensors(out)
    assert all(stored[f"model.layers.{layer}.mlp.shared_expert_gate.weight"].abs().sum() > 0 for layer in range(4))
    # a fitted gate weighs the shared expert itself: its down projection is the base's, not doubled
    base_down = read_tensors(moe_models["qwen2"])["model.layers.0.mlp.down_proj.weight"]
    torch.testing.assert_close(stored["model.layers.0.mlp.shared_expert.down_proj.weight"], base_down)
    # the gate opens more on the shared expert's text than on the routed experts' text, in every layer
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(out, False)
    openings: list[torch.Tensor] = []
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda m, args: openings.append(torch.sigmoid(m.shared_expert_gate(args[0])).mean())
        )
        for layer in model.model.layers
    ]
    mean_opening = {}
    with torch.no_grad():
        for kind, prompts in (("shared", PROMPTS["math"]), ("routed", PROMPTS["coder"] + PROMPTS["story"])):
            openings.clear()
            for prompt in prompts:
                model(**tokenizer(prompt, return_tensors="pt"))
            mean_opening[kind] = torch.stack(openings).mean()
    for hook in hooks:
        hook.remove()
    assert mean_opening["shared"] > mean_opening["routed"] + 0.1, mean_opening


def test_shared_expert_gate_without_text_stays_zero_with_source_labels(moe_models, moe_recipe_file, run_moe, tmp_path):
    out = tmp_path / "qwen2-fitted-no-shared-text"
    result = run_moe(moe_recipe_file(qwen2_fitted_recipe(moe_models, {})), out, "--quiet", "--fit-labels", "source")
    assert result.exit_code == 0, result.output
    stored = read_tensors(out)
    assert all(stored[f"model.layers.{layer}.mlp.shared_expert_gate.weight"].abs().sum() == 0 for layer in range(4))
    assert all(stored[f"model.layers.{layer}.mlp.gate.weight"].abs().sum() > 0 for layer in range(4))
    assert json.loads((out / FIT_SUMMARY).read_text())["shared_gate"] == "not fitted"


def test_posterior_targets_are_each_experts_share_of_the_tokens_probability():
    first, second = torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([[3.0, 1.0, 2.0]])
    losses = [[first, first], [second, second]]
    source = [torch.tensor([[0, 0, 0, 1]]), torch.tensor([[~1, ~1, ~1, ~1]])]
    targets = posterior_targets(losses, source)
    share = 1 / (1 + torch.exp(torch.tensor(-2.0)))  # e^-1 / (e^-1 + e^-3)
    expected = torch.tensor([[[share, 1 - share], [1 - share, share], [0.5, 0.5], [0.0, 1.0]]])
    torch.testing.assert_close(targets[0], expected)
    assert targets[1].tolist() == [[[1.0, 0.0]] * 4]  # expert 1's negative text: never expert 1
    windowed = posterior_targets(losses, source, window=2)[0]  # losses summed over 2 tokens: 4 vs 4 at token 1
    torch.testing.assert_close(windowed[0, :3], torch.tensor([[share, 1 - share], [0.5, 0.5], [1 - share, share]]))


def test_posterior_labels_are_the_default_and_take_a_window(moe_models, moe_recipe_file, run_moe, tmp_path):
    recipe = mistral_recipe(
        moe_models,
        gate_mode="fitted",
        experts=[expert_entry(moe_models[name], PROMPTS[name]) for name in ("coder", "story")],
    )
    out = tmp_path / "posterior"
    result = run_moe(moe_recipe_file(recipe), out, "--quiet", "--fit-window", "4")  # no --fit-labels: posterior
    assert result.exit_code == 0, result.output
    summary = json.loads((out / FIT_SUMMARY).read_text())
    assert summary["labels"] == "posterior" and summary["window"] == 4
    assert 0.0 < summary["label_share"][0] < 1.0 and sum(summary["label_share"]) == pytest.approx(1.0)
    stored = read_tensors(out)
    assert all(stored[f"model.layers.{layer}.block_sparse_moe.gate.weight"].abs().sum() > 0 for layer in range(4))
