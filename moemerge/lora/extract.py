"""LoRA out: a PEFT adapter holding a fine-tune's difference from its base, by truncated SVD per tensor.

For each 2-D weight the task vector ΔW = W_finetune − W_base is decomposed, ΔW ≈ U_k S_k V_kᵀ, and stored
as lora_B = U_k √S_k, lora_A = √S_k V_kᵀ with lora_alpha = r (scale 1), so peft's B·A is the rank-k
approximation. k is `rank`, or per tensor the fewest singular values that keep `energy` of ‖ΔW‖²_F.
Tensors stream one at a time through the lazy loader; only the (small) factors are kept until written.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moemerge import __version__
from moemerge.architectures import Role, architecture_for_config
from moemerge.errors import ConfigError, TensorError
from moemerge.io.loader import LazyModel
from moemerge.io.model_ref import hub_ids
from moemerge.io.output_dir import check_target, staged_output
from moemerge.io.writer import INDEX_NAME, ShardedWriter, TensorSpec

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class ExtractOptions:
    """How `extract_lora` picks ranks and what it does with embeddings and 1-D tensors."""

    rank: int | None = 32  # most singular values kept per tensor (with `energy`: a cap)
    energy: float | None = None  # keep the fewest singular values whose squares sum to this share of ‖ΔW‖²
    sv_epsilon: float = 0.0  # drop singular values at or below this (mergekit's --sv-epsilon)
    save_embeddings: bool = False  # embed_tokens / lm_head at full rank in modules_to_save
    embed_lora: bool = False  # embed_tokens / lm_head as low-rank LoRA instead
    save_modules: tuple[str, ...] = ()  # further module names saved at full rank
    include: tuple[str, ...] = ()  # regexes on module names: only these are decomposed
    exclude: tuple[str, ...] = ()
    skip_undecomposable: bool = False  # drop changed norms instead of saving them in modules_to_save
    out_dtype: torch.dtype | None = None  # default: the fine-tune's dtype
    device: str = "cpu"
    overwrite: bool = False
    progress: bool = True


@dataclass
class ExtractReport:
    """What was written: per decomposed module its rank and the relative Frobenius error of its ΔW."""

    ranks: dict[str, int] = field(default_factory=dict)
    relative_errors: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    adapter_bytes: int = 0
    seconds: float = 0.0


def choose_rank(singular_values: torch.Tensor, options: ExtractOptions) -> int:
    """The number of singular values to keep: energy share and/or rank cap, minus those at or below sv_epsilon."""
    rank = singular_values.numel()
    if options.energy is not None:
        energy = singular_values.double().square().cumsum(0)
        if energy[-1] > 0:
            rank = int(torch.searchsorted(energy / energy[-1], torch.tensor(options.energy, dtype=energy.dtype))) + 1
    if options.rank is not None:
        rank = min(rank, options.rank)
    if options.sv_epsilon > 0:
        rank = min(rank, int((singular_values > options.sv_epsilon).sum()))
    return max(min(rank, singular_values.numel()), 0)


def decompose(task_vector: torch.Tensor, options: ExtractOptions) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(lora_A [k, in], lora_B [out, k], relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F) of a 2-D task vector."""
    u, s, vh = torch.linalg.svd(task_vector.float(), full_matrices=False)
    rank = choose_rank(s, options)
    root = s[:rank].sqrt()
    lora_a, lora_b = root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    total = s.double().square().sum()
    kept = s[:rank].double().square().sum()
    error = float(((total - kept).clamp_min(0) / total).sqrt()) if total > 0 else 0.0
    return lora_a, lora_b, error


def _check_pair(finetune: LazyModel, base: LazyModel) -> None:
    only = sorted(set(finetune.names) ^ set(base.names))
    if only:
        side = "fine-tune" if only[0] in finetune.names else "base"
        raise TensorError(f"{only[0]!r} is only in the {side} ({len(only)} tensor(s) are not in both models)")
    for name in finetune.names:
        if finetune.shape(name) != base.shape(name):
            raise TensorError(
                f"{name!r} has shape {list(finetune.shape(name))} in the fine-tune but {list(base.shape(name))} "
                "in the base (a resized vocabulary cannot become a LoRA of this base)"
            )


