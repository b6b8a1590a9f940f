"""CMA-ES over a recipe template's genes; each generation's candidates are merged and scored as Ray tasks.

Everything a search learns goes to `results.jsonl` in its folder, one line per scored candidate, as soon as
it is scored. The optimiser's state is never pickled: `--resume` rebuilds it by replaying the recorded
generations (CMA-ES with the same seed asks the same points again; the recorded scores are told back), then
scores only the candidates that are missing. So a resumed search ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from moemerge.errors import ConfigError, MoemergeError, install_hint
from moemerge.evolve.objective import Objective
from moemerge.evolve.space import SearchSpace

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
SETTINGS = "search.json"
BEST = "best.yml"
PLOT = "scores.png"
FAILED_SCORE = 1e30  # what a candidate whose merge or scoring failed tells the optimiser


@dataclass(frozen=True)
class SearchSettings:
    population: int = 8
    generations: int = 10
    seed: int = 0
    sigma: float = 0.25  # initial step size in the unit cube
    max_concurrent: int | None = None  # candidates scored at once (default: the population)
    task_cpus: float = 1.0
    task_gpus: float = 0.0
    task_memory: int | None = None  # bytes Ray reserves per candidate
    ray_address: str | None = None


@dataclass
class SearchResult:
    best_score: float
    best_recipe: dict
    evaluated: int  # candidates scored in this run (not replayed)
    generations: int


def _read_results(folder: Path) -> dict[tuple[int, int], dict]:
    recorded = {}
    path = folder / RESULTS
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                recorded[entry["generation"], entry["index"]] = entry
    return recorded


def _identity(template: dict, objective: Objective, settings: SearchSettings) -> dict:
    """What a resumed search must share with the recorded one for the replay to be valid."""
    fixed = {key: value for key, value in asdict(settings).items() if key in ("population", "seed", "sigma")}
    return {"template": template, "objective": asdict(objective), "settings": fixed}


def _prepare_folder(folder: Path, identity: dict, resume: bool, overwrite: bool) -> None:
    settings_file = folder / SETTINGS
    if resume:
        if not settings_file.exists():
            raise ConfigError(f"--resume: {folder} holds no search to resume ({SETTINGS} is missing)")
        if json.loads(settings_file.read_text()) != json.loads(json.dumps(identity)):
            raise ConfigError(f"--resume: {folder} was searched with another template, objective, seed or population")
        return
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise ConfigError(f"{folder} is not empty; pass --resume to continue its search or --overwrite to restart")
        for name in (RESULTS, SETTINGS, BEST, PLOT):
            (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(identity, indent=2) + "\n")


def run_search(
    template: dict,
    objective: Objective,
    folder: Path,
    settings: SearchSettings,
    *,
    resume: bool = False,
    overwrite: bool = False,
    report: Callable[[str], None] = print,
) -> SearchResult:
    """Search `template`'s ranges for the lowest objective; results, best recipe and plot go to `folder`."""
    from cmaes import CMA

    from moemerge.distributed.ray_shards import start_ray
    from moemerge.evolve.objective import score_candidate

    space = SearchSpace(template)
    _check_models(space, objective)
    folder = Path(folder)
    _prepare_folder(folder, _identity(template, objective, settings), resume, overwrite)
    recorded = _read_results(folder)
    optimiser = CMA(
        mean=np.full(space.dimension, 0.5),
        sigma=settings.sigma,
        bounds=np.array([[0.0, 1.0]] * space.dimension),
        seed=settings.seed,
        population_size=settings.population,
    )
    ray = None
    evaluated = 0
    history: list[list[float]] = []
    with open(folder / RESULTS, "a") as results:
        for generation in range(settings.generations):
            points = [optimiser.ask() for _ in range(settings.population)]
            scores: dict[int, float] = {}
            for index, point in enumerate(points):
                entry = recorded.get((generation, index))
                if entry is not None:
                    if not np.allclose(entry["x"], point, rtol=0, atol=1e-9):
                        raise MoemergeError(f"--resume: generation {generation} differs from the recorded search")
                    scores[index] = entry["score"]
            missing = [index for index in range(settings.population) if index not in scores]
            started = time.monotonic()
            if missing:
                if ray is None:
                    ray = start_ray(settings.ray_address, os.cpu_count())
                for index, outcome in _score_on_ray(ray, space, points, missing, objective, settings, score_candidate):
                    entry = {
                        "generation": generation,
                        "index": index,
                        "x": [float(v) for v in points[index]],
                        "values": space.values(points[index]),
                        **outcome,
                    }
                    results.write(json.dumps(entry) + "\n")
                    results.flush()
                    scores[index] = entry["score"]
                    evaluated += 1
            optimiser.tell([(points[index], scores[index]) for index in range(settings.population)])
            history.append([scores[index] for index in range(settings.population)])
            _write_best(folder, space)
            best_now = min(history[-1])
            best_all = min(min(row) for row in history)
            median, seconds = statistics.median(history[-1]), time.monotonic() - started
            report(
                f"generation {generation + 1}/{settings.generations}: best {best_now:.4g} (overall {best_all:.4g}), "
                f"median {median:.4g}, {len(missing)} scored in {seconds:.1f} s"
            )
    _plot(folder / PLOT, history)
    best = _write_best(folder, space)
    return SearchResult(best["score"], space.render(best["x"]), evaluated, settings.generations)


