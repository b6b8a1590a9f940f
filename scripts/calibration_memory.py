"""Peak memory of `moemerge-split --calibration --prune-to` on a generated Qwen3-MoE model 3x larger than its budget.

    python scripts/calibration_memory.py                   # generate under .bench/calibration/, run, print the table
    python scripts/calibration_memory.py --layers 24 --budget 900M

The large model has 128 experts per layer (8 per token) at reduced width and is at least 3x the
`--max-memory` given; it is pruned to 64 experts with calibration, layer by layer. Beside it, a model of
the same shape with fewer layers that fits in memory is calibrated both ways: layer by layer, and with the
whole model loaded by transformers (what moemerge-split did before). Peak RSS comes from GNU time (the
child's own high-water mark), tokens/s from the calibration pass's log line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
DTYPE = torch.float32  # CPUs without bf16 matrix units run bf16 products many times slower than float32
WORK = ROOT / ".bench" / "calibration"
SHAPE = dict(
    hidden_size=768,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=96,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=192,
    norm_topk_prob=True,
    vocab_size=384,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
WHOLE_MODEL = """
import sys, time, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from moemerge.architectures import find_architecture
from moemerge.layerwise import equal_batches
from moemerge.split.usage import RouterUsage, calibration_chunks, record_router, tokenize_until, usage_rule
folder, text, tokens = Path(sys.argv[1]), Path(sys.argv[2]).read_text(), int(sys.argv[3])
started = time.perf_counter()
chunks = calibration_chunks(tokenize_until(AutoTokenizer.from_pretrained(folder), text, tokens), 256, tokens)
model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
usage = RouterUsage.empty(len(model.model.layers), 128)
moe = find_architecture(model.config.model_type).moe
for index, layer in enumerate(model.model.layers):
    record_router(usage, index, layer, moe, usage_rule(model.config.to_dict(), moe))
with torch.no_grad():
    for batch in equal_batches(chunks, 8):
        model(input_ids=batch.input_ids, use_cache=False)
