"""Recipe keys: 'did you mean' hints for typos, and the keys mergekit tolerates that moemerge ignores with a warning."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, get_args

from pydantic import BaseModel


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when `word` is close to one of `choices` (two when both are close), else ''."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=2, cutoff=0.7)
    if len(close) == 2 and difflib.SequenceMatcher(None, word, close[1]).ratio() < 0.8:
        close = close[:1]
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def schema_keys(model: type[BaseModel]) -> set[str]:
    """Every key a pydantic schema accepts at any depth: the candidates for a typo's suggestion."""
    keys: set[str] = set()
    pending: list[Any] = [model]
    seen: set[type] = set()
    while pending:
        kind = pending.pop()
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            if kind in seen:
                continue
            seen.add(kind)
            for name, field in kind.model_fields.items():
                keys.add(field.alias or name)
                pending.append(field.annotation)
        else:
            pending.extend(get_args(kind))
    return keys
