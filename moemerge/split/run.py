"""Wire expert extraction together: MoE folder → mode check → calibration → plan → streamed folders, configs, cards.

The `moemerge-split` command and `moemerge.split(...)` both call `split_model`; everything that can fail on
configs, headers and options alone fails in `prepare_split`, before the calibration pass or any tensor read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moemerge.errors import MoemergeError
from moemerge.executor import OutputTensor, default_max_memory, write_tensors
from moemerge.io.loader import LazyModel
from moemerge.io.model_folder import (
    copy_generation_config,
    copy_tokenizer,
    write_config,
    write_model_card,
    write_recipe,
)
from moemerge.io.output_dir import check_target, staged_output
from moemerge.io.summary import Stage, no_stage
from moemerge.split.dense import LayerMix, dense_config, dense_model_type, mix_width, plan_dense
from moemerge.split.describe import describe_split
from moemerge.split.experts import MoeSource
from moemerge.split.prune import check_prune_count, plan_pruned, pruned_config
from moemerge.split.report import ReportMarks, require_matplotlib, write_report
from moemerge.split.select import Selection, experts_to_keep, most_used, parse_select
from moemerge.split.usage import RouterUsage, collect_usage, read_calibration_text

log = logging.getLogger("moemerge.split")
RECIPE_FILE = "moemerge_split_config.yml"

EXPECTATIONS = {
    "expert": "One expert's MLP in every layer under the MoE's shared attention. An expert is not a model: expect "
    "much worse text than the MoE (often gibberish) unless the MoE was assembled from dense models.",
    "average": "The average of all experts' weights in every layer: a baseline only; expect gibberish.",
    "top-usage": "Per layer the expert the router picked most on the calibration text: better than a fixed "
    "expert, still far below the MoE.",
    "concat": "Per layer the K most used experts joined into one wider MLP, each scaled by its mean routing "
    "weight on the calibration text: an exact dense rewrite of that fixed mixture, the best dense option.",
    "prune": "Still an MoE, with the K best experts per layer kept and the router sliced to match: the option "
    "that keeps quality best.",
}


@dataclass(frozen=True)
class SplitOptions:
    """What to take out of the MoE (exactly one of expert / all_experts / average / select / prune_to) and how."""

    expert: int | None = None
    all_experts: bool = False
    average: bool = False
    select: str | None = None  # top-usage, or concat:K
    prune_to: int | None = None
    calibration: Path | None = None
    usage: Path | None = None  # a report's JSON from an earlier calibration pass, instead of `calibration`
    score: str = "reap"
    report: Path | None = None
    seq_len: int = 256
    max_tokens: int = 65536
    batch_size: int = 8
    device: str = "cpu"
    max_shard_bytes: int = 5 * 10**9
    overwrite: bool = False
    allow_nonfinite: bool = False  # write NaN/Inf (or float16 overflow) with a warning instead of failing
    trust_remote_code: bool = False
    progress: bool = True
    max_memory: int | None = None
    workers: int | None = None

    @property
    def mode(self) -> str:
        """The one extraction mode asked for; a MoemergeError unless exactly one was given."""
        chosen = [
            name
            for name, given in (
                ("expert", self.expert is not None),
                ("all-experts", self.all_experts),
                ("average", self.average),
                ("select", self.select is not None),
                ("prune-to", self.prune_to is not None),
            )
            if given
        ]
        if len(chosen) != 1:
            given = f" (got {', '.join('--' + name for name in chosen)})" if chosen else ""
            raise MoemergeError(
                f"choose exactly one of --expert N, --all-experts, --average, --select, --prune-to K{given}"
            )
        return chosen[0]


@dataclass
class SplitOutput:
    """One model folder to write: its tensors, config and the recipe that describes it."""

    folder_name: str  # "" for OUT itself
    tensors: list[OutputTensor]
    config: dict
    recipe: dict
    mode: str
    title: str
    layers: dict = field(default_factory=dict)


@dataclass
class PreparedSplit:
    """The opened MoE and the checked options: nothing read but configs and headers."""

    model: str
    source: MoeSource
    options: SplitOptions
    mode: str
    selection: Selection | None
    calibration_text: str | None


def prepare_split(model: str, options: SplitOptions) -> PreparedSplit:
    """Every user error that can be caught before the calibration pass or a tensor read."""
    mode = options.mode
    source = MoeSource(LazyModel.open(model))
    if mode != "prune-to":
        dense_model_type(source)
    calibrated = options.calibration is not None or options.usage is not None
    if options.calibration is not None and options.usage is not None:
        raise MoemergeError("give --calibration FILE or --usage FILE.json, not both")
    if mode in ("select", "prune-to") and not calibrated:
        raise MoemergeError(
            f"--{mode} needs --calibration FILE (or --usage FILE.json from an earlier --report): "
            "the choice depends on how the router uses experts"
        )
    if options.report is not None:
        if not calibrated:
            raise MoemergeError("--report needs --calibration FILE or --usage FILE.json: it shows usage on that text")
        require_matplotlib()
    if options.score != "reap" and mode != "prune-to":
        raise MoemergeError("--score only applies to --prune-to")
    if options.expert is not None:
        source.check_expert(options.expert)
    if options.prune_to is not None:
        check_prune_count(source, options.prune_to)
    selection = parse_select(options.select, source.num_experts) if options.select is not None else None
    text = read_calibration_text(options.calibration) if options.calibration is not None else None
    return PreparedSplit(model, source, options, mode, selection, text)


def calibrate(prepared: PreparedSplit) -> RouterUsage | None:
    """The router statistics on the calibration text, or read from --usage (None without either)."""
    options = prepared.options
    if options.usage is not None:
        return load_usage(options.usage, prepared.source)
    if prepared.calibration_text is None:
        return None
    if options.workers is not None:
        torch.set_num_threads(options.workers)  # the calibration pass's matrix products
    return collect_usage(
        prepared.source.model,
        prepared.calibration_text,
        num_experts=prepared.source.num_experts,
        seq_len=options.seq_len,
        max_tokens=options.max_tokens,
        batch_size=options.batch_size,
        device=options.device,
        max_memory=options.max_memory or default_max_memory(),
        trust_remote_code=options.trust_remote_code,
        progress=options.progress,
    )


def load_usage(path: Path, source: MoeSource) -> RouterUsage:
    """Router statistics saved by an earlier `--report` (its JSON), checked against this MoE's shape."""
    try:
        usage = RouterUsage.from_dict(json.loads(Path(path).read_text()))
    except OSError as error:
        raise MoemergeError(f"--usage {path}: cannot read it ({error.strerror or error})") from None
    except (KeyError, TypeError, ValueError):
        raise MoemergeError(f"--usage {path}: not a usage JSON written by moemerge-split --report") from None
    if usage.counts.shape[1] != source.num_experts or not set(source.moe_layers) <= set(usage.moe_layers):
        raise MoemergeError(
            f"--usage {path}: recorded for {usage.counts.shape[1]} experts in layers {usage.moe_layers}, "
            f"but {source.model.label} has {source.num_experts} experts in layers {source.moe_layers}"
        )
    return usage


