"""End to end through `moemerge-moe` on generated models: logits, routing, loading, determinism, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_tensors
from moe_support import EXPERT_SEEDS, PROMPTS, dense_logits, expert_entry, mistral_recipe, moe_logits
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest_plugins = ("moe_fixtures",)

INPUT_IDS = torch.tensor([[5, 40, 77, 120, 9, 300, 18, 64]])
ROUTER = "model.layers.{}.block_sparse_moe.gate.weight"


def assemble(run_moe, moe_recipe_file, recipe: dict, out, *args: object) -> None:
    result = run_moe(moe_recipe_file(recipe), out, "--quiet", *args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("architecture", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_experts_all_equal_to_base_give_base_logits(moe_models, moe_recipe_file, run_moe, tmp_path, architecture):
    """Renormalised top-k weights sum to 1, so any routing over identical experts is the base MLP."""
    base = moe_models[{"mixtral": "mistral", "qwen3_moe": "qwen3", "qwen2_moe": "qwen2"}[architecture]]
    recipe = {"base_model": str(base), "gate_mode": "random", "experts_per_token": 2, "dtype": "float32"}
    if architecture == "qwen2_moe":
        # routed experts at half strength + shared expert at half strength (its constant gate weighs 1) = the base
        recipe["experts"] = [expert_entry(base, residual_scale=0.5) for _ in range(3)]
        recipe["shared_experts"] = [expert_entry(base, residual_scale=0.5)]
        recipe["norm_topk_prob"] = True  # Qwen2-MoE's default is false (as its checkpoints): ask for renormalising
    else:
        recipe["experts"] = [expert_entry(base) for _ in range(3)]
    out = tmp_path / "same"
    assemble(run_moe, moe_recipe_file, recipe, out)
    assert json.loads((out / "config.json").read_text())["model_type"] == architecture
    torch.testing.assert_close(moe_logits(out, INPUT_IDS), dense_logits(base, INPUT_IDS), rtol=1e-4, atol=1e-4)
    if architecture == "qwen2_moe":  # without renormalising, the routed half no longer sums to the base MLP's half
        recipe.pop("norm_topk_prob")
        assemble(run_moe, moe_recipe_file, recipe, tmp_path / "unnormalised")
        assert json.loads((tmp_path / "unnormalised" / "config.json").read_text())["norm_topk_prob"] is False
        assert not torch.allclose(moe_logits(tmp_path / "unnormalised", INPUT_IDS), dense_logits(base, INPUT_IDS))


def force_expert(model, expert: int) -> None:
    """Replace every router with one that sends each token to `expert` with weight 1."""
    for layer in model.model.layers:
        block = layer.block_sparse_moe if hasattr(layer, "block_sparse_moe") else layer.mlp
        experts = block.gate.weight.shape[0]

        def forward(hidden, experts=experts):
            tokens = hidden.reshape(-1, hidden.shape[-1]).shape[0]
            logits = torch.zeros(tokens, experts)
            return logits, torch.ones(tokens, 1), torch.full((tokens, 1), expert, dtype=torch.long)

        block.gate.forward = forward


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_router_forced_to_expert_gives_that_experts_dense_logits(
    moe_models, moe_recipe_file, run_moe, tmp_path, family
):
    names = list(EXPERT_SEEDS) if family == "mistral" else ["qwen3_ft1", "qwen3_ft2"]
    recipe = {
        "base_model": str(moe_models[family]),
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [expert_entry(moe_models[name]) for name in names],
    }
    out = tmp_path / "moe"
    assemble(run_moe, moe_recipe_file, recipe, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    logits_per_expert = []
    for index, name in enumerate(names):
        force_expert(model, index)
        with torch.no_grad():
            logits = model(INPUT_IDS).logits
        expected = dense_logits(moe_models[family], INPUT_IDS, mlp_from=moe_models[name])
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        logits_per_expert.append(logits)
    assert not torch.allclose(logits_per_expert[0], logits_per_expert[1], atol=1e-2)  # the experts really differ


def test_hidden_routing_sends_each_experts_prompts_to_it(moe_models, moe_recipe_file, run_moe, tmp_path):
    out = tmp_path / "hidden"
    assemble(run_moe, moe_recipe_file, mistral_recipe(moe_models), out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for expert, name in enumerate(EXPERT_SEEDS):
        for prompt in PROMPTS[name]:
            with torch.no_grad():
                output = model(**tokenizer(prompt, return_tensors="pt"), output_router_logits=True)
            top1 = [int(layer_logits[-1].argmax()) for layer_logits in output.router_logits]
            assert sum(choice == expert for choice in top1) >= 3, (name, prompt, top1)


def test_hidden_router_rows_match_per_prompt_hidden_states(moe_models, moe_recipe_file, run_moe, tmp_path):
    """Rows equal normalise(mean last-token state of positives - of negatives), each prompt run unpadded with BOS
    prepended and no other special tokens (as mergekit-moe tokenizes)."""
    recipe = mistral_recipe(moe_models, experts_per_token=1)
    recipe["experts"] = recipe["experts"][:2]
    recipe["experts"][1]["negative_prompts"] = PROMPTS["story"]
    out = tmp_path / "rows"
    assemble(run_moe, moe_recipe_file, recipe, out)
    base = AutoModelForCausalLM.from_pretrained(moe_models["mistral"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(moe_models["mistral"])

    def mean_state(prompts: list[str], layer: int) -> torch.Tensor:
        states = []
        for prompt in prompts:
            with torch.no_grad():
                ids = tokenizer("<s>" + prompt, return_tensors="pt", add_special_tokens=False)
                hidden = base(**ids, output_hidden_states=True).hidden_states
            states.append(hidden[layer][0, -1])
        return torch.stack(states).mean(dim=0)

    tensors = read_tensors(out)
    for layer in range(4):
        coder = mean_state(PROMPTS["coder"], layer)
        math = mean_state(PROMPTS["math"], layer) - mean_state(PROMPTS["story"], layer)
        expected = torch.stack([coder / coder.norm(), math / math.norm()])
        torch.testing.assert_close(tensors[ROUTER.format(layer)], expected, rtol=1e-4, atol=1e-5)


def test_cheap_embed_rows_are_normalised_embedding_sums_in_every_layer(moe_models, moe_recipe_file, run_moe, tmp_path):
    recipe = mistral_recipe(moe_models, gate_mode="cheap_embed")
    out = tmp_path / "cheap"
    assemble(run_moe, moe_recipe_file, recipe, out)
    tensors = read_tensors(out)
    embeddings = read_tensors(moe_models["mistral"])["model.embed_tokens.weight"]
    tokenizer = AutoTokenizer.from_pretrained(moe_models["mistral"])
    rows = []
    for name in EXPERT_SEEDS:
        ids = [tokenizer("<s>" + prompt, add_special_tokens=False)["input_ids"] for prompt in PROMPTS[name]]
        assert all(prompt_ids[0] == tokenizer.bos_token_id for prompt_ids in ids)
        total = sum(embeddings[prompt_ids].sum(dim=0) for prompt_ids in ids)
        rows.append(total / total.norm())
    for layer in range(4):
        torch.testing.assert_close(tensors[ROUTER.format(layer)], torch.stack(rows), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_outputs_load_with_auto_classes_and_generate(moe_models, moe_recipe_file, run_moe, tmp_path, family):
    if family == "mistral":
        recipe = mistral_recipe(moe_models, dtype="bfloat16")
    else:
        recipe = {
            "base_model": str(moe_models[family]),
            "gate_mode": "hidden",
            "experts": [
                expert_entry(moe_models[f"{family}_ft1"], PROMPTS["coder"]),
                expert_entry(moe_models[f"{family}_ft2"], PROMPTS["story"]),
            ],
        }
        if family == "qwen2":
            recipe["shared_experts"] = [expert_entry(moe_models["qwen2"], PROMPTS["math"])]
    out = tmp_path / "generate"
    assemble(run_moe, moe_recipe_file, recipe, out)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer("Once upon a time", return_tensors="pt")
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 5
    assert (out / "moemerge_moe_config.yml").is_file() and (out / "README.md").is_file()
    if family == "qwen2":
        gate = read_tensors(out)["model.layers.0.mlp.shared_expert_gate.weight"]
        assert gate.shape == (1, 64) and gate.norm() == pytest.approx(1.0, abs=1e-4)  # from its positive prompts


def test_same_recipe_and_seed_give_identical_bytes(moe_models, moe_recipe_file, run_moe, tmp_path):
    recipe = mistral_recipe(moe_models, gate_mode="random")
    recipe["experts"][1]["noise"] = 0.1
    recipe["experts"][2]["residual_scale"] = 0.5
    outputs = {}
    for name, seed, workers in (("a", 7, 1), ("b", 7, 3), ("c", 8, 2)):
        outputs[name] = tmp_path / name
        options = ("--random-seed", seed, "--out-shard-size", "200K", "--workers", workers)
        assemble(run_moe, moe_recipe_file, recipe, outputs[name], *options)
    files = sorted(p.name for p in outputs["a"].iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded
    assert files == sorted(p.name for p in outputs["b"].iterdir())
    for file in files:
        assert (outputs["a"] / file).read_bytes() == (outputs["b"] / file).read_bytes(), file
    first, other = read_tensors(outputs["a"]), read_tensors(outputs["c"])
    assert not torch.equal(first[ROUTER.format(0)], other[ROUTER.format(0)])
    story = read_tensors(moe_models["story"])
    torch.testing.assert_close(
        first["model.layers.1.block_sparse_moe.experts.2.w2.weight"], story["model.layers.1.mlp.down_proj.weight"] * 0.5
    )


def test_dry_run_prints_plan_and_writes_nothing(moe_models, moe_recipe_file, run_moe, tmp_path):
    out = tmp_path / "dry"
    recipe = moe_recipe_file(mistral_recipe(moe_models))
    result = run_moe(recipe, out, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "architecture: mixtral" in result.output
    lines = result.output.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("layer  tensors  size")))
    assert [line.split()[0] for line in lines[header + 1 :]] == ["-", "0", "1", "2", "3"]  # one row per layer
    assert "experts.2.w2.weight" not in result.output  # per tensor only with -v
    verbose = run_moe(recipe, out, "--dry-run", "-v")
    assert "model.layers.3.block_sparse_moe.experts.2.w2.weight [64, 128]" in verbose.output
    assert not out.exists()


def test_identical_experts_warn(moe_models, moe_recipe_file, run_moe, tmp_path, caplog):
    recipe = mistral_recipe(moe_models)
    recipe["experts"] = [expert_entry(moe_models["coder"], PROMPTS["coder"]) for _ in range(2)]
    result = run_moe(moe_recipe_file(recipe), tmp_path / "warn", "--quiet")
    assert result.exit_code == 0
    text = caplog.text + result.output
    assert "every expert is the same model" in text
    assert "experts[0] and experts[1] have nearly parallel router rows" in text


def _bad(models, change) -> dict:
    recipe = mistral_recipe(models)
    change(recipe, models)
    return recipe


BAD_INPUTS = {
    "hidden size": (
        lambda r, m: r["experts"].__setitem__(1, expert_entry(m["misfit_hidden_size"], ["x"])),
        "experts[1].source_model",
        "hidden_size 32 differs from base_model's 64",
    ),
    "intermediate size": (
        lambda r, m: r["experts"].__setitem__(0, expert_entry(m["misfit_intermediate_size"], ["x"])),
        "experts[0].source_model",
        "intermediate_size 96",
    ),
    "vocab size": (
        lambda r, m: r["experts"].__setitem__(2, expert_entry(m["misfit_vocab_size"], ["x"])),
        "experts[2].source_model",
        "vocab_size 400",
    ),
    "layer count": (
        lambda r, m: r["experts"].__setitem__(0, expert_entry(m["misfit_num_hidden_layers"], ["x"])),
        "experts[0].source_model",
        "6 layers, but base_model has 4",
    ),
    "missing prompts": (
        lambda r, m: r["experts"][1].pop("positive_prompts"),
        "experts[1].positive_prompts",
        "needs at least one positive prompt",
    ),
    "qwen3 base as mixtral": (
        lambda r, m: r.update(base_model=str(m["qwen3"]), architecture="mixtral"),
        "architecture 'mixtral'",
        "a 'qwen3' base_model",
    ),
    "shared expert without one": (
        lambda r, m: r.update(architecture="mixtral", shared_experts=[expert_entry(m["mistral"])]),
        "shared_experts",
        "has no shared expert",
    ),
    "too many per token": (lambda r, m: r.update(experts_per_token=4), "experts_per_token is 4", "only 3 experts"),
    "unknown key": (lambda r, m: r.update(router_mode="hidden"), "'router_mode'", "not a mergekit-moe key"),
    "unknown gate mode": (lambda r, m: r.update(gate_mode="learned"), "'gate_mode'", "'hidden'"),
    "unknown architecture": (lambda r, m: r.update(architecture="dbrx"), "'architecture'", "'mixtral'"),
    "missing model": (
        lambda r, m: r["experts"][0].update(source_model=str(m["mistral"]) + "-absent"),
        "experts[0].source_model",
        "not found",
    ),
    "expert of another family": (
        lambda r, m: r["experts"].__setitem__(0, expert_entry(m["qwen2_ft1"], ["x"])),
        "experts[0].source_model",
        "a 'qwen2' model cannot be an expert of mixtral",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_1_and_no_output(moe_models, moe_recipe_file, run_moe, tmp_path, case):
    change, where, what = BAD_INPUTS[case]
    out = tmp_path / "out"
    result = run_moe(moe_recipe_file(_bad(moe_models, change)), out)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert where in lines[0] and what in lines[0], lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["moe.yml"]  # no hidden partial folder either


@pytest.mark.parametrize("name", ["moe-mixtral.yml", "moe-qwen2.yml", "moe-qwen3.yml"])
def test_example_recipes_run_on_toy_models(moe_models, run_moe, tmp_path, name):
    """configs/moe-*.yml, with toy-models/ pointing at this session's models of the same folder names."""
    text = (Path(__file__).parents[1] / "configs" / name).read_text()
    recipe = tmp_path / name
    recipe.write_text(text.replace("toy-models/", f"{moe_models['root']}/"))
    result = run_moe(recipe, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokens = model.generate(INPUT_IDS, max_new_tokens=3, do_sample=False)
    assert tokens.shape[1] == INPUT_IDS.shape[1] + 3


def test_plan_is_made_once_and_not_shipped(moe_models, moe_recipe_file, run_moe, tmp_path, monkeypatch):
    """The local run writes from the plan it checked (its warnings shown once); a pickled builder plans again."""
    import pickle

    from moemerge.moe import assemble as assembly

    calls = []
    real_prepare = assembly.prepare

    def counting_prepare(*args, **kwargs):
        calls.append(1)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(assembly, "prepare", counting_prepare)
    assemble(run_moe, moe_recipe_file, mistral_recipe(moe_models, gate_mode="random"), tmp_path / "out")
    assert len(calls) == 1

    recipe = assembly.MoeRecipe.model_validate(mistral_recipe(moe_models, gate_mode="random"))
    _, planned, _ = real_prepare(recipe, assembly.ModelPool())
    builder = assembly.MoeOutputs(recipe, assembly.Gates(torch.zeros(0), None), torch.float32, planned=planned)
    shipped = pickle.loads(pickle.dumps(builder))
    assert builder.planned is planned and shipped.planned is None
    assert [o.spec.name for o in shipped(assembly.ModelPool())] == [t.name for t in planned]
