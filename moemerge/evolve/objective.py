"""What a candidate merge is scored by (lower is better), and scoring one candidate in a worker.

Three kinds: held-out perplexity on text files (built in; weighted geometric mean over the files), tasks of
lm-evaluation-harness (when `lm_eval` is installed: the score is minus the chosen metric's weighted mean), and a
user's Python callable `path/to/file.py:function` or `module:function`, called as
`function(state_dict=..., config=..., recipe=...)` and returning a float to minimise.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moemerge.errors import ConfigError, install_hint


@dataclass(frozen=True)
class TextFile:
    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class Objective:
    """Plain data, shipped to every Ray task."""

    kind: Literal["perplexity", "callable", "lm_eval"]
    texts: tuple[TextFile, ...] = ()
    function: str | None = None  # "file.py:name" or "module:name" (callable)
    tasks: tuple[TextFile, ...] = ()  # lm_eval task names with weights
    metric: str = "acc,none"
    limit: int | None = None  # lm_eval examples per task
    window: int = 256
    max_tokens: int = 16384
    batch_size: int = 8
    device: str = "cpu"
    allow_crimes: bool = False  # candidates may merge models of different architectures (--allow-crimes)
    extra: dict = field(default_factory=dict)


def objective_from_config(data: dict, base_dir: Path) -> Objective:
    """The `objective:` mapping of an evolve config: exactly one of perplexity, callable, lm_eval."""
    kinds = [kind for kind in ("perplexity", "callable", "lm_eval") if kind in data]
    if len(kinds) != 1:
        raise ConfigError("objective: give exactly one of perplexity, callable, lm_eval")
    kind = kinds[0]
    common = {key: data[key] for key in ("window", "max_tokens", "batch_size") if key in data}
    unknown = set(data) - {kind, "window", "max_tokens", "batch_size"}
    if unknown:
        raise ConfigError(f"objective.{sorted(unknown)[0]}: unknown key")
    if kind == "perplexity":
        return Objective(kind, texts=_weighted(data[kind], "file", base_dir, "objective.perplexity"), **common)
    if kind == "callable":
        if not isinstance(data[kind], str) or ":" not in data[kind]:
            raise ConfigError("objective.callable: give 'path/to/file.py:function' or 'module:function'")
        module, _, name = data[kind].rpartition(":")
        if module.endswith(".py"):
            module = str((base_dir / module).resolve())
        return Objective(kind, function=f"{module}:{name}", **common)
    spec = data[kind]
    if not isinstance(spec, dict) or "tasks" not in spec:
        raise ConfigError("objective.lm_eval: give {tasks: [...], metric: acc,none, limit: N}")
    return Objective(
        kind,
        tasks=_weighted(spec["tasks"], "task", None, "objective.lm_eval.tasks"),
        metric=spec.get("metric", "acc,none"),
        limit=spec.get("limit"),
        **common,
    )


def _weighted(entries: Any, key: str, base_dir: Path | None, where: str) -> tuple[TextFile, ...]:
    """A list of names or {key: name, weight: w} mappings."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: give a list of {key}s (optionally as {{{key}: ..., weight: ...}})")
    parsed = []
    for index, entry in enumerate(entries):
        name, weight = (entry, 1.0) if isinstance(entry, str) else (entry.get(key), entry.get("weight", 1.0))
        if not isinstance(name, str) or not isinstance(weight, int | float) or weight <= 0:
            raise ConfigError(f"{where}[{index}]: give a {key} name and a positive weight")
        if base_dir is not None:
            path = (base_dir / name).resolve()
            if not path.is_file():
                raise ConfigError(f"{where}[{index}]: no such file {path}")
            name = str(path)
        parsed.append(TextFile(name, float(weight)))
    return tuple(parsed)


def load_callable(reference: str):
    """The user's objective function (their own code: running it is what they asked for)."""
    module_name, _, name = reference.rpartition(":")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ConfigError(f"objective.callable: {module_name} has no {name!r}") from None


def causal_lm(config: dict, state_dict: dict):
    """A transformers model built from a config dict and a merged state dict, in float32 for scoring."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {key: value for key, value in config.items() if key != "model_type"}
    model_config = AutoConfig.for_model(config["model_type"], **settings)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
    tied = {"lm_head.weight"} if model_config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"merged tensors do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()


def score_candidate(recipe: dict, objective: Objective) -> dict:
    """Merge `recipe` in memory and score it: {'score': float, 'parts': {...}, 'seconds': float}."""
    import torch

    from moemerge.evolve.in_memory import merge_in_memory

    started = time.monotonic()
    torch.manual_seed(0)
    merged = merge_in_memory(recipe, allow_crimes=objective.allow_crimes)
    if objective.kind == "callable":
        value = float(
            load_callable(objective.function)(state_dict=merged.state_dict, config=merged.config, recipe=recipe)
        )
        return {"score": value, "parts": {}, "seconds": time.monotonic() - started}
    model = causal_lm(merged.config, merged.state_dict).to(objective.device)
    del merged.state_dict
    if objective.kind == "perplexity":
        parts = _perplexities(model, merged.tokenizer_folder, objective)
        total = sum(text.weight for text in objective.texts)
        log_mean = sum(text.weight * math.log(parts[text.path]) for text in objective.texts) / total
        return {"score": math.exp(log_mean), "parts": parts, "seconds": time.monotonic() - started}
    parts = _lm_eval(model, merged.tokenizer_folder, objective)
    total = sum(task.weight for task in objective.tasks)
    value = -sum(task.weight * parts[task.path] for task in objective.tasks) / total
    return {"score": value, "parts": parts, "seconds": time.monotonic() - started}


def _perplexities(model, tokenizer_folder: Path, objective: Objective) -> dict[str, float]:
    from transformers import AutoTokenizer

    from moemerge.quality import model_perplexity

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    parts = {}
    for text in objective.texts:
        ids = tokenizer(Path(text.path).read_text(), add_special_tokens=False)["input_ids"][: objective.max_tokens]
        window = min(objective.window, len(ids))
        measured = model_perplexity(model, ids, window=window, batch_size=objective.batch_size, device=objective.device)
        parts[text.path] = measured.perplexity
    return parts


def _lm_eval(model, tokenizer_folder: Path, objective: Objective) -> dict[str, float]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ConfigError(f"objective.lm_eval needs lm-evaluation-harness: {install_hint('eval', 'lm-eval')}") from None
    from transformers import AutoTokenizer

    wrapped = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tokenizer_folder), device=objective.device)
    names = [task.path for task in objective.tasks]
    results = simple_evaluate(model=wrapped, tasks=names, limit=objective.limit, log_samples=False)["results"]
    try:
        return {name: float(results[name][objective.metric]) for name in names}
    except KeyError as error:
        raise ConfigError(f"objective.lm_eval: no metric {objective.metric!r} for task {error}") from None
