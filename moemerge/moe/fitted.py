"""gate_mode `fitted`: router rows fitted, layer by layer, on the input the router of the MoE being built sees.

The MoE is first written with zero router rows. Then it is run one layer at a time on each expert's
calibration text (its `positive_prompts` and `calibration_files`): at each MoE layer the post-attention-norm
states entering the MoE block are collected, the rows are fitted by multinomial logistic regression to
send each token to its label, set in the layer, and only then is the layer run for real, so later layers
see the routing of earlier ones. Finally the fitted rows are written over the zero rows in the output files.

Labels: `source` (the expert whose text the token comes from) or `loss` (the expert whose source model
predicts the token's next token best, from each expert model's own per-token loss).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from moemerge.config.moe_recipe import ExpertEntry
from moemerge.errors import ConfigError, TensorError
from moemerge.io.loader import LazyModel, read_safetensors_header
from moemerge.layerwise import Batch, LayerwiseModel, moe_block, token_losses
from moemerge.moe.prompt_states import load_tokenizer
from moemerge.moe.router import fit_router_rows

log = logging.getLogger(__name__)

SEQ_LEN = 128
BATCH_SIZE = 8
TOKENS_PER_EXPERT = 16384


def calibration_text(entry: ExpertEntry, label: str) -> list[str]:
    """The expert's calibration texts: each positive prompt, then each calibration file's contents."""
    texts = list(entry.positive_prompts)
    for name in entry.calibration_files:
        try:
            texts.append(Path(name).read_text(encoding="utf-8", errors="replace"))
        except OSError as error:
            raise ConfigError(f"{label}.calibration_files: cannot read {name} ({error.strerror or error})") from None
    if not any(text.strip() for text in texts):
        raise ConfigError(f"{label}: gate_mode 'fitted' needs positive_prompts or calibration_files with text")
    return texts


def calibration_sequences(
    tokenizer, texts_per_expert: Sequence[list[str]], tokens_per_expert: int = TOKENS_PER_EXPERT
) -> list[tuple[list[int], int]]:
    """(token ids, expert) sequences of at most SEQ_LEN tokens, each starting with BOS when the tokenizer has one,
    up to `tokens_per_expert` tokens per expert."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sequences = []
    for expert, texts in enumerate(texts_per_expert):
        budget = tokens_per_expert
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids), SEQ_LEN - len(bos)):
                piece = bos + ids[start : start + SEQ_LEN - len(bos)][:budget]
                if len(piece) > len(bos):
                    sequences.append((piece, expert))
                    budget -= len(piece) - len(bos)
                if budget <= 0:
                    break
            if budget <= 0:
                break
    return sequences


def batch_sequences(
    sequences: list[tuple[list[int], int]],
) -> tuple[list[Batch], list[torch.Tensor], list[torch.Tensor]]:
    """Batches of equal-length sequences (no padding), with per-token source labels and sequence ids."""
    by_length: dict[int, list[int]] = {}
    for index, (ids, _) in enumerate(sequences):
        by_length.setdefault(len(ids), []).append(index)
    batches, labels, groups = [], [], []
    for length in sorted(by_length, reverse=True):
        members = by_length[length]
        for start in range(0, len(members), BATCH_SIZE):
            chosen = members[start : start + BATCH_SIZE]
            batches.append(Batch(torch.tensor([sequences[i][0] for i in chosen]), None))
            labels.append(torch.tensor([[sequences[i][1]] * length for i in chosen]))
            groups.append(torch.tensor([[i] * length for i in chosen]))
    return batches, labels, groups


def loss_labels(expert_folders: Sequence[Path], batches: list[Batch], source: list[torch.Tensor], **run_options):
    """Per token, the expert whose own model gives its next token the lowest loss (the last token keeps its source
    label: nothing follows it)."""
    losses = []
    for folder in expert_folders:
        runner = LayerwiseModel(LazyModel(folder), **run_options)
        losses.append(token_losses(runner, batches, progress=False))
    labels = []
    for index, source_labels in enumerate(source):
        per_expert = torch.stack([loss[index] for loss in losses])  # [experts, batch, tokens - 1]
        best = per_expert.argmin(dim=0)
        labels.append(torch.cat([best, source_labels[:, -1:]], dim=1))
    return labels


def overwrite_tensor(folder: Path, name: str, tensor: torch.Tensor) -> None:
    """Write `tensor` over the stored bytes of `name` (same shape and dtype) in a folder's safetensors files."""
    index = folder / "model.safetensors.index.json"
    file = folder / (json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors")
    stored = read_safetensors_header(file, str(folder))[name]
    if tuple(tensor.shape) != stored.shape or tensor.dtype != stored.dtype:
        raise TensorError(f"{name}: fitted rows {tuple(tensor.shape)} {tensor.dtype} do not fit {stored.shape}")
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    descriptor = os.open(file, os.O_WRONLY)
    try:
        os.pwrite(descriptor, data, stored.start)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fit_routers(
    folder: Path,
    router_names: dict[int, str],
    base_folder: Path,
    entries: Sequence[tuple[str, ExpertEntry]],
    expert_folders: Sequence[Path],
    *,
    labels: str = "source",
    device: str = "cpu",
    max_memory: int | None = None,
    progress: bool = False,
    seed: int = 0,
) -> dict:
    """Fit every MoE layer's router in the (zero-routed) MoE written to `folder` and write the rows there."""
    # the output's tokenizer when it has one (its vocabulary may differ from the base's), else the base's
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(folder if has_tokenizer else base_folder, trust_remote_code=False)
    texts = [calibration_text(entry, label) for label, entry in entries]
    sequences = calibration_sequences(tokenizer, texts)
    batches, source_labels, groups = batch_sequences(sequences)
    token_labels = source_labels
    if labels == "loss":
        token_labels = loss_labels(expert_folders, batches, source_labels, device=device)
    flat_labels = torch.cat([t.reshape(-1) for t in token_labels])
    flat_groups = torch.cat([g.reshape(-1) for g in groups])
    experts = len(entries)
    runner = LayerwiseModel(LazyModel(folder), device=device)
    summary: dict = {"labels": labels, "tokens": int(flat_labels.numel()), "label_share": [], "layers": {}}
    summary["label_share"] = (torch.bincount(flat_labels, minlength=experts) / flat_labels.numel()).tolist()
    fitted: dict[int, torch.Tensor] = {}

    def fit(layer: int, module: torch.nn.Module, probe) -> None:
        block = moe_block(module)
        if block is None or layer not in router_names:
            return None
        states: list[torch.Tensor] = []
        handle = block.register_forward_pre_hook(
            lambda _m, args: states.append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())
        )
        try:
            probe()
        finally:
            handle.remove()
        rows, layer_summary = fit_router_rows(torch.cat(states), flat_labels, experts, groups=flat_groups, seed=seed)
        rows = rows.to(block.gate.weight.dtype)
        block.gate.weight.data.copy_(rows.to(block.gate.weight.device))
        fitted[layer] = rows
        summary["layers"][layer] = layer_summary
        log.info(
            "layer %d: router fitted (L2 %g, held-out accuracy %.3f)",
            layer,
            layer_summary["l2"],
            layer_summary["held_out_accuracy"],
        )
        return None

    runner.run(batches, max_memory=max_memory, on_layer=fit, progress=progress, description="fitting routers")
    for layer, name in router_names.items():
        overwrite_tensor(folder, name, fitted[layer])
    return summary
