"""Calibration pass: run the MoE layer by layer (`moemerge.layerwise`) on text and record, per layer, how the
router uses each expert.

A forward hook on every router module (`mlp.gate` in transformers v5 Mixtral, Qwen2-MoE, Qwen3-MoE
and OLMoE; it returns `(router_logits, top_k_weights, top_k_index)`) sees the router's input and
decisions. From them we accumulate, per layer and expert: how often it is picked, the sum of its
routing weights, and the sum of routing weight × ‖expert output‖ over the tokens routed to it
(REAP, "Router-weighted Expert Activation Pruning"), computed with the layer's own expert weights.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moemerge.errors import MoemergeError
from moemerge.io.loader import LazyModel
from moemerge.layerwise import LayerwiseModel, equal_batches, moe_block

log = logging.getLogger(__name__)


@dataclass
class RouterUsage:
    """Per-layer router statistics over the calibration tokens (tensors are [layers, experts])."""

    counts: torch.Tensor  # how many tokens picked each expert
    weight_sums: torch.Tensor  # sum of each expert's routing weight (0 where not picked)
    reap_sums: torch.Tensor  # sum over routed tokens of routing weight × ‖expert output‖
    shared_gate_sums: torch.Tensor  # [layers]: sum of sigmoid(shared_expert_gate · x), where there is one
    tokens: int = 0
    moe_layers: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, num_layers: int, num_experts: int) -> RouterUsage:
        zeros = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        return cls(zeros.clone(), zeros.clone(), zeros.clone(), torch.zeros(num_layers, dtype=torch.float64))

    @property
    def frequency(self) -> torch.Tensor:
        """Share of tokens that picked each expert."""
        return self.counts / max(self.tokens, 1)

    @property
    def mean_routing_weight(self) -> torch.Tensor:
        """Mean over all tokens of each expert's routing weight (0 on tokens that did not pick it)."""
        return self.weight_sums / max(self.tokens, 1)

    @property
    def reap(self) -> torch.Tensor:
        """REAP score: mean over the tokens routed to an expert of gate weight × ‖expert output‖ (0 if never routed)."""
        return self.reap_sums / self.counts.clamp_min(1)

    @property
    def mean_shared_gate(self) -> torch.Tensor:
        return self.shared_gate_sums / max(self.tokens, 1)

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "moe_layers": self.moe_layers,
            "counts": self.counts.tolist(),
            "frequency": self.frequency.tolist(),
            "mean_routing_weight": self.mean_routing_weight.tolist(),
            "reap": self.reap.tolist(),
            "mean_shared_expert_gate": self.mean_shared_gate.tolist(),
            # the raw sums, so that `--usage` restores these statistics exactly
            "weight_sums": self.weight_sums.tolist(),
            "reap_sums": self.reap_sums.tolist(),
            "shared_gate_sums": self.shared_gate_sums.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> RouterUsage:
        """The statistics a report's JSON holds (its `to_dict`); KeyError/ValueError if it is not one."""
        tensor = functools.partial(torch.tensor, dtype=torch.float64)
        return cls(
            counts=tensor(data["counts"]),
            weight_sums=tensor(data["weight_sums"]),
            reap_sums=tensor(data["reap_sums"]),
            shared_gate_sums=tensor(data["shared_gate_sums"]),
            tokens=int(data["tokens"]),
            moe_layers=[int(layer) for layer in data["moe_layers"]],
        )


