"""`moemerge-split MODEL OUT`: take experts out of an MoE as dense models, or prune it to a smaller MoE."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from moemerge.cli.options import (
    allow_nonfinite_option,
    device_option,
    dry_run_option,
    max_memory_option,
    overwrite_option,
    quiet_option,
    resolve_device,
    shard_size_option,
    trust_remote_code_option,
    user_errors,
    verbose_option,
    workers_option,
)
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
from moemerge.split.dense import LayerMix, dense_config, dense_model_type, mix_width, plan_dense
from moemerge.split.experts import MoeSource
from moemerge.split.prune import check_prune_count, plan_pruned, pruned_config
from moemerge.split.report import require_matplotlib, write_report
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


@dataclass
class Output:
    """One model folder to write: its tensors, config and the recipe that describes it."""

    folder_name: str  # "" for OUT itself
    tensors: list[OutputTensor]
    config: dict
    recipe: dict
    mode: str
    title: str
    layers: dict = field(default_factory=dict)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--expert", type=int, help="Dense model from expert N of every layer.")
@click.option("--all-experts", is_flag=True, help="One dense model per expert: OUT/expert-00, OUT/expert-01, ...")
@click.option("--average", is_flag=True, help="Dense model from the average of all experts' weights (baseline only).")
@click.option("--calibration", type=click.Path(path_type=Path), help="Plain-text file run through the MoE.")
@click.option("--select", help="With --calibration: top-usage, or concat:K (the K most used experts per layer).")
@click.option("--prune-to", type=int, help="With --calibration: stay an MoE with the K best experts per layer.")
@click.option("--score", type=click.Choice(["reap", "frequency"]), default="reap", show_default=True)
@click.option("--report", type=click.Path(path_type=Path), help="Usage heatmap PNG (and JSON beside it).")
@click.option("--seq-len", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=65536, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@device_option
@max_memory_option
@workers_option
@shard_size_option
@overwrite_option
@allow_nonfinite_option
@trust_remote_code_option
@dry_run_option
@verbose_option
@quiet_option
@user_errors
def main(
    model: str,
    out: Path,
    expert: int | None,
    all_experts: bool,
    average: bool,
    calibration: Path | None,
    select: str | None,
    prune_to: int | None,
    score: str,
    report: Path | None,
    seq_len: int,
    max_tokens: int,
    batch_size: int,
    device: str,
    max_memory: int | None,
    workers: int | None,
    out_shard_size: int,
    overwrite: bool,
    allow_nonfinite: bool,
    trust_remote_code: bool,
    dry_run: bool,
    verbose: bool,
    quiet: bool,
) -> None:
    """Take experts out of the MoE at MODEL and write them to OUT (with --dry-run and --calibration, only the
    calibration pass, its plan and --report)."""
    mode = _mode(expert, all_experts, average, select, prune_to)
    source = MoeSource(LazyModel.open(model))
    selection = _check_mode(source, mode, expert, select, prune_to, calibration, report, score)
    text = read_calibration_text(calibration) if calibration is not None else None
    check_target(out, overwrite)
    device = resolve_device(device)
    if workers is not None:
        torch.set_num_threads(workers)  # the calibration pass's matrix products
    usage = None
    if text is not None:
        usage = collect_usage(
            source.model,
            text,
            num_experts=source.num_experts,
            seq_len=seq_len,
            max_tokens=max_tokens,
            batch_size=batch_size,
            device=device,
            max_memory=max_memory or default_max_memory(),
            trust_remote_code=trust_remote_code,
            progress=not quiet,
        )
    outputs = _plan(source, mode, expert, selection, prune_to, score, usage)
    for output in outputs:
        output.recipe = _recipe(model, output, usage, calibration, seq_len, max_tokens, score)
    if report is not None and usage is not None:
        selection_summary = {o.folder_name or "out": o.layers for o in outputs}
        json_file = write_report(report, usage, model_label=model, selection=selection_summary)
        log.info("usage report: %s and %s", report, json_file)
    if dry_run:
        _print_plan(source, outputs, out)
        return
    with staged_output(out, overwrite) as staging:
        for output in outputs:
            _write(
                source,
                output,
                staging / output.folder_name if output.folder_name else staging,
                model,
                out_shard_size,
                quiet,
                allow_nonfinite,
                max_memory,
                workers,
            )
    log.info("wrote %s", out)


def _mode(expert: int | None, all_experts: bool, average: bool, select: str | None, prune_to: int | None) -> str:
    chosen = [
        name
        for name, given in (
            ("--expert", expert is not None),
            ("--all-experts", all_experts),
            ("--average", average),
            ("--select", select is not None),
            ("--prune-to", prune_to is not None),
        )
        if given
    ]
    if len(chosen) != 1:
        given = f" (got {', '.join(chosen)})" if chosen else ""
        raise MoemergeError(
            f"choose exactly one of --expert N, --all-experts, --average, --select, --prune-to K{given}"
        )
    return chosen[0].removeprefix("--")


def _check_mode(
    source: MoeSource,
    mode: str,
    expert: int | None,
    select: str | None,
    prune_to: int | None,
    calibration: Path | None,
    report: Path | None,
    score: str,
) -> Selection | None:
    """Every user error that can be caught before a tensor is read."""
    if mode != "prune-to":
        dense_model_type(source)
    if mode in ("select", "prune-to") and calibration is None:
        raise MoemergeError(f"--{mode} needs --calibration FILE: the choice depends on how the router uses experts")
    if report is not None:
        if calibration is None:
            raise MoemergeError("--report needs --calibration FILE: the report shows usage on that text")
        require_matplotlib()
    if score != "reap" and mode != "prune-to":
        raise MoemergeError("--score only applies to --prune-to")
    if mode == "expert":
        assert expert is not None
        source.check_expert(expert)
    if mode == "prune-to":
        assert prune_to is not None
        check_prune_count(source, prune_to)
    return parse_select(select, source.num_experts) if select is not None else None


def _plan(
    source: MoeSource,
    mode: str,
    expert: int | None,
    selection: Selection | None,
    prune_to: int | None,
    score: str,
    usage: RouterUsage | None,
) -> list[Output]:
    if mode == "prune-to":
        assert usage is not None and prune_to is not None
        kept = {layer: experts_to_keep(usage, layer, prune_to, score) for layer in source.moe_layers}
        return [
            Output(
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
        experts = [expert] if mode == "expert" else list(range(source.num_experts))
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
    """Fixed stand-in for the shared expert's gate sigmoid(w·x): its calibration mean, or 1.0 without calibration."""
    if usage is None or not source.has_shared_expert:
        return {layer: 1.0 for layer in source.moe_layers}
    return {layer: float(usage.mean_shared_gate[layer]) for layer in source.moe_layers}


