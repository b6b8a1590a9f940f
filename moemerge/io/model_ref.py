"""Turn a model reference (local folder or `org/name[@revision]`) into a folder on disk."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from moemerge.errors import ModelNotFoundError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken", "*.py"]


def split_revision(reference: str) -> tuple[str, str | None]:
    name, _, revision = reference.partition("@")
    return name, (revision or None)


def is_hub_id(reference: str) -> bool:
    """Whether a model reference names a Hugging Face repo (`org/name[@revision]`) rather than a local folder.

    As in mergekit's model card, a reference starting with `/` or `~`, or with more than one `/`, is local.
    mergekit asks the hub about a name that is also a local folder; we count an existing folder as local, so
    that writing a card never goes online. A name without `org/` is local too: only `org/name` resolves from
    the hub here (`resolve_model`).
    """
    name, _ = split_revision(reference)
    if name.startswith(("/", "~", ".")) or name.count("/") != 1 or Path(name).exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_ids(references: Sequence[str]) -> list[str]:
    """The references that name hub repos, without revisions or repeats (a model card's `base_model:`)."""
    return list(dict.fromkeys(split_revision(reference)[0] for reference in references if is_hub_id(reference)))


def resolve_model(reference: str) -> Path:
    """A local folder as-is; otherwise a Hugging Face repo id from the local cache (or the hub when online)."""
    local = Path(reference).expanduser()
    try:
        if local.is_dir():
            return local.resolve()
        if local.exists():
            raise ModelNotFoundError(f"model {reference!r} is a file; give the folder that holds config.json")
    except OSError as error:  # a name too long for the file system, a permission problem on the way
        shown = reference if len(reference) <= 80 else f"{reference[:40]}... ({len(reference)} characters)"
        raise ModelNotFoundError(f"model {shown!r}: {error.strerror or error}") from None
    repo_id, revision = split_revision(reference)
    no_folder = f"model {reference!r} not found: no such folder under {Path.cwd()} (recipe paths are relative to it)"
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise ModelNotFoundError(f"{no_folder}, and not an 'org/name' Hugging Face repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS, local_files_only=offline)
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        where = "in the local Hugging Face cache" if offline else "in the local Hugging Face cache or on the hub"
        raise ModelNotFoundError(f"{no_folder}; no repo {repo_id!r} {where} either") from None
