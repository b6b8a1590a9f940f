"""Calibration pass: run the MoE layer by layer (`moemerge.layerwise`) on text and record, per layer, how the
router uses each expert.

A forward pre-hook on every router module (found in transformers' layer by the architecture table's
names: `mlp.gate`, GPT-OSS's `mlp.router`) sees the router's input. From it the router's logits are
recomputed and the experts chosen with the family's own rule from `moemerge.moe.routing` (softmax
top-k, GPT-OSS's top-k then softmax, DeepSeek-V3's sigmoid + correction bias within groups...), so the
statistics follow one table, not each model class. We accumulate, per layer and expert: how often it
is picked, the sum of its routing weights, and the sum of routing weight × ‖expert output‖ over the
tokens routed to it (REAP, "Router-weighted Expert Activation Pruning"), the output computed by the
layer's own experts module.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moemerge.architectures import MoeLayout, find_architecture
from moemerge.errors import MoemergeError
from moemerge.io.loader import LazyModel
from moemerge.layerwise import LayerwiseModel, equal_batches
from moemerge.moe.routing import RoutingRule, route, router_logits, routing_rule

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
    """‖expert(x)‖ for each row of hidden, by the layer's experts module itself (every token sent to `expert`
    with weight 1), so each family's expert function (clamped SwiGLU with biases for GPT-OSS) is the one used."""
    indices = torch.full((hidden.shape[0], 1), expert, dtype=torch.long, device=hidden.device)
    weights = torch.ones((hidden.shape[0], 1), dtype=hidden.dtype, device=hidden.device)
    return experts(hidden, indices, weights).float().norm(dim=-1)


def _tensor_at(root: torch.nn.Module, suffix: str | None) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """(owning module, tensor) for a dotted name under a decoder layer, or None where the layer has none."""
    if suffix is None:
        return None
    path, _, leaf = suffix.rpartition(".")
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    tensor = getattr(module, leaf, None)
    return (module, tensor) if isinstance(tensor, torch.Tensor) else None


@dataclass
class RouterTap:
    """One decoder layer's router as transformers built it, located by the table's tensor names."""

    router: torch.nn.Module  # hooked: its input is the hidden state the router multiplies
    block: torch.nn.Module  # the sparse MoE block holding `experts`
    weight: torch.Tensor
    bias: torch.Tensor | None  # GPT-OSS: added to the logits
    correction_bias: torch.Tensor | None  # DeepSeek-V3: added to the scores for choosing only
    shared_gate: torch.Tensor | None  # Qwen2-MoE: sigmoid gate on the shared expert


def router_tap(layer: torch.nn.Module, moe: MoeLayout) -> RouterTap | None:
    """The layer's router, or None for a dense layer. The table's on-disk router name is tried first, then the
    names the fused (in-memory) layouts give it (Mixtral's `block_sparse_moe.gate` is `mlp.gate` in memory)."""
    found = next(filter(None, (_tensor_at(layer, name) for name in (moe.router, *(f.router for f in moe.fused)))), None)
    if found is None:
        return None
    router, weight = found
    block = next((module for module in layer.modules() if router in module.children()), None)
    if block is None or not hasattr(block, "experts"):
        return None

    def optional(suffix: str | None) -> torch.Tensor | None:
        located = _tensor_at(layer, suffix)
        return None if located is None else located[1]

    return RouterTap(
        router,
        block,
        weight,
        optional(moe.router_bias),
        optional(moe.correction_bias),
        optional(moe.shared_expert_gate),
    )


class _RouterRecorder:
    """Forward pre-hook on one layer's router that adds that layer's statistics to a RouterUsage."""

    def __init__(self, usage: RouterUsage, layer: int, tap: RouterTap, rule: RoutingRule):
        self.usage, self.layer, self.tap, self.rule = usage, layer, tap, rule

    @torch.no_grad()
    def __call__(self, _module: torch.nn.Module, inputs: tuple) -> None:
        hidden = inputs[0].reshape(-1, inputs[0].shape[-1])
        tap = self.tap
        logits = router_logits(hidden, tap.weight, tap.bias, in_float32=self.rule.float32_logits)
        indices, weights = route(self.rule, logits, tap.correction_bias)
        flat_indices, flat_weights = indices.reshape(-1).cpu(), weights.reshape(-1).double().cpu()
        usage, layer = self.usage, self.layer
        usage.counts[layer].index_add_(0, flat_indices, torch.ones_like(flat_weights))
        usage.weight_sums[layer].index_add_(0, flat_indices, flat_weights)
        for expert in indices.unique().tolist():
            token_rows, slot = torch.where(indices == expert)
            norms = _expert_output_norms(tap.block.experts, expert, hidden[token_rows])
            usage.reap_sums[layer, expert] += (weights[token_rows, slot].double() * norms.double()).sum().cpu()
        if tap.shared_gate is not None:
            shared = torch.nn.functional.linear(hidden.float(), tap.shared_gate.float())
            usage.shared_gate_sums[layer] += torch.sigmoid(shared).double().sum().cpu()


def record_router(
    usage: RouterUsage, layer: int, module: torch.nn.Module, moe: MoeLayout, rule: RoutingRule
) -> torch.utils.hooks.RemovableHandle | None:
    """Hook the recorder on decoder layer `module`'s router (None for a dense layer, which is not recorded)."""
    tap = router_tap(module, moe)
    if tap is None:
        return None
    usage.moe_layers.append(layer)
    return tap.router.register_forward_pre_hook(_RouterRecorder(usage, layer, tap, rule))


def usage_rule(config: dict, moe: MoeLayout) -> RoutingRule:
    """The family's routing rule with this checkpoint's config values (the table says which kind)."""
    return routing_rule(config, moe.router_kind, experts_per_token_key=moe.experts_per_token_key)


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
    arch = find_architecture(model.config.get("model_type"))
    if arch is None or arch.moe is None:
        raise MoemergeError(f"{model.label}: not a mixture of experts moemerge knows, no router to record")
    runner = LayerwiseModel(model, device=device, trust_remote_code=trust_remote_code)
    moe, rule = arch.moe, usage_rule(runner.config.get_text_config().to_dict(), arch.moe)  # with the class defaults
    usage = RouterUsage.empty(runner.num_layers, num_experts)
    batches = list(equal_batches(chunks, batch_size))
    usage.tokens = sum(batch.tokens for batch in batches)

    def record(layer: int, module: torch.nn.Module, _probe):
        handle = record_router(usage, layer, module, moe, rule)
        return None if handle is None else handle.remove

    log.info("calibration: %d tokens in %d sequences of up to %d", usage.tokens, len(chunks), seq_len)
    runner.run(batches, max_memory=max_memory, on_layer=record, progress=progress, description="calibrating")
    if not usage.moe_layers:
        raise MoemergeError(f"{model.label}: no router modules found to record")
    return usage
