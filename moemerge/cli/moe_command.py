"""`moemerge-moe CONFIG OUT`: assemble a Mixtral / Qwen2-MoE / Qwen3-MoE model from dense models."""

from __future__ import annotations

from pathlib import Path

import click

from moemerge.cli.options import (
    allow_nonfinite_option,
    copy_tokenizer_option,
    device_option,
    dry_run_option,
    executor_option,
    max_memory_option,
    overwrite_option,
    quiet_option,
    ray_address_option,
    resolve_device,
    seed_option,
    shard_size_option,
    trust_remote_code_option,
    user_errors,
    verbose_option,
    workers_option,
)
from moemerge.config.moe_recipe import load_moe_recipe
from moemerge.io.loader import ModelPool
from moemerge.moe.assemble import MoeOptions, assemble_moe, describe, output_dtype, prepare


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@device_option
@seed_option
@shard_size_option
@max_memory_option
@workers_option
@executor_option
@ray_address_option
@copy_tokenizer_option
@trust_remote_code_option
@overwrite_option
@allow_nonfinite_option
@dry_run_option
@verbose_option
@quiet_option
@click.option(
    "--hidden-pool",
    type=click.Choice(["last", "mean"]),
    default="last",
    show_default=True,
    help="gate_mode hidden: use each prompt's last real token, or the mean over its real tokens.",
)
@click.option(
    "--router-input",
    type=click.Choice(["layer", "mlp"]),
    default="layer",
    show_default=True,
    help="gate_mode hidden: the state entering each layer (mergekit), or the state entering its MLP, after "
    "attention and its norm (what the router multiplies).",
)
@click.option(
    "--fit-labels",
    type=click.Choice(["source", "loss"]),
    default="source",
    show_default=True,
    help="gate_mode fitted: route each calibration token to the expert whose text it is from, or to the expert "
    "whose model predicts its next token best.",
)
@user_errors
def main(
    config_path: Path,
    out: Path,
    device: str,
    random_seed: int,
    out_shard_size: int,
    max_memory: int | None,
    workers: int | None,
    executor: str,
    ray_address: str | None,
    copy_tokenizer: bool,
    trust_remote_code: bool,
    overwrite: bool,
    allow_nonfinite: bool,
    dry_run: bool,
    verbose: bool,
    quiet: bool,
    hidden_pool: str,
    router_input: str,
    fit_labels: str,
) -> None:
    """Assemble the mixture of experts described by a mergekit-moe YAML recipe into OUT."""
    recipe, recipe_data = load_moe_recipe(config_path)
    if dry_run:
        sources, planned, _ = prepare(recipe, ModelPool())
        click.echo(describe(recipe, sources, planned, output_dtype(recipe, sources)))
        return
    options = MoeOptions(
        device=resolve_device(device),
        random_seed=random_seed,
        max_shard_bytes=out_shard_size,
        copy_tokenizer=copy_tokenizer,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        hidden_pool=hidden_pool,
        progress=not quiet,
        max_memory=max_memory,
        workers=workers,
        executor=executor,
        ray_address=ray_address,
        router_input=router_input,
        fit_labels=fit_labels,
    )
    assemble_moe(recipe, recipe_data, out, options)
    if not quiet:
        click.echo(f"wrote {out}")
