"""gate_mode `fitted`: router rows fitted, layer by layer, on the input the router of the MoE being built sees.

The MoE is first written with zero router rows. Then it is run one layer at a time on each expert's
calibration text (its `positive_prompts` and `calibration_files`): at each MoE layer the post-attention-norm
states entering the MoE block are collected, the rows are fitted by multinomial logistic regression to
send each token to its label, set in the layer, and only then is the layer run for real, so later layers
see the routing of earlier ones. Finally the fitted rows are written over the zero rows in the output files,
with the per-layer fit summary in `moemerge_router_fit.json`.

Labels: `source` (the expert whose text the token comes from), `loss` (the expert whose source model
predicts the token's next token best, from each expert model's own per-token loss) or `posterior` (soft:
each expert's share softmax(−loss_e), so a token both experts predict alike asks for an even mix, and one
an expert predicts far worse keeps away from it).
An expert's `negative_prompts` are text that must not go to it: their tokens' target is uniform over the
other experts (with `loss` labels: the best of the other experts).
A shared expert's gate (Qwen2-MoE, `sigmoid(gate · x)` times the shared expert) with its own calibration text
is fitted the same way as a two-class problem: open on that text (`source`), or where the shared expert's
model predicts the token better than every routed expert's model (`loss`, `posterior`). Without shared text
there is nothing to fit: the gate stays zero and the plan doubles the shared down projection (weight 1).
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
FIT_SUMMARY = "moemerge_router_fit.json"


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


def _pieces(tokenizer, texts: list[str], budget: int) -> list[list[int]]:
    """Sequences of at most SEQ_LEN tokens (BOS first when the tokenizer has one), `budget` text tokens in all."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pieces = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), SEQ_LEN - len(bos)):
            piece = bos + ids[start : start + SEQ_LEN - len(bos)][:budget]
            if len(piece) > len(bos):
                pieces.append(piece)
                budget -= len(piece) - len(bos)
            if budget <= 0:
                return pieces
    return pieces


def calibration_sequences(
    tokenizer,
    texts_per_expert: Sequence[list[str]],
    tokens_per_expert: int = TOKENS_PER_EXPERT,
    *,
    negative_texts: Sequence[list[str]] = (),
    shared_texts: Sequence[str] = (),
) -> list[tuple[list[int], int]]:
    """(token ids, label) sequences, up to `tokens_per_expert` tokens per expert and kind of text.

    Labels: e for expert e's text, ~e (that is −1−e) for its negative text, and len(texts_per_expert) for the
    shared expert's text."""
    sequences = []
    for expert, texts in enumerate(texts_per_expert):
        sequences += [(piece, expert) for piece in _pieces(tokenizer, texts, tokens_per_expert)]
    for expert, texts in enumerate(negative_texts):
        sequences += [(piece, ~expert) for piece in _pieces(tokenizer, texts, tokens_per_expert)]
    shared = len(texts_per_expert)
    sequences += [(piece, shared) for piece in _pieces(tokenizer, list(shared_texts), tokens_per_expert)]
    return sequences


def routing_targets(labels: torch.Tensor, experts: int) -> torch.Tensor:
    """What the router is fitted to: the labels themselves when every token names its expert, else per token a
    probability row: one-hot for expert e, uniform over the others for ~e, uniform over all for the shared text."""
    if bool(((labels >= 0) & (labels < experts)).all()):
        return labels
    targets = torch.zeros(len(labels), experts)
    own = (labels >= 0) & (labels < experts)
    targets[own, labels[own]] = 1.0
    targets[labels >= experts] = 1.0 / experts
    negative = labels < 0
    if experts > 1:
        targets[negative] = 1.0 / (experts - 1)
        targets[negative, (~labels[negative])] = 0.0
    else:
        targets[negative] = 1.0  # one expert: every token goes to it whatever the text says
    return targets


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


def model_losses(folders: Sequence[Path], batches: list[Batch], **run_options) -> list[list[torch.Tensor]]:
    """Per model, per batch [batch, tokens - 1]: each model's own per-token loss, run layer by layer."""
    return [token_losses(LayerwiseModel(LazyModel(f), **run_options), batches, progress=False) for f in folders]


