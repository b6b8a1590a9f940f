"""`moemerge-moe CONFIG OUT`: assemble a Mixtral / Qwen2-MoE / Qwen3-MoE from dense models (a shell over
`moemerge.build_moe`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from moemerge.cli.options import (
    COMMAND_SETTINGS,
    copy_tokenizer_option,
    dry_run_option,
    executor_option,
    mergekit_flags,
    quiet_option,
    ray_address_option,
    seed_option,
    trust_remote_code_option,
    user_errors,
    verbose_option,
    version_option,
    write_options,
)


@click.command(context_settings=COMMAND_SETTINGS)
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@write_options
@seed_option
@executor_option
@ray_address_option
@copy_tokenizer_option
@trust_remote_code_option
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
    type=click.Choice(["source", "loss", "posterior"]),
    default="posterior",
    show_default=True,
    help="gate_mode fitted: route each calibration token to the expert whose text it is from, to the expert "
    "whose model predicts its next token best (loss), or in proportion to how well each expert's model predicts "
    "it (posterior: softmax of minus the experts' losses).",
)
@click.option(
    "--fit-window",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="gate_mode fitted, posterior labels: sum each expert's losses over this many tokens ending at the token "
    "(1: the token alone).",
)
@version_option
@user_errors
@mergekit_flags(
    "lazy_unpickle",
    "low_cpu_memory",
    "clone_tensors",
    "lora_merge_cache",
    "understand_untrained",
    allow_crimes="experts of another architecture than the base are always refused",
)
def main(
    config_path: Path,
    out: Path,
    random_seed: int,
    executor: str,
    ray_address: str | None,
    copy_tokenizer: bool,
    trust_remote_code: bool,
    dry_run: bool,
    verbose: bool,
    quiet: bool,
    hidden_pool: str,
    router_input: str,
    fit_labels: str,
    fit_window: int,
    **write: Any,
) -> None:
    """Assemble the mixture of experts described by a mergekit-moe YAML recipe into OUT.

    Model paths in the recipe are relative to the current working directory.
    """
    from moemerge.api import build_moe

    result = build_moe(
        config_path,
        out,
        random_seed=random_seed,
        executor=executor,
        ray_address=ray_address,
        router_input=router_input,
        fit_labels=fit_labels,
        fit_window=fit_window,
        copy_tokenizer=copy_tokenizer,
        trust_remote_code=trust_remote_code,
        hidden_pool=hidden_pool,
        progress=not quiet,
        dry_run=dry_run,
        verbose_plan=verbose,
        **write,
    )
    if dry_run or not quiet:
        click.echo(str(result))