def plan_split(prepared: PreparedSplit, usage: RouterUsage | None) -> list[SplitOutput]:
    """The folders to write, each with its planned tensors, config and recipe."""
    outputs = _plan(prepared, usage)
    for output in outputs:
        output.recipe = _recipe(prepared, output, usage)
    return outputs


def split_model(
    model: str,
    out: Path,
    options: SplitOptions,
    *,
    dry_run: bool = False,
    per_tensor: bool = False,
    stage: Stage = no_stage,
) -> str | Path:
    """Write what `options` asks for to `out` (atomically); with dry_run, return the plan as text instead.

    `per_tensor` makes the dry-run table one row per tensor instead of per layer; `stage` times the named stages
    (calibration, plan, write) for -v.
    """
    prepared = prepare_split(model, options)
    if not dry_run:
        check_target(out, options.overwrite)
    with stage("calibration"):
        usage = calibrate(prepared)
    with stage("plan"):
        outputs = plan_split(prepared, usage)
    if options.report is not None and usage is not None:
        selection_summary = {o.folder_name or "out": o.layers for o in outputs}
        json_file = write_report(
            options.report,
            usage,
            model_label=model,
            selection=selection_summary,
            experts_per_token=prepared.source.experts_per_token,
            marks=report_marks(outputs),
        )
        log.info("usage report: %s and %s", options.report, json_file)
    score = options.score if prepared.mode == "prune-to" else None
    if dry_run:
        return describe_split(prepared.source, outputs, Path(out), usage, score=score, per_tensor=per_tensor)
    log.debug("plan:\n%s", describe_split(prepared.source, outputs, Path(out), usage, score=score))
    with stage("write"), staged_output(out, options.overwrite) as staging:
        for output in outputs:
            _write(prepared, output, staging / output.folder_name if output.folder_name else staging)
    return Path(out)


