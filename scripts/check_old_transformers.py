"""Every MoE output family moemerge writes, loaded by transformers 4.x, gives the logits transformers 5 gives.

transformers 4.x reads only the legacy rope keys (`rope_theta`, `rope_scaling`) and falls back to its class's
default rope base when config.json carries only transformers 5's `rope_parameters`; a Mixtral built from a
Mistral base, or a dense Mistral taken out of a Mixtral, then computes another function without a warning.
This script builds, with this interpreter's transformers 5 and moemerge, small seeded models of:

- moemerge-moe outputs: Mixtral from a Mistral base (rope_theta 1e6, sliding_window 8), Qwen2-MoE with a shared
  expert from Qwen2, Qwen3-MoE from Qwen3 (rope_theta 1e6), GLM-4-MoE (the DeepSeek-style output) from a Llama
  base with a shared expert (full rotary, which 4.x reads from the top-level partial_rotary_factor);
- moemerge-split outputs of each: `--expert 1` and `--select concat:2` (dense Mistral / Qwen2 / Qwen3) and
  `--prune-to 2` (the same MoE family), and a GPT-OSS saved by transformers 5 pruned to 3 experts;

runs each on the same token ids in transformers 5 here and in transformers 4.x (`--old-python`, a Python with
transformers 4.x and torch), and prints max |Δ logit| and top-1 agreement per output. A control row runs the
dense Mistral with its legacy keys removed, to show the check sees a wrong rope base. Exit 1 if an output differs
beyond float rounding.

    python scripts/check_old_transformers.py --old-python /path/to/tf4/bin/python [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moemerge.api import build_moe, split  # noqa: E402
from moemerge.toys import TOY_TEXT, make_toy_model  # noqa: E402

TOLERANCE = 1e-4  # float32 on both sides: only summation order may differ
BASES = {
    "mixtral": ("mistral", dict(rope_theta=1e6, sliding_window=8)),
    "qwen2_moe": ("qwen2", dict()),
    "qwen3_moe": ("qwen3", dict(rope_theta=1e6)),
    "glm4_moe": ("llama", dict(rope_theta=5e5)),  # mergekit's DeepSeek output, with a shared expert
}
GPT_OSS = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, sliding_window=8)
OLD_SIDE = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
folders, ids_file, out_file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
input_ids = torch.load(ids_file)
logits = {}
for name, folder in folders.items():
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits[name] = model(input_ids).logits
torch.save({"version": transformers.__version__, "logits": logits}, out_file)
"""


def build_outputs(root: Path) -> dict[str, Path]:
    """Every output to check, by name."""
    outputs: dict[str, Path] = {}
    calibration = root / "calibration.txt"
    calibration.write_text((TOY_TEXT + "\n") * 3)
    for index, (family, (base_type, overrides)) in enumerate(BASES.items()):
        base = make_toy_model(root / f"{base_type}-base", base_type, seed=60 + index, **overrides)
        experts = [
            make_toy_model(root / f"{base_type}-ft{n}", base_type, seed=70 + 10 * index + n, base=base, delta_scale=0.5)
            for n in range(3)
        ]
        recipe = {
            "base_model": str(base),
            "architecture": family,
            "gate_mode": "random",
            "experts_per_token": 2,
            "experts": [{"source_model": str(folder)} for folder in experts],
        }
        if family in ("qwen2_moe", "glm4_moe"):
            recipe["shared_experts"] = [{"source_model": str(base)}]
        moe = root / family
        build_moe(recipe, moe, progress=False)
        outputs[family] = moe
        for mode, options in (
            ("expert", dict(expert=1)),
            ("concat", dict(select="concat:2", calibration=calibration)),
            ("prune", dict(prune_to=2, calibration=calibration)),
        ):
            folder = root / f"{family}-{mode}"
            split(moe, folder, progress=False, **options)
            outputs[f"{family} → {mode}"] = folder
    # families written only by pruning, from checkpoints transformers 5 saved (rope_parameters alone)
    gpt_oss = make_toy_model(root / "gpt-oss", "gpt_oss", seed=90, **GPT_OSS)
    split(gpt_oss, root / "gpt_oss-prune", prune_to=3, calibration=calibration, progress=False)
    outputs["gpt_oss (saved by transformers 5) → prune"] = root / "gpt_oss-prune"
    control = root / "control-no-legacy-keys"
    control.mkdir()
    for file in (root / "mixtral-expert").iterdir():
        (control / file.name).write_bytes(file.read_bytes())
    config = json.loads((control / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling"):
        config.pop(key, None)
    (control / "config.json").write_text(json.dumps(config, indent=2))
    outputs["control: mixtral → expert without legacy keys"] = control
    return outputs


@torch.no_grad()
def new_logits(folders: dict[str, Path], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    logits = {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
        logits[name] = model(input_ids).logits
    return logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-python", required=True, help="a Python with transformers 4.x and torch")
    parser.add_argument("--keep", type=Path, help="build the models here and keep them (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        folders = build_outputs(root)
        input_ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))  # > sliding window
        torch.save(input_ids, root / "input_ids.pt")
        new = new_logits(folders, input_ids)
        folder_args = json.dumps({name: str(folder) for name, folder in folders.items()})
        result = subprocess.run(
            [args.old_python, "-c", OLD_SIDE, folder_args, str(root / "input_ids.pt"), str(root / "old.pt")],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return 2
        old = torch.load(root / "old.pt")
        model_types = {
            name: json.loads((folder / "config.json").read_text())["model_type"] for name, folder in folders.items()
        }
    import transformers

    print(f"transformers {transformers.__version__} (here) vs {old['version']} (--old-python), float32, eager")
    print(f"{'output':<48} {'model_type':<11} {'max |Δ logit|':>14} {'top-1 agree':>12}")
    failed = False
    for name in folders:
        difference = (new[name] - old["logits"][name]).abs().max().item()
        agree = (new[name].argmax(-1) == old["logits"][name].argmax(-1)).float().mean().item()
        model_type = model_types[name]
        control = name.startswith("control")
        verdict = "" if control else ("  FAIL" if difference > TOLERANCE else "")
        failed |= bool(verdict)
        print(f"{name:<48} {model_type:<11} {difference:>14.2e} {agree:>12.3f}{verdict}")
        if control and difference <= TOLERANCE:
            print("  the control agrees: the check cannot tell a wrong rope base here", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