def _check_models(space: SearchSpace, objective: Objective) -> None:
    """The template's models open and share one architecture (or --allow-crimes), checked once here, where an
    error is one line, instead of failing every candidate on the workers. The genes change numbers, not models."""
    from moemerge.config.merge_recipe import parse_merge_recipe
    from moemerge.io.loader import ModelPool
    from moemerge.plan.dense_plan import open_models

    middle = space.render(np.full(space.dimension, 0.5))
    open_models(parse_merge_recipe(middle, "template"), ModelPool(), allow_crimes=objective.allow_crimes)


def _score_on_ray(ray, space, points, missing, objective, settings, score_candidate):
    """Yield (index, outcome) as candidates finish, at most `max_concurrent` in flight."""
    options = {"num_cpus": settings.task_cpus, "num_gpus": settings.task_gpus, "max_retries": 1}
    if settings.task_memory:
        options["memory"] = settings.task_memory
    remote = ray.remote(**options)(score_candidate)
    limit = settings.max_concurrent or len(missing)
    queue = list(missing)
    in_flight: dict = {}
    try:
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                index = queue.pop(0)
                in_flight[remote.remote(space.render(points[index]), objective)] = index
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                index = in_flight.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    cause = getattr(error, "cause", error)
                    if not isinstance(cause, MoemergeError | ValueError | RuntimeError):
                        raise
                    log.warning("candidate %d failed: %s", index, str(cause).splitlines()[-1])
                    outcome = {"score": FAILED_SCORE, "parts": {}, "seconds": 0.0, "error": str(cause)[-500:]}
                if not math.isfinite(outcome["score"]):
                    outcome["score"] = FAILED_SCORE
                yield index, outcome
    except BaseException:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        raise


def _write_best(folder: Path, space: SearchSpace) -> dict:
    """The best candidate so far, as a plain recipe `moemerge-yaml` runs (written atomically)."""
    entries = list(_read_results(folder).values())
    best = min(entries, key=lambda entry: (entry["score"], entry["generation"], entry["index"]))
    text = (
        f"# moemerge-evolve: best of {len(entries)} candidates, score {best['score']:.6g} "
        f"(generation {best['generation'] + 1}, candidate {best['index']})\n"
        + yaml.safe_dump(space.render(best["x"]), sort_keys=False)
    )
    partial = folder / f".{BEST}.partial"
    partial.write_text(text)
    os.replace(partial, folder / BEST)
    return best


def _plot(path: Path, history: list[list[float]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no %s (%s)", path.name, install_hint("evolve", "matplotlib"))
        return
    generations = range(1, len(history) + 1)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    finite = [[score for score in row if score < FAILED_SCORE] or [math.nan] for row in history]
    axes.plot(generations, [min(row) for row in finite], marker="o", label="best of generation")
    axes.plot(generations, [statistics.median(row) for row in finite], marker=".", label="median")
    axes.plot(generations, np.minimum.accumulate([min(row) for row in finite]), linestyle="--", label="best so far")
    axes.set_xlabel("generation")
    axes.set_ylabel("score (lower is better)")
    axes.set_title("moemerge-evolve")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