print(f"layer by layer: {tokens} tokens x {len(model.model.layers)} layers in {time.perf_counter() - started:.1f} s")
"""


def layer_tensors(layer: int, pool: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One Qwen3-MoE decoder layer in the per-expert on-disk layout save_pretrained writes, float32.

    Weights are windows at random offsets into one seeded pool of N(0, 0.02²) values: random enough for
    routing and timing, and cheap to generate on a busy machine."""
    hidden, heads, kv, head_dim = (
        SHAPE[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    experts, inter = SHAPE["num_experts"], SHAPE["moe_intermediate_size"]
    prefix = f"model.layers.{layer}."

    def rand(*shape: int) -> torch.Tensor:
        count = torch.Size(shape).numel()
        start = int(torch.randint(0, len(pool) - count, (1,), generator=generator))
        return pool[start : start + count].view(shape).clone()

    tensors = {
        prefix + "input_layernorm.weight": torch.ones(hidden, dtype=DTYPE),
        prefix + "post_attention_layernorm.weight": torch.ones(hidden, dtype=DTYPE),
        prefix + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
        prefix + "self_attn.k_proj.weight": rand(kv * head_dim, hidden),
        prefix + "self_attn.v_proj.weight": rand(kv * head_dim, hidden),
        prefix + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        prefix + "self_attn.q_norm.weight": torch.ones(head_dim, dtype=DTYPE),
        prefix + "self_attn.k_norm.weight": torch.ones(head_dim, dtype=DTYPE),
        prefix + "mlp.gate.weight": rand(experts, hidden) * 50,  # spread routing: some experts matter more
    }
    for expert in range(experts):
        for part, shape in (
            ("gate_proj", (inter, hidden)),
            ("up_proj", (inter, hidden)),
            ("down_proj", (hidden, inter)),
        ):
            tensors[f"{prefix}mlp.experts.{expert}.{part}.weight"] = rand(*shape)
    return tensors


def generate(folder: Path, layers: int) -> Path:
    """A seeded Qwen3-MoE checkpoint, one shard per layer (written layer by layer: generation memory stays small)."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    from moemerge.toys import toy_config, toy_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = toy_config("qwen3_moe", num_hidden_layers=layers, **SHAPE)
    config.dtype = DTYPE
    config.save_pretrained(folder)
    toy_tokenizer(SHAPE["vocab_size"]).save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 22, generator=generator) * 0.02).to(DTYPE)
    weight_map: dict[str, str] = {}
    total = 0
    for layer in range(layers + 1):
        if layer < layers:
            tensors = layer_tensors(layer, pool, generator)
        else:
            vocab, hidden = SHAPE["vocab_size"], SHAPE["hidden_size"]
            tensors = {
                "model.embed_tokens.weight": (torch.randn((vocab, hidden), generator=generator)).to(DTYPE),
                "model.norm.weight": torch.ones(hidden, dtype=DTYPE),
                "lm_head.weight": (torch.randn((vocab, hidden), generator=generator) * 0.02).to(DTYPE),
            }
        name = f"model-{layer:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({tensor: name for tensor in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def calibration_text(path: Path) -> Path:
    """Python's own source as calibration text (available offline everywhere)."""
    import inspect
    import json as json_module

    path.write_text(inspect.getsource(json_module.decoder) + inspect.getsource(argparse))
    return path


def timed(command: list[str]) -> dict:
    """Run a child under GNU time: wall seconds, peak RSS (MB) and the calibration pass's own timing line."""
    rss_file = WORK / "rss.txt"
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the machine is shared
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *command], capture_output=True, text=True, cwd=ROOT, env=env
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    match = re.search(r"layer by layer: (\d+) tokens . (\d+) layers in ([\d.]+) s", result.stdout + result.stderr)
    tokens, layers, seconds = (int(match[1]), int(match[2]), float(match[3])) if match else (0, 0, 0.0)
    return {
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(int(rss_file.read_text().split()[-1]) / 1024),
        "calibration_s": seconds,
        "tokens_per_s": round(tokens / seconds) if seconds else None,
    }


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--small-layers", type=int, default=3)
    parser.add_argument("--budget", default="900M")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from moemerge.sizes import parse_memory

    WORK.mkdir(parents=True, exist_ok=True)
    text = calibration_text(WORK / "calibration.txt")
    large = generate(WORK / f"qwen3moe-128x-{args.layers}l", args.layers)
    small = generate(WORK / f"qwen3moe-128x-{args.small_layers}l", args.small_layers)
    budget = parse_memory(args.budget)
    split = [sys.executable, "-c", "from moemerge.cli.split_command import main; main()"]
    options = ["--calibration", str(text), "--max-tokens", str(args.tokens), "--seq-len", "256", "--prune-to", "64"]
    rows = []
    for folder, mode in ((large, "layer by layer"), (small, "layer by layer"), (small, "whole model")):
        out = WORK / "out"
        if mode == "whole model":
            measured = timed([sys.executable, "-c", WHOLE_MODEL, str(folder), str(text), str(args.tokens)])
        else:
            measured = timed([*split, str(folder), str(out), *options, "--max-memory", args.budget, "--overwrite"])
        row = {
            "model": folder.name,
            "model_gb": round(size_of(folder) / 1e9, 2),
            "budget_gb": round(budget / 1e9, 2),
            "mode": mode + (" + prune write" if mode == "layer by layer" else ""),
            **measured,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    (WORK / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| model | size | --max-memory | pass | peak RSS | wall | calibration | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        budget_text = f"{r['budget_gb']} GB" if "layer" in r["mode"] else "none"
        print(
            f"| {r['model']} | {r['model_gb']} GB | {budget_text} | {r['mode']} | {r['peak_rss_mb']} MB | "
            f"{r['wall_s']} s | {r['calibration_s']} s | {r['tokens_per_s']} |"
        )


if __name__ == "__main__":
    main()
