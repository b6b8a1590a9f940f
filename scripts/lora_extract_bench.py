"""Measure `moemerge-lora extract` (and `mergekit-extract-lora` beside it) on a generated model pair.

    python scripts/lora_extract_bench.py                               # moemerge only
    MOEMERGE_MERGEKIT_PYTHON=/work/mkvenv/bin/python python scripts/lora_extract_bench.py   # both

The pair: a seeded toy Llama (hidden 512, 4 layers) and a "fine-tune" whose every linear weight moved by a
rank-32 update with decaying singular values plus a little full-rank noise (what real fine-tunes look
like: most of ΔW's energy in few directions), norms and embeddings slightly perturbed. Both tools run as
subprocesses on the same inputs, embeddings and changed norms saved whole (mergekit's default; our
`--save-embeddings`). Every adapter is judged the same way, by peft: `merge_and_unload()` on the base,
then the relative error of the decomposed weights, ‖ΔW − ΔŴ‖/‖ΔW‖, and of the logits' change,
‖L(adapted) − L(fine-tune)‖ / ‖L(fine-tune) − L(base)‖, on seeded token ids. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moemerge.toys import make_toy_model  # noqa: E402

SIZES = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=4)
UPDATE_RANK = 32


def make_pair(folder: Path) -> tuple[Path, Path]:
    base = folder / "base"
    finetune = folder / "finetune"
    if (finetune / "model.safetensors").is_file():
        return base, finetune
    make_toy_model(base, "llama", seed=0, **SIZES)
    shutil.copytree(base, finetune, dirs_exist_ok=True)
    weights = load_file(base / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name, weight in weights.items():
        scale = float(weight.float().std())
        if weight.dim() == 2 and "embed" not in name and "lm_head" not in name:
            out_dim, in_dim = weight.shape
            spectrum = 0.8 ** torch.arange(UPDATE_RANK, dtype=torch.float32)
            u = torch.linalg.qr(torch.randn(out_dim, UPDATE_RANK, generator=generator))[0]
            v = torch.linalg.qr(torch.randn(in_dim, UPDATE_RANK, generator=generator))[0]
            update = (u * spectrum) @ v.T
            update *= 0.1 * scale * (out_dim * in_dim) ** 0.5 / update.norm()
            noise = 0.005 * scale * torch.randn(weight.shape, generator=generator)
            weights[name] = weight + update + noise
        else:
            weights[name] = weight + 0.01 * scale * torch.randn(weight.shape, generator=generator)
    save_file(weights, finetune / "model.safetensors", metadata={"format": "pt"})
    return base, finetune


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of a child process (CPU from its rusage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


class Judge:
    """peft applies each adapter to the base; errors against the fine-tune's weights and logits."""

    def __init__(self, base: Path, finetune: Path):
        from transformers import AutoModelForCausalLM

        self.base = base
        self.ids = torch.randint(3, 384, (4, 64), generator=torch.Generator().manual_seed(0))
        self.base_weights, self.finetune_weights = (
            load_file(base / "model.safetensors"),
            load_file(finetune / "model.safetensors"),
        )
        self.base_logits = self._logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
        self.finetune_logits = self._logits(AutoModelForCausalLM.from_pretrained(finetune, dtype=torch.float32))

    def _logits(self, model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(input_ids=self.ids).logits

    def __call__(self, adapter: Path) -> tuple[float, float]:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        state = merged.state_dict()
        missed = total = 0.0
        for name, weight in self.finetune_weights.items():
            if weight.dim() == 2 and "embed" not in name and "lm_head" not in name:
                missed += float((state[name] - weight).square().sum())
                total += float((weight - self.base_weights[name]).square().sum())
        change = self.finetune_logits - self.base_logits
        logit_error = float((self._logits(merged) - self.finetune_logits).norm() / change.norm())
        return (missed / total) ** 0.5, logit_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "lora")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--energy", type=float, nargs="*", default=[0.9, 0.99])
    parser.add_argument("--mergekit-python", default=os.environ.get("MOEMERGE_MERGEKIT_PYTHON"))
    args = parser.parse_args()
    base, finetune = make_pair(args.work)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    judge = Judge(base, finetune)
    runs: list[tuple[str, str, list[str]]] = []
    ours = [sys.executable, "-m", "moemerge.cli.lora_command", "extract", str(finetune), str(base)]
    for rank in args.ranks:
        runs.append(("moemerge", f"rank {rank}", [*ours, "{out}", "--rank", str(rank), "--save-embeddings", "--quiet"]))
        if args.mergekit_python:
            mergekit = [args.mergekit_python, "-m", "mergekit.scripts.extract_lora"]
            mergekit += ["--model", str(finetune), "--base-model", str(base), "--out-path", "{out}"]
            runs.append(("mergekit 0.1.5", f"rank {rank}", [*mergekit, "--max-rank", str(rank)]))
    for energy in args.energy:
        runs.append(("moemerge", f"energy {energy}", [*ours, "{out}", "--energy", str(energy), "--save-embeddings"]))
    rows = []
    print("| tool | setting | rank (max) | adapter MB | weight error | logit error | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for tool, setting, command in runs:
        out = args.work / "out" / f"{tool.split()[0]}-{setting.replace(' ', '')}"
        shutil.rmtree(out, ignore_errors=True)
        wall, cpu = timed([part.replace("{out}", str(out)) for part in command], env)
        config = json.loads((out / "adapter_config.json").read_text())
        size = (out / "adapter_model.safetensors").stat().st_size / 1e6
        weight_error, logit_error = judge(out)
        rows.append(
            dict(
                tool=tool,
                setting=setting,
                r=config["r"],
                mb=size,
                weight_error=weight_error,
                logit_error=logit_error,
                wall=wall,
                cpu=cpu,
            )
        )
        print(
            f"| {tool} | {setting} | {config['r']} | {size:.2f} | {weight_error:.4f} | {logit_error:.4f} "
            f"| {wall:.1f} | {cpu:.1f} |",
            flush=True,
        )
    (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