def report_marks(outputs: list[SplitOutput]) -> ReportMarks | None:
    """What the heatmap outlines: the experts kept per layer (pruning) or joined into the dense MLP (one output)."""
    if len(outputs) != 1 or outputs[0].mode == "average":
        return None
    output = outputs[0]
    if output.mode == "prune":
        kept = {layer: described["kept_experts"] for layer, described in output.layers.items()}
        count = len(next(iter(kept.values()), []))
        return ReportMarks(f"kept (--prune-to {count})", kept, pruned=True)
    return ReportMarks("in the dense MLP", {layer: described["experts"] for layer, described in output.layers.items()})


def _plan(prepared: PreparedSplit, usage: RouterUsage | None) -> list[SplitOutput]:
    source, mode, options, selection = prepared.source, prepared.mode, prepared.options, prepared.selection
    if mode == "prune-to":
        prune_to = options.prune_to
        assert usage is not None and prune_to is not None
        kept = {layer: experts_to_keep(usage, layer, prune_to, options.score) for layer in source.moe_layers}
        return [
            SplitOutput(
                "",
                plan_pruned(source, kept),
                pruned_config(source, prune_to),
                {},
                "prune",
                f"{prune_to} of {source.num_experts} experts per layer",
                layers={layer: {"kept_experts": experts} for layer, experts in kept.items()},
            )
        ]
    shared = _shared_scales(source, usage)
    if mode in ("expert", "all-experts"):
        experts = [options.expert] if mode == "expert" else list(range(source.num_experts))
        width = len(str(source.num_experts - 1))
        return [
            _dense_output(
                source,
                f"expert-{e:0{max(2, width)}d}" if mode == "all-experts" else "",
                "expert",
                f"expert {e}",
                {layer: LayerMix((e,), (1.0,), shared_scale=shared[layer]) for layer in source.moe_layers},
            )
            for e in experts
        ]
    if mode == "average":
        everyone = tuple(range(source.num_experts))
        mixes = {layer: LayerMix(everyone, (), average=True, shared_scale=shared[layer]) for layer in source.moe_layers}
        return [_dense_output(source, "", "average", "average of all experts", mixes)]
    assert selection is not None and usage is not None
    mixes = {}
    for layer in source.moe_layers:
        chosen = tuple(most_used(usage, layer, selection.count))
        if selection.kind == "top-usage":
            scales = (1.0,)
        else:
            scales = tuple(float(usage.mean_routing_weight[layer, e]) for e in chosen)
        mixes[layer] = LayerMix(chosen, scales, shared_scale=shared[layer])
    if selection.kind == "top-usage":
        return [_dense_output(source, "", "top-usage", "most used expert per layer", mixes)]
    return [_dense_output(source, "", "concat", f"{selection.count} most used experts per layer, concatenated", mixes)]