def read_calibration_text(path: Path) -> str:
    """The calibration file as text; an empty file is a user error."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise MoemergeError(f"--calibration {path}: cannot read it ({error.strerror or error})") from None
    if not text.strip():
        raise MoemergeError(f"--calibration {path}: the file has no text")
    return text


def calibration_chunks(token_ids: list[int], seq_len: int, max_tokens: int) -> list[list[int]]:
    """Token ids cut to at most max_tokens, in chunks of seq_len (the last one may be shorter)."""
    token_ids = token_ids[:max_tokens]
    return [token_ids[start : start + seq_len] for start in range(0, len(token_ids), seq_len)]


def tokenize_until(tokenizer, text: str, max_tokens: int, piece_chars: int = 200_000) -> list[int]:
    """Token ids of the text, tokenised piece by piece (cut at line ends) until max_tokens are reached."""
    token_ids: list[int] = []
    start = 0
    while start < len(text) and len(token_ids) < max_tokens:
        end = len(text) if start + piece_chars >= len(text) else text.rfind("\n", start, start + piece_chars) + 1
        end = end if end > start else min(len(text), start + piece_chars)
        token_ids += tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        start = end
    return token_ids[:max_tokens]


def _expert_output_norms(experts: torch.nn.Module, expert: int, hidden: torch.Tensor) -> torch.Tensor:
    """‖down(act(gate·x) * up·x)‖ for each row of hidden, with v5's fused expert weights."""
    gate, up = torch.nn.functional.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    output = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])
    return output.float().norm(dim=-1)


class _RouterRecorder:
    """Forward hook on one layer's router that adds that layer's statistics to a RouterUsage."""

    def __init__(self, usage: RouterUsage, layer: int, block: torch.nn.Module):
        self.usage, self.layer, self.block = usage, layer, block

    @torch.no_grad()
    def __call__(self, _module: torch.nn.Module, inputs: tuple, output: tuple) -> None:
        hidden = inputs[0].reshape(-1, inputs[0].shape[-1])
        _, weights, indices = output
        flat_indices, flat_weights = indices.reshape(-1).cpu(), weights.reshape(-1).double().cpu()
        usage, layer = self.usage, self.layer
        usage.counts[layer].index_add_(0, flat_indices, torch.ones_like(flat_weights))
        usage.weight_sums[layer].index_add_(0, flat_indices, flat_weights)
        experts = self.block.experts
        for expert in indices.unique().tolist():
            token_rows, slot = torch.where(indices == expert)
            norms = _expert_output_norms(experts, expert, hidden[token_rows])
            usage.reap_sums[layer, expert] += (weights[token_rows, slot].double() * norms.double()).sum().cpu()
        shared_gate = getattr(self.block, "shared_expert_gate", None)
        if shared_gate is not None:
            usage.shared_gate_sums[layer] += torch.sigmoid(shared_gate(hidden).float()).double().sum().cpu()


def collect_usage(
    model: LazyModel | Path,
    text: str,
    *,
    num_experts: int,
    seq_len: int = 256,
    max_tokens: int = 65536,
    batch_size: int = 8,
    device: str = "cpu",
    max_memory: int | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> RouterUsage:
    """Tokenise the text with the model's tokenizer, run it through the MoE layer by layer and return the router
    statistics (memory: one layer plus the activations, which spill to a temporary file beyond `max_memory`)."""
    from transformers import AutoTokenizer

    model = model if isinstance(model, LazyModel) else LazyModel(Path(model))
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise MoemergeError(f"calibration needs the model's tokenizer, and {model.folder} has none ({error})") from None
    token_ids = tokenize_until(tokenizer, text, max_tokens)
    chunks = calibration_chunks(token_ids, seq_len, max_tokens)
    if not chunks:
        raise MoemergeError("the calibration text tokenises to no tokens")
    runner = LayerwiseModel(model, device=device, trust_remote_code=trust_remote_code)
    usage = RouterUsage.empty(runner.num_layers, num_experts)
    batches = list(equal_batches(chunks, batch_size))
    usage.tokens = sum(batch.tokens for batch in batches)

    def record(layer: int, module: torch.nn.Module, _probe):
        block = moe_block(module)
        if block is None:
            return None
        usage.moe_layers.append(layer)
        return block.gate.register_forward_hook(_RouterRecorder(usage, layer, block)).remove

    log.info("calibration: %d tokens in %d sequences of up to %d", usage.tokens, len(chunks), seq_len)
    runner.run(batches, max_memory=max_memory, on_layer=record, progress=progress, description="calibrating")
    if not usage.moe_layers:
        raise MoemergeError(f"{model.label}: no router modules found to record")
    return usage