def _matches(module: str, patterns: Sequence[str]) -> bool:
    return any(re.search(pattern, module) for pattern in patterns)


def _check_options(options: ExtractOptions) -> None:
    if options.rank is None and options.energy is None:
        raise ConfigError("give --rank, --energy or both")
    if options.rank is not None and options.rank < 1:
        raise ConfigError(f"--rank must be at least 1, got {options.rank}")
    if options.energy is not None and not 0 < options.energy <= 1:
        raise ConfigError(f"--energy must be in (0, 1], got {options.energy}")
    if options.save_embeddings and options.embed_lora:
        raise ConfigError("--save-embeddings and --embed-lora exclude each other")
    for pattern in (*options.include, *options.exclude):
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"regex {pattern!r}: {error}") from None


class _Plan:
    """Which tensors become LoRA factors, which are saved whole, which are left out."""

    def __init__(self, finetune: LazyModel, options: ExtractOptions):
        arch = architecture_for_config(finetune.config, model_label="fine-tune")
        self.decomposed: list[str] = []
        self.saved: list[str] = []  # tensor names saved whole (modules_to_save)
        self.left_out: list[str] = []  # embeddings nobody asked for, bias deltas
        for name in finetune.names:
            module, _, param = name.rpartition(".")
            head = arch.role_of(name) in (Role.EMBEDDING, Role.LM_HEAD)
            save = name in arch.embeddings + arch.lm_head and options.save_embeddings
            save = save or _matches_module(module, options.save_modules)
            if save:
                self.saved.append(name)
            elif head and not options.embed_lora:
                self.left_out.append(name)
            elif len(finetune.shape(name)) == 2 and param == "weight":
                if (not options.include or _matches(module, options.include)) and not _matches(module, options.exclude):
                    self.decomposed.append(name)
            elif len(finetune.shape(name)) == 1 and param == "weight" and not options.skip_undecomposable:
                self.saved.append(name)  # a norm: 1-D, saved whole if it changed
            else:
                self.left_out.append(name)
        self.embeddings = set(arch.embeddings)


def _matches_module(module: str, names: Sequence[str]) -> bool:
    """peft's modules_to_save rule: the module is named, or its name ends with '.' + a given name."""
    return any(module == name or module.endswith("." + name) for name in names)


def _differs(finetune: LazyModel, base: LazyModel, name: str, device: str) -> bool:
    return not torch.equal(finetune.read(name, device=device), base.read(name, device=device))


def extract_lora(finetune_ref: str, base_ref: str, out: Path, options: ExtractOptions) -> ExtractReport:
    """Write a PEFT LoRA adapter of `finetune_ref − base_ref` to `out` (built aside, moved into place when done)."""
    _check_options(options)
    check_target(out, options.overwrite)
    started = time.perf_counter()
    finetune, base = LazyModel.open(finetune_ref), LazyModel.open(base_ref)
    _check_pair(finetune, base)
    plan = _Plan(finetune, options)
    if not plan.decomposed and not plan.saved:
        raise ConfigError("nothing to extract: every tensor is excluded")
    report = ExtractReport()
    factors: dict[str, torch.Tensor] = {}
    out_dtype = options.out_dtype
    bar = _progress(plan.decomposed, options.progress)
    for name in bar:
        module = name.removesuffix(".weight")
        out_dtype = out_dtype or finetune.dtype(name)
        task_vector = finetune.read(name, torch.float32, options.device)
        task_vector -= base.read(name, torch.float32, options.device)
        if not task_vector.any():
            continue  # unchanged: no factors (peft's zero-initialised B keeps it unchanged)
        embedding = name in plan.embeddings
        lora_a, lora_b, error = decompose(task_vector.T if embedding else task_vector, options)
        if lora_a.shape[0] == 0:
            continue
        kind = "lora_embedding_" if embedding else "lora_"
        suffix = "" if embedding else ".weight"
        factors[f"{PEFT_PREFIX}{module}.{kind}A{suffix}"] = lora_a.cpu()
        factors[f"{PEFT_PREFIX}{module}.{kind}B{suffix}"] = lora_b.cpu()
        report.ranks[module] = lora_a.shape[0]
        report.relative_errors[module] = error
    saved = [name for name in plan.saved if _differs(finetune, base, name, options.device)]
    report.modules_to_save = sorted({name.rpartition(".")[0] for name in saved})
    report.skipped = [name for name in plan.left_out if _differs(finetune, base, name, options.device)]
    if report.skipped:
        log.warning(
            "%d changed tensor(s) are not in the adapter, e.g. %s (embeddings need --save-embeddings or "
            "--embed-lora; biases and other tensors peft's LoRA cannot express are left out)",
            len(report.skipped),
            report.skipped[0],
        )
    if not report.ranks and not saved:
        raise ConfigError("the fine-tune equals the base in every extracted tensor: nothing to write")
    out_dtype = out_dtype or finetune.dtype(saved[0])
    with staged_output(out, options.overwrite) as staging:
        report.adapter_bytes = _write_adapter(staging, factors, saved, finetune, out_dtype)
        config = adapter_config(base_ref, report, saved)
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_card(staging, finetune_ref, base_ref, report, options)
    report.seconds = time.perf_counter() - started
    return report


