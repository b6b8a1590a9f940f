"""The layer-by-layer runner against the whole model run by transformers: same router statistics, same states."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moemerge.io.loader import LazyModel
from moemerge.layerwise import (
    ActivationStore,
    LayerwiseModel,
    equal_batches,
    mlp_module,
    moe_block,
    token_losses,
)
from moemerge.moe.prompt_states import HiddenStateReader, _tokenize, load_tokenizer
from moemerge.moe.router import pool_prompts
from moemerge.split.usage import (
    RouterUsage,
    _expert_output_norms,
    calibration_chunks,
    collect_usage,
    tokenize_until,
)

# deepseek_v3: sigmoid router, seeded score-correction bias, 2 groups (1 chosen), routed_scaling_factor 2.5, layer 0
# dense; gpt_oss: seeded router bias, top-k then softmax, clamped SwiGLU experts with seeded biases
FAMILIES = ["mixtral", "mixtral_fused", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
MOE_LAYERS = {"deepseek_v3": [1, 2, 3]}
# a token's routing weights add up to this where the rule normalises them (times routed_scaling_factor)
WEIGHT_PER_TOKEN = {"mixtral": 1.0, "mixtral_fused": 1.0, "qwen2_moe": 1.0, "deepseek_v3": 2.5, "gpt_oss": 1.0}
SEQ_LEN, MAX_TOKENS, BATCH = 16, 56, 2  # batches of 2 × 16 and 1 × 16 tokens, then a short chunk of 8


class TransformersDecisions:
    """The reference recorder: the experts and weights transformers' own router returns (v5 routers return
    `(logits, weights, indices)`), not moemerge's routing rules."""

    def __init__(self, usage: RouterUsage, layer: int, block: torch.nn.Module):
        self.usage, self.layer, self.block = usage, layer, block

    @torch.no_grad()
    def __call__(self, _module, inputs: tuple, output: tuple) -> None:
        hidden = inputs[0].reshape(-1, inputs[0].shape[-1])
        _, weights, indices = output
        usage, layer = self.usage, self.layer
        for expert in indices.unique().tolist():
            rows, slot = torch.where(indices == expert)
            usage.counts[layer, expert] += len(rows)
            usage.weight_sums[layer, expert] += weights[rows, slot].double().sum()
            norms = _expert_output_norms(self.block.experts, expert, hidden[rows])
            usage.reap_sums[layer, expert] += (weights[rows, slot].double() * norms.double()).sum()
        shared_gate = getattr(self.block, "shared_expert_gate", None)
        if shared_gate is not None:
            usage.shared_gate_sums[layer] += torch.sigmoid(shared_gate(hidden).float()).double().sum()


