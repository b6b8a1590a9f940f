"""Run a multi-stage recipe: each stage merges into an intermediate folder that later stages read as a model.

An intermediate is complete once its marker file exists (written after the folder is in place) and records the
same fingerprint (the stage's document, the seed and its inputs' fingerprints): a rerun after a crash or a kill
reuses complete stages and redoes the rest. Intermediates live in a hidden folder beside the output (or in
`intermediate_dir`) and are removed once the final merge is written, unless kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from moemerge.config.stages import Stage
from moemerge.dense_merge import RunOptions, describe_plan, run_merge
from moemerge.errors import MoemergeError
from moemerge.io.loader import ModelPool
from moemerge.plan.dense_plan import model_references, plan_merge

log = logging.getLogger(__name__)

STAGE_MARKER = "moemerge_stage.json"


@dataclass(frozen=True)
class StagePaths:
    intermediate_dir: Path
    folders: dict[str, Path]  # stage name -> its output folder
    fingerprints: dict[str | None, str]


def default_intermediate_dir(out: Path) -> Path:
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.moemerge-stages"


def stage_paths(stages: list[Stage], out: Path, intermediate_dir: Path | None, random_seed: int) -> StagePaths:
    root = Path(intermediate_dir).expanduser().absolute() if intermediate_dir else default_intermediate_dir(out)
    fingerprints: dict[str | None, str] = {}
    for stage in stages:
        digest = hashlib.sha256(yaml.safe_dump(stage.document, sort_keys=True).encode())
        digest.update(f"seed={random_seed}".encode())
        for need in stage.needs:
            digest.update(fingerprints[need].encode())
        fingerprints[stage.name] = digest.hexdigest()
    folders = {stage.name: root / stage.name for stage in stages[:-1] if stage.name is not None}
    return StagePaths(root, folders, fingerprints)


def is_complete(folder: Path, fingerprint: str) -> bool:
    """The folder holds a finished merge of exactly this stage (marker present, fingerprint equal)."""
    try:
        return json.loads((folder / STAGE_MARKER).read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):
        return False


def _run_stage(
    stage: Stage,
    paths: StagePaths,
    target: Path,
    recipe_text: str | None,
    options: RunOptions,
    allow_crimes: bool,
    inputs: list[str] | None = None,
) -> None:
    recipe, document = stage.resolved(paths.folders)
    pool = ModelPool()
    try:
        plan = plan_merge(recipe, pool, allow_crimes=allow_crimes)
    except MoemergeError as error:
        raise type(error)(f"stage {stage.label}: {error}") from None
    text = recipe_text if recipe_text is not None else yaml.safe_dump(document, sort_keys=False)
    run_merge(plan, recipe, text, pool, target, options, inputs)


def open_inputs(stages: list[Stage], paths: StagePaths) -> list[str]:
    """Open every model the stages read that no stage writes (a typo in the last stage fails before the first
    merges); returns them, the chain's real inputs."""
    pool = ModelPool()
    inputs = []
    for stage in stages:
        for key, reference in model_references(stage.recipe):
            if reference.split("+", 1)[0] in paths.folders:
                continue  # another stage's output, written later
            try:
                pool.get(reference)
            except MoemergeError as error:
                raise type(error)(f"stage {stage.label}: {key}: {error}") from None
            inputs.append(reference)
    return list(dict.fromkeys(inputs))


def run_stages(
    stages: list[Stage],
    recipe_text: str,
    out: Path,
    options: RunOptions,
    *,
    intermediate_dir: Path | None = None,
    keep_intermediates: bool = False,
    allow_crimes: bool = False,
) -> Path:
    """Merge every stage in order, the last into `out`; complete intermediates from an earlier run are reused."""
    paths = stage_paths(stages, out, intermediate_dir, options.random_seed)
    inputs = open_inputs(stages, paths)
    intermediate_options = replace(options, overwrite=True)  # the intermediate folders are moemerge's own
    for index, stage in enumerate(stages[:-1], start=1):
        folder = paths.folders[stage.name]
        fingerprint = paths.fingerprints[stage.name]
        if is_complete(folder, fingerprint):
            log.info("stage %d/%d %s: complete in %s, reused", index, len(stages), stage.label, folder)
            continue
        log.info("stage %d/%d %s: merging into %s", index, len(stages), stage.label, folder)
        # a staging folder a killed run left beside `folder` is removed by staged_output (its owner is dead)
        _run_stage(stage, paths, folder, None, intermediate_options, allow_crimes)
        marker = {"stage": stage.name, "fingerprint": fingerprint}
        (folder / STAGE_MARKER).write_text(json.dumps(marker) + "\n")  # last: the stage is now complete
    log.info("stage %d/%d %s: merging into %s", len(stages), len(stages), stages[-1].label, out)
    _run_stage(stages[-1], paths, out, recipe_text, options, allow_crimes, inputs)
    if not keep_intermediates:
        for folder in paths.folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        if paths.intermediate_dir.is_dir() and not any(paths.intermediate_dir.iterdir()):
            paths.intermediate_dir.rmdir()
    return Path(out)


def describe_stages(stages: list[Stage], out: Path, options: RunOptions, intermediate_dir: Path | None = None) -> str:
    """The --dry-run chain: each stage, its inputs, where it goes, and the plan of stages whose inputs exist."""
    paths = stage_paths(stages, out, intermediate_dir, options.random_seed)
    lines = [f"{len(stages)} stages; intermediates in {paths.intermediate_dir}"]
    for index, stage in enumerate(stages, start=1):
        final = index == len(stages)
        target = Path(out) if final else paths.folders[stage.name]
        complete = not final and is_complete(target, paths.fingerprints[stage.name])
        models = _model_names(stage)
        status = "complete, reused" if complete else "to merge"
        lines.append(f"stage {index}/{len(stages)} {stage.label}: {stage.recipe.merge_method} of {', '.join(models)}")
        lines.append(f"  -> {target} ({status})")
        waiting = [need for need in stage.needs if not is_complete(paths.folders[need], paths.fingerprints[need])]
        if waiting:
            lines.append(f"  plan after {', '.join(map(repr, waiting))} exist")
        elif not complete:
            recipe, _ = stage.resolved(paths.folders)
            plan = plan_merge(recipe, ModelPool())
            lines += ["  " + line for line in describe_plan(plan).splitlines()]
    return "\n".join(lines)


def _model_names(stage: Stage) -> list[str]:
    recipe = stage.recipe
    groups = list(recipe.modules.values()) if recipe.modules else [recipe]
    names = [entry.model for group in groups for entry in group.models or []]
    names += [source.model for group in groups for piece in group.slices or [] for source in piece.sources]
    if recipe.base_model:
        names.append(recipe.base_model)
    return list(dict.fromkeys(names))