def _shared_scales(source: MoeSource, usage: RouterUsage | None) -> dict[int, float]:
    """Fixed stand-in for the shared expert's gate sigmoid(w·x): its calibration mean; without calibration exactly
    0.5 for an all-zero gate row (as moemerge-moe writes an ungated shared expert, its down projection doubled),
    else 1.0."""
    if usage is None or not source.has_shared_expert:
        return {layer: _uncalibrated_shared_scale(source, layer) for layer in source.moe_layers}
    return {layer: float(usage.mean_shared_gate[layer]) for layer in source.moe_layers}


def _uncalibrated_shared_scale(source: MoeSource, layer: int) -> float:
    gate = source.moe.shared_expert_gate
    if gate is None or not source.has_shared_expert:
        return 1.0
    name = source.arch.layer_name(layer, gate)
    return 0.5 if source.model.has(name) and not source.model.read(name).any() else 1.0


def _dense_output(
    source: MoeSource, folder_name: str, mode: str, title: str, mixes: dict[int, LayerMix]
) -> SplitOutput:
    widths = {mix_width(source, mix) for mix in mixes.values()}
    assert len(widths) == 1, "every layer's mix has the same width"
    layers = {layer: mix.describe() for layer, mix in mixes.items()}
    if source.has_shared_expert:
        for layer, mix in mixes.items():
            layers[layer]["shared_expert_scale"] = round(mix.shared_scale, 6)
    return SplitOutput(
        folder_name, plan_dense(source, mixes), dense_config(source, widths.pop()), {}, mode, title, layers
    )


def _recipe(prepared: PreparedSplit, output: SplitOutput, usage: RouterUsage | None) -> dict:
    options = prepared.options
    recipe: dict = {"model": prepared.model, "mode": output.mode, "output": output.title}
    if output.mode == "prune":
        recipe["score"] = options.score
    if usage is not None and options.usage is not None:
        recipe["calibration"] = {
            "usage_file": Path(options.usage).name,
            "sha256": hashlib.sha256(Path(options.usage).read_bytes()).hexdigest(),
            "tokens": usage.tokens,
        }
    if usage is not None and options.calibration is not None:
        recipe["calibration"] = {
            "file": Path(options.calibration).name,
            "sha256": hashlib.sha256(Path(options.calibration).read_bytes()).hexdigest(),
            "tokens": usage.tokens,
            "seq_len": options.seq_len,
            "max_tokens": options.max_tokens,
        }
    recipe["output_model_type"] = output.config.get("model_type")
    recipe["layers"] = {int(layer): described for layer, described in output.layers.items()}
    return recipe


def _write(prepared: PreparedSplit, output: SplitOutput, folder: Path) -> None:
    source, options, model = prepared.source, prepared.options, prepared.model
    folder.mkdir(parents=True, exist_ok=True)
    write_tensors(
        folder,
        output.tensors,
        max_shard_bytes=options.max_shard_bytes,
        progress=options.progress,
        description="splitting",
        allow_nonfinite=options.allow_nonfinite,
        max_memory=options.max_memory,
        workers=options.workers,
    )
    write_config(folder, output.config, out_dtype=source.part_dtype(source.moe_layers[0]))
    copy_tokenizer(source.model.folder, folder)
    copy_generation_config(source.model.folder, folder)
    recipe_text = write_recipe(folder, RECIPE_FILE, output.recipe)
    write_model_card(
        folder,
        title=f"{Path(model).name}: {output.title}",
        base_models=[model],
        summary=f"Made with `moemerge-split` from {model} ({output.mode}). {EXPECTATIONS[output.mode]}",
        recipe_text=recipe_text,
        extra_tags=["moemerge-split", "moe" if output.mode == "prune" else "dense"],
    )
