"""A child process for the placement tests: builds an output folder through staged_output and may be killed on the
way (MOEMERGE_TEST_KILL_AT). Imports no torch, so each run costs a fraction of a second."""

from __future__ import annotations

import sys
from pathlib import Path

from moemerge.io.output_dir import staged_output

FILES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json")


def build(folder: Path, version: str) -> None:
    for name in FILES:
        (folder / name).write_text(f"{version}:{name}\n" * 1000)


if __name__ == "__main__":
    target, version, overwrite = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "overwrite"
    with staged_output(target, overwrite) as staging:
        build(staging, version)
