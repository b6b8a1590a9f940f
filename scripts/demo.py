"""The demo: generate toy models, merge them with each command, load the results with transformers and generate.

Runs from the repository root: `python scripts/demo.py`. Outputs land in out/demo-*.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_toy_models import make_all  # noqa: E402

PROMPT = "Merging language models"


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def generate(folder: Path) -> None:
    """Load a model folder with transformers and greedily generate a few tokens."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    layers = model.config.num_hidden_layers
    kind = type(model).__name__
    print(f"  {folder.name}: {kind}, {layers} layers -> {tokenizer.decode(tokens[0])!r}\n", flush=True)


def main() -> None:
    make_all(ROOT / "toy-models")
    out = ROOT / "out"
    steps = [
        ("demo-ties", ["moemerge-yaml", "configs/ties.yml"]),
        ("demo-frankenmerge", ["moemerge-yaml", "configs/passthrough.yml"]),
        ("demo-slerp", ["moemerge-yaml", "configs/slerp.yml"]),
        ("demo-moe", ["moemerge-moe", "configs/moe-mixtral.yml"]),
    ]
    for name, command in steps:
        if shutil.which(command[0]) is None:
            sys.exit(f"{command[0]} is not installed: run `pip install -e .` first")
        run(*command, str(out / name), "--overwrite", "--quiet")
        generate(out / name)
    run("moemerge-split", str(out / "demo-moe"), str(out / "demo-expert-1"), "--expert", "1", "--overwrite", "--quiet")
    generate(out / "demo-expert-1")
    print("demo finished: merged models are in out/")


if __name__ == "__main__":
    main()
