"""All router and shared-expert-gate weights of one MoE, per gate_mode (computed before any output is written)."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from moemerge.config.moe_recipe import ExpertEntry, MoeRecipe
from moemerge.errors import TensorError
from moemerge.moe.prompt_states import EmbeddingReader, HiddenStateReader
from moemerge.moe.router import add_noise, normalise, prompt_direction, random_rows, warn_parallel
from moemerge.moe.sources import MoeSources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gates:
    router: torch.Tensor  # [layers, experts, hidden]
    shared_gate: torch.Tensor | None  # [layers, 1, hidden]


def _hidden_rows(reader: HiddenStateReader, entries: list[tuple[str, ExpertEntry]]) -> torch.Tensor:
    """Every expert's prompt direction per layer, from one layer-by-layer pass over all their prompts."""
    groups = []
    for label, entry in entries:
        groups.append((entry.positive_prompts, f"{label}.positive_prompts"))
        if entry.negative_prompts:
            groups.append((entry.negative_prompts, f"{label}.negative_prompts"))
    means = iter(reader.mean_states_of(groups))
    rows = []
    for label, entry in entries:
        positive = next(means)
        negative = next(means) if entry.negative_prompts else None
        rows.append(prompt_direction(positive, negative, label))
    return torch.stack(rows, dim=1)  # [layers, experts, hidden]


def _embedding_rows(reader: EmbeddingReader, entries: list[tuple[str, ExpertEntry]], layers: int) -> torch.Tensor:
    rows = []
    for label, entry in entries:
        positive = normalise(reader.summed_embedding(entry.positive_prompts, f"{label}.positive_prompts"), label)
        direction = positive
        if entry.negative_prompts:
            negative = reader.summed_embedding(entry.negative_prompts, f"{label}.negative_prompts")
            direction = positive - normalise(negative, label)
        rows.append(normalise(direction, label))
    return torch.stack(rows).unsqueeze(0).expand(layers, -1, -1).clone()


def _embedding_tensor(sources: MoeSources) -> torch.Tensor:
    for name in sources.base_arch.embeddings:
        if sources.base.has(name):
            return sources.base.read(name, dtype=torch.float32)
    raise TensorError(f"base_model has no embedding tensor ({', '.join(sources.base_arch.embeddings)})")


def compute_gates(
    recipe: MoeRecipe,
    sources: MoeSources,
    *,
    device: str,
    seed: int,
    pool: str,
    trust_remote_code: bool,
    max_memory: int | None = None,
    router_input: str = "layer",
    progress: bool = False,
) -> Gates:
    """Router rows per gate_mode, plus a gated shared expert's gate (Qwen2-MoE): its prompt direction when it has
    positive prompts (in a prompt mode), otherwise zeros (sigmoid 0.5, which moe/plan.py compensates)."""
    layers, hidden = sources.layers, sources.hidden_size
    experts = [(source.label, source.entry) for source in sources.experts]
    has_gate = bool(sources.shared) and sources.target.moe is not None and sources.target.moe.shared_expert_gate
    shared = [(source.label, source.entry) for source in sources.shared] if has_gate else []
    prompt_mode = recipe.gate_mode in ("hidden", "cheap_embed")
    shared_from_prompts = sources.shared_gated and any(entry.positive_prompts for _, entry in shared) and prompt_mode
    shared_gate = torch.zeros((layers, 1, hidden)) if shared else None
    if recipe.gate_mode == "hidden":
        reader = HiddenStateReader(
            sources.base.folder,
            layers,
            device,
            trust_remote_code,
            pool,
            max_memory=max_memory,
            router_input=router_input,
            progress=progress,
            base=sources.base,
        )
        rows = _hidden_rows(reader, experts + (shared if shared_from_prompts else []))
        router = rows[:, : len(experts)].contiguous()
        if shared_from_prompts:
            shared_gate = rows[:, len(experts) :].contiguous()
        del reader
        gc.collect()
    elif recipe.gate_mode == "cheap_embed":
        reader = EmbeddingReader(sources.base.folder, _embedding_tensor(sources), trust_remote_code)
        router = _embedding_rows(reader, experts, layers)
        if shared_from_prompts:
            shared_gate = _embedding_rows(reader, shared, layers)
    elif recipe.gate_mode == "fitted":
        router = torch.zeros((layers, len(experts), hidden))  # fitted after assembly (moe/fitted.py)
    else:
        router = random_rows(layers, len(experts), hidden, seed, uniform=recipe.gate_mode == "uniform_random")
    if prompt_mode:
        warn_parallel(router)
    noise = [entry.noise for _, entry in experts]
    if any(noise):
        router = add_noise(router, noise, seed)
    if shared_gate is not None and shared[0][1].noise:
        shared_gate = add_noise(shared_gate, [shared[0][1].noise], seed + 1)
    return Gates(router=router, shared_gate=shared_gate)