def _progress(names: list[str], enabled: bool):
    if not enabled:
        return names
    from tqdm import tqdm

    return tqdm(names, desc="decomposing", unit="tensor")


def _write_adapter(
    folder: Path, factors: dict[str, torch.Tensor], saved: list[str], finetune: LazyModel, dtype: torch.dtype
) -> int:
    """One adapter_model.safetensors through the sharded writer (one shard); saved tensors stream from disk."""
    specs = [TensorSpec(name, tuple(tensor.shape), dtype) for name, tensor in factors.items()]
    specs += [TensorSpec(PEFT_PREFIX + name, finetune.shape(name), dtype) for name in saved]
    writer = ShardedWriter(folder, specs, max_shard_bytes=1 << 62)
    try:
        for name, tensor in factors.items():
            writer.write(name, tensor.to(dtype))
        for name in saved:
            writer.write(PEFT_PREFIX + name, finetune.read(name, dtype))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    (folder / INDEX_NAME).unlink()
    shard = next(folder.glob("model-00001-of-00001.safetensors"))
    shard.rename(folder / ADAPTER_FILE)
    return (folder / ADAPTER_FILE).stat().st_size


def adapter_config(base_ref: str, report: ExtractReport, saved: list[str]) -> dict:
    """peft's LoraConfig as JSON: r the largest rank, other ranks in rank_pattern, alpha = rank (scale 1)."""
    top = max(report.ranks.values(), default=1)
    others = {module: rank for module, rank in report.ranks.items() if rank != top}
    targets = sorted({module.rpartition(".")[2] for module in report.ranks})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": targets,
        "modules_to_save": sorted({name.rpartition(".")[0] for name in saved}) or None,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }


def _write_card(folder: Path, finetune_ref: str, base_ref: str, report: ExtractReport, options: ExtractOptions) -> None:
    ranks = sorted(set(report.ranks.values()))
    how = f"energy {options.energy}" if options.energy is not None else f"rank {options.rank}"
    if options.energy is not None and options.rank is not None:
        how += f", at most rank {options.rank}"
    card = (
        f"---\nbase_model: {json.dumps(hub_ids([base_ref]))}\nlibrary_name: peft\ntags: [lora, moemerge]\n---\n\n"
        f"# LoRA extracted from {finetune_ref}\n\n"
        f"The difference between `{finetune_ref}` and `{base_ref}`, by truncated SVD ({how}): "
        f"{len(report.ranks)} modules, ranks {ranks[0] if ranks else 0}–{ranks[-1] if ranks else 0}"
        + (f", {len(report.modules_to_save)} modules saved whole" if report.modules_to_save else "")
        + f".\n\nMade with moemerge {__version__} (`moemerge-lora extract`).\n"
    )
    (folder / "README.md").write_text(card)
