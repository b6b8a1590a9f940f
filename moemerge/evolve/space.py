"""A recipe template's search space: every `{min, max}` (or `{min, max, knots: K}`) value becomes genes.

The optimiser works in the unit cube; a gene's value is min + x·(max − min). A value with `knots: K` is a
per-layer gradient of K values, written into the recipe as the list mergekit's gradients use.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from moemerge.errors import ConfigError

RANGE_KEYS = {"min", "max"}
Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Gene:
    path: Path  # where the value sits in the recipe, e.g. ("models", 0, "parameters", "weight")
    low: float
    high: float
    knots: int = 1  # 1: a scalar; K > 1: a gradient of K values

    @property
    def label(self) -> str:
        return ".".join(f"[{part}]" if isinstance(part, int) else part for part in self.path).replace(".[", "[")


def _is_range(value: Any) -> bool:
    return isinstance(value, dict) and RANGE_KEYS <= set(value) <= RANGE_KEYS | {"knots"}


def _walk(value: Any, path: Path) -> Iterator[tuple[Path, Any]]:
    if _is_range(value):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, (*path, index))


class SearchSpace:
    """The genes of a template and how to write a point of the unit cube back into a plain recipe."""

    def __init__(self, template: dict):
        self.template = template
        self.genes: list[Gene] = []
        for path, spec in _walk(template, ()):
            where = ".".join(map(str, path))
            try:
                low, high, knots = float(spec["min"]), float(spec["max"]), int(spec.get("knots", 1))
            except (TypeError, ValueError):
                raise ConfigError(f"template {where}: min, max and knots must be numbers") from None
            if not low < high:
                raise ConfigError(f"template {where}: min ({low}) must be below max ({high})")
            if knots < 1:
                raise ConfigError(f"template {where}: knots must be at least 1")
            self.genes.append(Gene(path, low, high, knots))
        if not self.genes:
            raise ConfigError("template: no parameter to search; give at least one value as {min: A, max: B}")

    @property
    def dimension(self) -> int:
        return sum(gene.knots for gene in self.genes)

    def values(self, x: Sequence[float]) -> dict[str, float | list[float]]:
        """Each gene's value at unit-cube point x, by label (what the results file records)."""
        if len(x) != self.dimension:
            raise ValueError(f"point has {len(x)} coordinates, the space {self.dimension}")
        values: dict[str, float | list[float]] = {}
        position = 0
        for gene in self.genes:
            scaled = [gene.low + float(v) * (gene.high - gene.low) for v in x[position : position + gene.knots]]
            position += gene.knots
            values[gene.label] = scaled[0] if gene.knots == 1 else scaled
        return values

    def render(self, x: Sequence[float]) -> dict:
        """A plain recipe (no ranges left) for unit-cube point x."""
        recipe = copy.deepcopy(self.template)
        for gene, value in zip(self.genes, self.values(x).values(), strict=True):
            container: Any = recipe
            for part in gene.path[:-1]:
                container = container[part]
            container[gene.path[-1]] = round(value, 6) if isinstance(value, float) else [round(v, 6) for v in value]
        return recipe
