"""`moemerge-evolve CONFIG OUT`: search a recipe template's parameter ranges with CMA-ES, candidates scored on Ray."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from moemerge.cli.options import (
    COMMAND_SETTINGS,
    allow_crimes_option,
    memory_size,
    quiet_option,
    user_errors,
    verbose_option,
    version_option,
)


@click.command(context_settings=COMMAND_SETTINGS)
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--population", type=click.IntRange(min=2), default=8, show_default=True, help="Candidates per generation."
)
@click.option("--generations", type=click.IntRange(min=1), default=10, show_default=True, help="Generations to run.")
@click.option("--random-seed", "seed", type=int, default=0, show_default=True, help="Seed of the search.")
@click.option(
    "--sigma",
    type=click.FloatRange(min=0, min_open=True),
    default=0.25,
    show_default=True,
    help="Initial CMA-ES step, as a share of each range.",
)
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None, help="Candidates scored at once.")
@click.option("--task-cpus", type=float, default=1.0, show_default=True, help="CPUs Ray reserves per candidate.")
@click.option("--task-gpus", type=float, default=0.0, show_default=True, help="GPUs Ray reserves per candidate.")
@click.option(
    "--task-memory", default=None, callback=memory_size, help="Memory Ray reserves per candidate, with a unit (8G)."
)
@click.option("--ray-address", default=None, help="Join this Ray cluster (default: start a local Ray).")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where candidates are scored (in the Ray workers).",
)
@allow_crimes_option
@click.option("--resume", is_flag=True, help="Continue the search recorded in OUT.")
@click.option("--overwrite", is_flag=True, help="Start over in a non-empty OUT.")
@verbose_option
@quiet_option
@version_option
@user_errors
def main(
    config_path: Path,
    out: Path,
    population: int,
    generations: int,
    seed: int,
    sigma: float,
    max_concurrent: int | None,
    task_cpus: float,
    task_gpus: float,
    task_memory: int | None,
    ray_address: str | None,
    device: str,
    allow_crimes: bool,
    resume: bool,
    overwrite: bool,
    verbose: bool,
    quiet: bool,
) -> None:
    """Search the ranges ({min, max}) of the recipe template in CONFIG; results and the best recipe go to OUT."""
    from moemerge.config.merge_recipe import read_yaml_documents
    from moemerge.errors import ConfigError
    from moemerge.evolve.objective import objective_from_config
    from moemerge.evolve.search import BEST, SearchSettings, run_search

    documents, _ = read_yaml_documents(config_path)
    if len(documents) != 1:
        raise ConfigError(f"{config_path.name}: give one YAML document with 'template' and 'objective'")
    data = documents[0]
    unknown = set(data) - {"template", "objective"}
    if unknown or "template" not in data or "objective" not in data:
        raise ConfigError(f"{config_path.name}: give exactly the keys 'template' and 'objective'")
    if not isinstance(data["objective"], dict) or not isinstance(data["template"], dict):
        raise ConfigError(f"{config_path.name}: 'template' and 'objective' must be mappings")
    objective = replace(
        objective_from_config(data["objective"], config_path.parent),
        device=device,
        allow_crimes=allow_crimes,
    )
    settings = SearchSettings(
        population, generations, seed, sigma, max_concurrent, task_cpus, task_gpus, task_memory, ray_address
    )
    report = (lambda _line: None) if quiet else click.echo
    result = run_search(data["template"], objective, out, settings, resume=resume, overwrite=overwrite, report=report)
    if not quiet:
        click.echo(f"best score {result.best_score:.6g}; recipe: {out / BEST} (run it with moemerge-yaml)")
