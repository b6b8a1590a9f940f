"""The calibration pass against router decisions and expert outputs recomputed independently."""

from __future__ import annotations

import pytest
import torch
from split_fixtures import W, load, read_tensors
from transformers import AutoTokenizer

from moemerge.errors import MoemergeError
from moemerge.split.usage import collect_usage, read_calibration_text


def expert_output(stored: dict, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    weight = {w: stored[W.format(layer=layer, expert=expert, w=w)] for w in ("w1", "w2", "w3")}
    return (torch.nn.functional.silu(x @ weight["w1"].T) * (x @ weight["w3"].T)) @ weight["w2"].T


def test_usage_counts_weights_and_reap_match_a_direct_recount(split_models):
    folder, text = split_models["mixtral"], split_models["calibration"].read_text()
    usage = collect_usage(folder, text, num_experts=4, seq_len=16, max_tokens=40, batch_size=2, progress=False)
    assert usage.tokens == 40 and usage.moe_layers == [0, 1, 2, 3]

    token_ids = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"][:40]
    model, stored = load(folder), read_tensors(folder)
    block_inputs: dict[int, torch.Tensor] = {}
    for layer, decoder_layer in enumerate(model.model.layers):
        decoder_layer.mlp.register_forward_pre_hook(
            lambda _m, args, layer=layer: block_inputs.__setitem__(layer, args[0].reshape(-1, 64))
        )
    counts, weight_sums, reap_sums = (torch.zeros(4, 4, dtype=torch.float64) for _ in range(3))
    for start in range(0, 40, 16):
        with torch.no_grad():
            router_logits = model(
                torch.tensor([token_ids[start : start + 16]]), output_router_logits=True
            ).router_logits
            for layer, logits in enumerate(router_logits):
                top = logits.softmax(dim=-1).topk(2, dim=-1)
                weights = top.values / top.values.sum(dim=-1, keepdim=True)  # Mixtral renormalises its top-2
                for token, (experts, expert_weights) in enumerate(zip(top.indices, weights, strict=True)):
                    for expert, weight in zip(experts.tolist(), expert_weights.tolist(), strict=True):
                        norm = expert_output(stored, layer, expert, block_inputs[layer][token]).norm()
                        counts[layer, expert] += 1
                        weight_sums[layer, expert] += weight
                        reap_sums[layer, expert] += weight * norm.item()
    assert torch.equal(usage.counts, counts) and counts.sum() == 4 * 40 * 2
    torch.testing.assert_close(usage.weight_sums, weight_sums, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(usage.reap_sums, reap_sums, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(usage.mean_routing_weight.sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_shared_expert_gate_mean_is_a_sigmoid_mean(split_models):
    usage = collect_usage(
        split_models["qwen2_moe"], split_models["calibration"].read_text(), num_experts=4, max_tokens=32, progress=False
    )
    assert usage.tokens == 32
    assert ((usage.mean_shared_gate > 0) & (usage.mean_shared_gate < 1)).all()


def test_empty_calibration_text_is_refused(tmp_path):
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(MoemergeError, match="blank.txt: the file has no text"):
        read_calibration_text(tmp_path / "blank.txt")
    with pytest.raises(MoemergeError, match="cannot read it"):
        read_calibration_text(tmp_path / "missing.txt")