def loss_labels(losses: list[list[torch.Tensor]], source: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per token, the expert whose own model gives its next token the lowest loss, among the experts its text
    allows (not e for e's negative text); the last token keeps its source label (nothing follows it)."""
    experts = len(losses)
    labels = []
    for index, source_labels in enumerate(source):
        per_expert = torch.stack([loss[index] for loss in losses])  # [experts, batch, tokens - 1]
        forbidden = torch.arange(experts)[:, None, None] == (~source_labels[None, :, :-1])
        best = per_expert.masked_fill(forbidden, float("inf")).argmin(dim=0)
        labels.append(torch.cat([best, source_labels[:, -1:]], dim=1))
    return labels


def posterior_targets(
    losses: list[list[torch.Tensor]], source: list[torch.Tensor], window: int = 1
) -> list[torch.Tensor]:
    """Per token [batch, tokens, experts]: each expert's posterior probability of having produced the next token,
    softmax(−loss_e), over the experts its text allows (equal priors; the E-step of a mixture of experts). With
    `window` > 1, the losses are summed over the window of tokens ending at the token's (a sharper, smoother
    posterior). The last token keeps its source label's target (nothing follows it)."""
    experts = len(losses)
    targets = []
    for index, source_labels in enumerate(source):
        per_expert = torch.stack([loss[index] for loss in losses]).float()  # [experts, batch, tokens - 1]
        if window > 1:
            summed = per_expert.cumsum(dim=-1)
            summed[..., window:] = summed[..., window:] - summed[..., :-window]
            per_expert = summed
        forbidden = torch.arange(experts)[:, None, None] == (~source_labels[None, :, :-1])
        posterior = torch.softmax(-per_expert.masked_fill(forbidden, float("inf")), dim=0).permute(1, 2, 0)
        last = routing_targets(source_labels[:, -1], experts)
        last = torch.nn.functional.one_hot(last, experts).float() if not last.is_floating_point() else last
        targets.append(torch.cat([posterior, last[:, None, :]], dim=1))
    return targets


def shared_gate_labels(
    experts: int,
    source: list[torch.Tensor],
    shared_losses: list[torch.Tensor] | None = None,
    expert_losses: Sequence[list[torch.Tensor]] = (),
) -> list[torch.Tensor]:
    """Per token 1 where the shared expert should be on: its own text (label `experts`; no losses given), or where
    its model's loss is below every routed expert model's (the last token: by its text)."""
    labels = []
    for index, source_labels in enumerate(source):
        own = (source_labels == experts).long()
        if shared_losses is not None:
            best_routed = torch.stack([loss[index] for loss in expert_losses]).min(dim=0).values
            own = torch.cat([(shared_losses[index] < best_routed).long(), own[:, -1:]], dim=1)
        labels.append(own)
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
    window: int = 32,
    shared: tuple[str, ExpertEntry, Path] | None = None,
    shared_gate_names: dict[int, str] | None = None,
    device: str = "cpu",
    max_memory: int | None = None,
    progress: bool = False,
    seed: int = 0,
) -> dict:
    """Fit every MoE layer's router (and shared-expert gate) in the zero-routed MoE written to `folder`, write the
    rows there and the fit summary to `moemerge_router_fit.json`."""
    # the output's tokenizer when it has one (its vocabulary may differ from the base's), else the base's
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(folder if has_tokenizer else base_folder, trust_remote_code=False)
    texts = [calibration_text(entry, label) for label, entry in entries]
    negatives = [list(entry.negative_prompts) for _, entry in entries]
    shared_texts = []
    if shared is not None and (shared[1].positive_prompts or shared[1].calibration_files):
        shared_texts = calibration_text(shared[1], shared[0])
    sequences = calibration_sequences(tokenizer, texts, negative_texts=negatives, shared_texts=shared_texts)
    batches, source_labels, groups = batch_sequences(sequences)
    experts = len(entries)
    token_labels, gate_labels = source_labels, None
    expert_losses: list[list[torch.Tensor]] = []
    if labels in ("loss", "posterior"):
        expert_losses = model_losses(expert_folders, batches, device=device)
        token_labels = loss_labels(expert_losses, source_labels)
    fit_shared = bool(shared is not None and shared_gate_names and shared_texts)
    if fit_shared:
        assert shared is not None
        shared_losses = model_losses([shared[2]], batches, device=device)[0] if labels != "source" else None
        per_batch = shared_gate_labels(experts, source_labels, shared_losses, expert_losses)
        gate_labels = torch.cat([t.reshape(-1) for t in per_batch])
    flat_labels = torch.cat([t.reshape(-1) for t in token_labels])
    flat_groups = torch.cat([g.reshape(-1) for g in groups])
    targets = routing_targets(flat_labels, experts)
    if labels == "posterior":
        targets = torch.cat([t.reshape(-1, experts) for t in posterior_targets(expert_losses, source_labels, window)])
    runner = LayerwiseModel(LazyModel(folder), device=device)
    share = targets.float().mean(dim=0) if targets.is_floating_point() else torch.bincount(targets, minlength=experts)
    summary: dict = {
        "labels": labels,
        "window": window if labels == "posterior" else None,
        "tokens": int(flat_labels.numel()),
        "label_share": (share / share.sum()).tolist(),
        "layers": {},
    }
    fitted: dict[int, torch.Tensor] = {}
    fitted_gates: dict[int, torch.Tensor] = {}

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
        inputs = torch.cat(states)
        rows, layer_summary = fit_router_rows(inputs, targets, experts, groups=flat_groups, seed=seed)
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
        gate = getattr(block, "shared_expert_gate", None)
        if fit_shared and gate is not None and layer in (shared_gate_names or {}):
            pair, gate_summary = fit_router_rows(inputs, gate_labels, 2, groups=flat_groups, seed=seed)
            # a softmax over two rows is the sigmoid of their difference
            row = (pair[1] - pair[0])[None, :].to(gate.weight.dtype)
            gate.weight.data.copy_(row.to(gate.weight.device))
            fitted_gates[layer] = row
            layer_summary["shared_gate"] = {k: gate_summary[k] for k in ("l2", "held_out_accuracy", "by_l2")}
        return None

    runner.run(batches, max_memory=max_memory, on_layer=fit, progress=progress, description="fitting routers")
    for layer, name in router_names.items():
        overwrite_tensor(folder, name, fitted[layer])
    for layer, name in (shared_gate_names or {}).items():
        if layer in fitted_gates:
            overwrite_tensor(folder, name, fitted_gates[layer])
    summary["shared_gate"] = "fitted" if fitted_gates else "not fitted"
    (folder / FIT_SUMMARY).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary
