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
    _RouterRecorder,
    calibration_chunks,
    collect_usage,
    tokenize_until,
)

FAMILIES = ["mixtral", "mixtral_fused", "qwen2_moe", "qwen3_moe", "olmoe"]
SEQ_LEN, MAX_TOKENS, BATCH = 16, 56, 2  # batches of 2 × 16 and 1 × 16 tokens, then a short chunk of 8


@torch.no_grad()
def whole_model_usage(folder, text: str) -> RouterUsage:
    """The reference: the whole model loaded by transformers, the same recorder hooked on every router."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chunks = calibration_chunks(tokenize_until(tokenizer, text, MAX_TOKENS), SEQ_LEN, MAX_TOKENS)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    usage = RouterUsage.empty(len(model.model.layers), 4)
    for index, layer in enumerate(model.model.layers):
        block = moe_block(layer)
        if block is not None:
            usage.moe_layers.append(index)
            block.gate.register_forward_hook(_RouterRecorder(usage, index, block))
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
    assert in_memory.tokens == expected.tokens == MAX_TOKENS
    assert in_memory.moe_layers == expected.moe_layers == [0, 1, 2, 3]
    assert torch.equal(in_memory.counts, expected.counts) and expected.counts.sum() == 4 * MAX_TOKENS * 2
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