def _dense_output(source: MoeSource, folder_name: str, mode: str, title: str, mixes: dict[int, LayerMix]) -> Output:
    widths = {mix_width(source, mix) for mix in mixes.values()}
    assert len(widths) == 1, "every layer's mix has the same width"
    layers = {layer: mix.describe() for layer, mix in mixes.items()}
    if source.has_shared_expert:
        for layer, mix in mixes.items():
            layers[layer]["shared_expert_scale"] = round(mix.shared_scale, 6)
    return Output(folder_name, plan_dense(source, mixes), dense_config(source, widths.pop()), {}, mode, title, layers)


def _recipe(
    model: str,
    output: Output,
    usage: RouterUsage | None,
    calibration: Path | None,
    seq_len: int,
    max_tokens: int,
    score: str,
) -> dict:
    recipe: dict = {"model": model, "mode": output.mode, "output": output.title}
    if output.mode == "prune":
        recipe["score"] = score
    if usage is not None and calibration is not None:
        recipe["calibration"] = {
            "file": calibration.name,
            "sha256": hashlib.sha256(calibration.read_bytes()).hexdigest(),
            "tokens": usage.tokens,
            "seq_len": seq_len,
            "max_tokens": max_tokens,
        }
    recipe["output_model_type"] = output.config.get("model_type")
    recipe["layers"] = {int(layer): described for layer, described in output.layers.items()}
    return recipe


def _write(
    source: MoeSource,
    output: Output,
    folder: Path,
    model: str,
    shard_size: int,
    quiet: bool,
    allow_nonfinite: bool = False,
    max_memory: int | None = None,
    workers: int | None = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_tensors(
        folder,
        output.tensors,
        max_shard_bytes=shard_size,
        progress=not quiet,
        description="splitting",
        allow_nonfinite=allow_nonfinite,
        max_memory=max_memory,
        workers=workers,
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


def _print_plan(source: MoeSource, outputs: list[Output], out: Path) -> None:
    click.echo(
        f"{source.model.label}: {source.config.get('model_type')} with {len(source.moe_layers)} MoE layers × "
        f"{source.num_experts} experts ({source.experts_per_token} per token)"
        f"{', shared expert' if source.has_shared_expert else ''}"
        f"{', fused expert tensors' if source.fused else ''}"
    )
    for output in outputs:
        size = sum(tensor.spec.nbytes for tensor in output.tensors)
        target = out / output.folder_name if output.folder_name else out
        click.echo(
            f"{target}: {output.title}: {output.config.get('model_type')}, {len(output.tensors)} tensors, "
            f"{size / 1e6:.1f} MB"
        )
        for layer, described in output.layers.items():
            click.echo(f"  layer {layer}: {described}")