@torch.no_grad()
def whole_model_usage(folder, text: str, experts: int = 4) -> RouterUsage:
    """The reference: the whole model loaded by transformers, its own routing decisions recorded on every router."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chunks = calibration_chunks(tokenize_until(tokenizer, text, MAX_TOKENS), SEQ_LEN, MAX_TOKENS)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    usage = RouterUsage.empty(len(model.model.layers), experts)
    for index, layer in enumerate(model.model.layers):
        block = moe_block(layer)
        if block is not None:
            usage.moe_layers.append(index)
            router = getattr(block, "gate", None) or block.router
            router.register_forward_hook(TransformersDecisions(usage, index, block))
    for batch in equal_batches(chunks, BATCH):
        model(input_ids=batch.input_ids, use_cache=False)
        usage.tokens += batch.tokens
    return usage


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_statistics_equal_the_whole_model_pass(split_models, family):
    folder, text = split_models[family], split_models["calibration"].read_text()
    expected = whole_model_usage(folder, text)
    options = dict(num_experts=4, seq_len=SEQ_LEN, max_tokens=MAX_TOKENS, batch_size=BATCH, progress=False)
    in_memory = collect_usage(folder, text, **options)
    moe_layers = MOE_LAYERS.get(family, [0, 1, 2, 3])
    assert in_memory.tokens == expected.tokens == MAX_TOKENS
    assert in_memory.moe_layers == expected.moe_layers == moe_layers
    assert torch.equal(in_memory.counts, expected.counts) and expected.counts.sum() == len(moe_layers) * MAX_TOKENS * 2
    if family in WEIGHT_PER_TOKEN:
        weight_per_token = in_memory.mean_routing_weight.sum(dim=1)[moe_layers]
        torch.testing.assert_close(weight_per_token, torch.full_like(weight_per_token, WEIGHT_PER_TOKEN[family]))
    torch.testing.assert_close(in_memory.weight_sums, expected.weight_sums, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(in_memory.reap_sums, expected.reap_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(in_memory.shared_gate_sums, expected.shared_gate_sums, rtol=1e-5, atol=1e-6)
    if family == "qwen2_moe":  # a 1-byte budget: activations go to a file and come back bit for bit
        spilled = collect_usage(folder, text, max_memory=1, **options)
        for name in ("counts", "weight_sums", "reap_sums", "shared_gate_sums"):
            assert torch.equal(getattr(spilled, name), getattr(in_memory, name)), name


def test_spilled_store_gives_back_what_it_was_given(tmp_path):
    store = ActivationStore(tmp_path)
    first, second = torch.randn(2, 3, 5, dtype=torch.bfloat16), torch.randn(1, 7, 5)
    store.put(0, first)
    store.put(1, second)
    store.put(0, first * 2)  # a layer's output overwrites its input in place
    assert torch.equal(store.get(0), first * 2) and torch.equal(store.get(1), second)
    assert store.spilled and not list(tmp_path.iterdir())  # the file has no name: gone with its descriptor
    store.close()


PROMPTS = ["def add(a, b): return a + b", "Once upon a time", "the quick brown fox jumps over the lazy dog"]


@torch.no_grad()
def whole_model_states(folder, pool: str, router_input: str) -> torch.Tensor:
    """[layers, hidden] mean pooled state per layer, from the whole model (hidden_states or an MLP pre-hook)."""
    batch = _tokenize(load_tokenizer(folder, False), PROMPTS, "prompts")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    mlp_inputs: list[torch.Tensor] = []
    for layer in model.model.layers:
        mlp_module(layer).register_forward_pre_hook(lambda _m, args: mlp_inputs.append(args[0]))
    output = model(**batch, output_hidden_states=True, use_cache=False)
    states = mlp_inputs if router_input == "mlp" else output.hidden_states[: len(model.model.layers)]
    return torch.stack([pool_prompts(s.float(), batch["attention_mask"], pool).mean(dim=0) for s in states])


@pytest.mark.parametrize(
    "model, pool, router_input",
    [
        ("base", "last", "layer"),
        ("base", "mean", "mlp"),
        ("mistral_base", "mean", "layer"),
        ("qwen2_moe", "last", "mlp"),
    ],
)
def test_prompt_states_equal_the_whole_model_ones(toy_models, split_models, model, pool, router_input):
    folder = toy_models.get(model) or split_models[model]
    expected = whole_model_states(folder, pool, router_input)
    reader = HiddenStateReader(folder, 4, "cpu", False, pool, router_input=router_input)
    torch.testing.assert_close(reader.mean_states(PROMPTS, "prompts"), expected, rtol=1e-5, atol=1e-5)
    spilled = HiddenStateReader(folder, 4, "cpu", False, pool, router_input=router_input, max_memory=1)
    together = spilled.mean_states_of([(PROMPTS[:1], "one"), (PROMPTS, "all")])
    assert torch.equal(together[1], reader.mean_states(PROMPTS, "prompts"))


@torch.no_grad()
def test_token_losses_equal_the_whole_model_ones(toy_models):
    folder = toy_models["base"]
    batches = list(equal_batches([[0, 5, 17, 42, 99, 7], [0, 8, 9, 10, 11, 12], [0, 3, 4]], 2))
    losses = token_losses(LayerwiseModel(LazyModel(folder)), batches, progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    for batch, loss in zip(batches, losses, strict=True):
        logits = model(input_ids=batch.input_ids).logits
        expected = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), batch.input_ids[:, 1:], reduction="none"
        )
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
