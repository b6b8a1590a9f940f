"""`moemerge-yaml CONFIG OUT`: a dense merge from a mergekit-style YAML recipe."""

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
from moemerge.config.stages import load_stages
from moemerge.io.loader import ModelPool
from moemerge.io.output_dir import check_target
from moemerge.merge import RunOptions, describe_plan, run_merge
from moemerge.plan.dense_plan import plan_merge
from moemerge.stages import describe_stages, run_stages


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@device_option
@seed_option
@shard_size_option
@max_memory_option
@workers_option
@copy_tokenizer_option
@click.option("--allow-crimes", is_flag=True, help="Skip inputs whose tensor shapes do not match instead of failing.")
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
@overwrite_option
@allow_nonfinite_option
@dry_run_option
@verbose_option
@quiet_option
@click.option("--cuda", is_flag=True, hidden=True, help="mergekit spelling of --device cuda.")
@click.option(
    "--lazy-unpickle",
    "--low-cpu-memory",
    "mergekit_noop",
    is_flag=True,
    hidden=True,
    help="Accepted for mergekit compatibility; moemerge always streams.",
)
@user_errors
def main(
    config_path: Path,
    out: Path,
    device: str,
    random_seed: int,
    out_shard_size: int,
    max_memory: int,
    workers: int | None,
    copy_tokenizer: bool,
    allow_crimes: bool,
    executor: str,
    ray_address: str | None,
    intermediate_dir: Path | None,
    keep_intermediates: bool,
    trust_remote_code: bool,
    overwrite: bool,
    allow_nonfinite: bool,
    dry_run: bool,
    verbose: bool,
    quiet: bool,
    cuda: bool,
    mergekit_noop: bool,
) -> None:
    """Merge the models of a YAML recipe (mergekit format; several `---` documents: a multi-stage recipe) into OUT."""
    stages, recipe_text = load_stages(config_path)
    if not dry_run:
        check_target(out, overwrite)
    device = resolve_device("cuda" if cuda else device)
    options = RunOptions(
        device=device,
        random_seed=random_seed,
        out_shard_size=out_shard_size,
        max_memory=max_memory,
        workers=workers,
        copy_tokenizer=copy_tokenizer,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        progress=not quiet,
        executor=executor,
        ray_address=ray_address,
    )
    if len(stages) > 1:
        if dry_run:
            click.echo(describe_stages(stages, out, options, intermediate_dir))
            return
        stage_options = {"keep_intermediates": keep_intermediates, "allow_crimes": allow_crimes}
        run_stages(stages, recipe_text, out, options, intermediate_dir=intermediate_dir, **stage_options)
        if not quiet:
            click.echo(f"wrote {out}")
        return
    recipe = stages[0].recipe
    pool = ModelPool()
    plan = plan_merge(recipe, pool, allow_crimes=allow_crimes)
    if dry_run:
        click.echo(describe_plan(plan))
        return
    run_merge(plan, recipe, recipe_text, pool, out, options)
    if not quiet:
        click.echo(f"wrote {out}")
