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
from transformers.utils import logging as transformers_logging

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_toy_models import make_all  # noqa: E402

PROMPT = "Merging language models"
LEGEND = (
    "Per model: class, layers, the prompt -> its greedy 8-token continuation (random toy weights: nonsense), and "
    "Δlogit = mean |logit - base model's logit| on the prompt (0: the base's predictions; larger: further from it)."
)


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def prompt_logits(folder: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


def generate(folder: Path, base_logits: torch.Tensor) -> None:
    """Load a model folder with transformers, greedily generate a few tokens, and compare with the base model.

    The toy weights are random, so the text is nonsense; what the demo shows is that every output loads, runs,
    and differs from the base model by as much as its recipe says.
    """
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        logits = model(**inputs).logits
    text = tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    shift = (logits - base_logits).abs().mean().item()
    print(
        f"  {folder.name}: {type(model).__name__}, {model.config.num_hidden_layers} layers;"
        f" {PROMPT!r} -> {text!r}; Δlogit {shift:.4f}\n",
        flush=True,
    )


def main() -> None:
    transformers_logging.disable_progress_bar()
    make_all(ROOT / "toy-models")
    out = ROOT / "out"
    steps = [  # (output, command, the base model its logits are compared with)
        ("demo-ties", ["moemerge-yaml", "configs/ties.yml"], "base"),
        ("demo-frankenmerge", ["moemerge-yaml", "configs/passthrough.yml"], "base"),
        ("demo-slerp", ["moemerge-yaml", "configs/slerp.yml"], "base"),
        ("demo-moe", ["moemerge-moe", "configs/moe-mixtral.yml"], "mistral-base"),
        ("demo-expert-1", ["moemerge-split", str(out / "demo-moe"), "--expert", "1"], "mistral-base"),
    ]
    base_logits = {name: prompt_logits(ROOT / "toy-models" / name) for name in ("base", "mistral-base")}
    print(LEGEND + "\n", flush=True)
    for name, command, base in steps:
        if shutil.which(command[0]) is None:
            sys.exit(f"{command[0]} is not installed: run `pip install -e .` first")
        run(*command, str(out / name), "--overwrite", "--quiet")
        generate(out / name, base_logits[base])
    print("demo finished: merged models are in out/")


if __name__ == "__main__":
    main()
