"""`moemerge-yaml CONFIG OUT`: a dense merge from a mergekit-style YAML recipe (a shell over `moemerge.merge`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from moemerge.cli.options import (
    COMMAND_SETTINGS,
    allow_crimes_option,
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
@copy_tokenizer_option
@allow_crimes_option
@executor_option
@ray_address_option
@click.option(
    "--intermediate-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Multi-stage recipes: where intermediate merges go (default: a hidden folder beside OUT).",
)
@click.option("--keep-intermediates", is_flag=True, help="Multi-stage recipes: keep the intermediate merges.")
@trust_remote_code_option
@dry_run_option
@verbose_option
@quiet_option
@version_option
@user_errors
@mergekit_flags("lazy_unpickle", "low_cpu_memory", "clone_tensors", "lora_merge_cache")
def main(
    config_path: Path,
    out: Path,
    random_seed: int,
    copy_tokenizer: bool,
    allow_crimes: bool,
    executor: str,
    ray_address: str | None,
    intermediate_dir: Path | None,
    keep_intermediates: bool,
    trust_remote_code: bool,
    dry_run: bool,
    verbose: bool,
    quiet: bool,
    **write: Any,
) -> None:
    """Merge the models of a YAML recipe (mergekit format; several `---` documents: a multi-stage recipe) into OUT.

    Model paths in the recipe are relative to the current working directory; anything else of the form
    org/name is looked up on the Hugging Face hub (or its local cache).
    """
    from moemerge.api import merge

    result = merge(
        config_path,
        out,
        random_seed=random_seed,
        copy_tokenizer=copy_tokenizer,
        allow_crimes=allow_crimes,
        progress=not quiet,
        executor=executor,
        ray_address=ray_address,
        intermediate_dir=intermediate_dir,
        keep_intermediates=keep_intermediates,
        dry_run=dry_run,
        verbose_plan=verbose,
        **write,
    )
    if dry_run or not quiet:
        click.echo(str(result))
