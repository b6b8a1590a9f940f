"""Benchmark moemerge (and optionally mergekit) on a generated ~0.5 B-parameter model set.

    python scripts/bench.py                      # generate once under .bench/, run every recipe
    python scripts/bench.py --peer-venv .bench/mergekit-venv   # same recipes with mergekit, side by side
    python scripts/bench.py --layers 16 --only linear          # the memory-vs-model-size check

Each merge runs in its own subprocess; wall time, CPU time and peak RSS come from that child's
rusage, bytes read/written from /proc/<pid>/io. The I/O floor (read every input file, write an
output of the same size, fsync) is measured in the same run. Results: printed table + .bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
SIZES = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
SHARD_BYTES = 500 * 10**6
FINE_TUNES = ("finetune-1", "finetune-2", "finetune-3")
EXPERTS = ("expert-1", "expert-2", "expert-3", "expert-4")


# ---------------------------------------------------------------- model set


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Llama/Mistral tensor names and shapes for the benchmark sizes, in save order."""
    hidden, inter, vocab = SIZES["hidden_size"], SIZES["intermediate_size"], SIZES["vocab_size"]
    kv = hidden // SIZES["num_attention_heads"] * SIZES["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def seeded_normal(shape: tuple[int, ...], seed: int, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * scale


def model_tensor(name: str, shape: tuple[int, ...], model_seed: int) -> torch.Tensor:
    """Base weights (seed 0) plus, for model_seed > 0, a small seeded delta: fine-tunes share most weights."""
    name_seed = zlib.crc32(name.encode())
    base = torch.ones(shape) if name.endswith("norm.weight") else seeded_normal(shape, name_seed, 0.02)
    if model_seed:
        base += seeded_normal(shape, name_seed * 31 + model_seed, 0.002)
    return base.to(torch.bfloat16)


def write_model(folder: Path, model_type: str, layers: int, model_seed: int) -> None:
    """Write config, tokenizer and 500 MB safetensors shards without building a transformers model."""
    from transformers import AutoConfig

    from moemerge.toys import toy_tokenizer

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, **SIZES)
    config.dtype = torch.bfloat16
    config.architectures = [
        {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[model_type]
    ]  # mergekit needs it
    config.bos_token_id, config.eos_token_id = 0, 1
    config.save_pretrained(partial)
    toy_tokenizer().save_pretrained(partial)
    shapes = tensor_shapes(layers)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for number, names in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: model_tensor(name, shapes[name], model_seed) for name in names}
        save_file(tensors, partial / file_name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file_name)
        del tensors
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    partial.rename(folder)


def model_set(layers: int, which: tuple[str, ...]) -> Path:
    """Generate (once; cached) the models named in `which` for a given layer count."""
    root = BENCH / f"models-{layers}L"
    plan = {"base": ("llama", 0)}
    plan |= {name: ("llama", seed) for seed, name in enumerate(FINE_TUNES, start=1)}
    plan |= {name: ("mistral", seed) for seed, name in enumerate(EXPERTS, start=11)}
    for name in which:
        folder = root / name
        if not folder.is_dir():
            started = time.perf_counter()
            model_type, seed = plan[name]
            write_model(folder, model_type, layers, seed)
            print(f"generated {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return root


# ---------------------------------------------------------------- recipes


def recipes(models: Path, math_dtype: str = "float32") -> dict[str, tuple[str, str]]:
    """name -> (command kind, YAML text); the same YAML goes to moemerge and to mergekit."""
    fine_tunes = [str(models / name) for name in FINE_TUNES]
    base = models / "base"
    math = f"dtype: {math_dtype}\nout_dtype: bfloat16\n"

    def listed(parameters: list[str]) -> str:
        return "".join(
            f"  - model: {path}\n    parameters: {{{p}}}\n" for path, p in zip(fine_tunes, parameters, strict=True)
        )

    sparse = listed(["weight: 1.0, density: 0.5"] * 3)
    experts = "".join(f'  - source_model: {models / name}\n    positive_prompts: ["{name}"]\n' for name in EXPERTS)
    return {
        "linear": (
            "yaml",
            f"merge_method: linear\nmodels:\n{listed(['weight: 1.0', 'weight: 0.5', 'weight: 0.5'])}{math}",
        ),
        "task_arithmetic": (
            "yaml",
            f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{listed(['weight: 0.5'] * 3)}{math}",
        ),
        "ties": (
            "yaml",
            f"merge_method: ties\nbase_model: {base}\nmodels:\n{sparse}parameters: {{normalize: true}}\n{math}",
        ),
        "slerp": (
            "yaml",
            f"merge_method: slerp\nbase_model: {fine_tunes[0]}\nmodels:\n  - model: {fine_tunes[0]}\n"
            f"  - model: {fine_tunes[1]}\nparameters:\n  t: 0.3\n{math}",
        ),
        "dare_ties": (
            "yaml",
            f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n{sparse}parameters: {{normalize: true}}\n{math}",
        ),
        "moe": ("moe", f"base_model: {models / 'expert-1'}\ngate_mode: random\ndtype: bfloat16\nexperts:\n{experts}"),
        # the methods added for mergekit parity (issue 8), same model set and dtypes
        "della": (
            "yaml",
            f"merge_method: della\nbase_model: {base}\nmodels:\n"
            f"{listed(['weight: 1.0, density: 0.5, epsilon: 0.1'] * 3)}{math}",
        ),
        "della_linear": (
            "yaml",
            f"merge_method: della_linear\nbase_model: {base}\nmodels:\n"
            f"{listed(['weight: 0.5, density: 0.5'] * 3)}{math}",
        ),
        "model_stock": ("yaml", f"merge_method: model_stock\nbase_model: {base}\nmodels:\n{listed([''] * 3)}{math}"),
        "nuslerp": (
            "yaml",
            f"merge_method: nuslerp\nbase_model: {base}\nmodels:\n"
            f"  - model: {fine_tunes[0]}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {fine_tunes[1]}\n    parameters: {{weight: 0.4}}\n{math}",
        ),
        "multislerp": (
            "yaml",
            f"merge_method: multislerp\nmodels:\n{listed(['weight: 1.0', 'weight: 0.5', 'weight: 0.5'])}{math}",
        ),
        "karcher": ("yaml", f"merge_method: karcher\nmodels:\n{listed([''] * 3)}{math}"),
        "sce": (
            "yaml",
            f"merge_method: sce\nbase_model: {base}\nmodels:\n{listed([''] * 3)}parameters: {{select_topk: 0.5}}\n"
            f"{math}",
        ),
        "nearswap": (
            "yaml",
            f"merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {fine_tunes[0]}\n"
            f"parameters: {{t: 0.001}}\n{math}",
        ),
        "arcee_fusion": (
            "yaml",
            f"merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {fine_tunes[0]}\n{math}",
        ),
        "dare_linear": (
            "yaml",
            f"merge_method: dare_linear\nbase_model: {base}\nmodels:\n{listed(['weight: 0.5, density: 0.5'] * 3)}"
            f"{math}",
        ),
        "breadcrumbs": (
            "yaml",
            f"merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n"
            f"{listed(['weight: 0.5, density: 0.9, gamma: 0.01'] * 3)}{math}",
        ),
        "breadcrumbs_ties": (
            "yaml",
            f"merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n"
            f"{listed(['weight: 1.0, density: 0.9, gamma: 0.01'] * 3)}parameters: {{normalize: true}}\n{math}",
        ),
        "passthrough": (  # a frankenmerge: 12 layers stacked from two 8-layer models
            "yaml",
            f"slices:\n  - sources:\n      - model: {fine_tunes[0]}\n        layer_range: [0, 6]\n"
            f"  - sources:\n      - model: {fine_tunes[1]}\n        layer_range: [2, 8]\n"
            f"merge_method: passthrough\n{math}",
        ),
        "ram": ("yaml", f"merge_method: ram\nbase_model: {base}\nmodels:\n{listed([''] * 3)}{math}"),
        "ramplus_tl": ("yaml", f"merge_method: ramplus_tl\nbase_model: {base}\nmodels:\n{listed([''] * 3)}{math}"),
    }


# deterministic methods: tensors must match mergekit's (arcee_fusion only up to mergekit's sampled quartiles on
# tensors above 10⁶ entries)
COMPARED = ("linear", "task_arithmetic", "ties", "slerp", "model_stock", "nuslerp", "multislerp", "karcher", "sce")
COMPARED += ("nearswap", "arcee_fusion", "ram", "ramplus_tl", "breadcrumbs", "breadcrumbs_ties", "passthrough")


# ---------------------------------------------------------------- measuring


def drop_caches() -> bool:
    """Empty the page cache (needs root); False where the sandbox does not allow it."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def measure(command: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run a child; wall and CPU time, peak RSS and /proc I/O counters read before it is reaped."""
    # Peak RSS comes from GNU time's own wait for the command: a child forked from this process (which holds
    # torch, or the models it just generated) inherits its RSS as a high-water mark, a child of `time` does not.
    rss_file = BENCH / "logs" / "peak-rss.txt"
    rss_file.parent.mkdir(parents=True, exist_ok=True)
    rss_file.unlink(missing_ok=True)
    timer = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] if Path("/usr/bin/time").is_file() else []
    started = time.perf_counter()
    with open(log or os.devnull, "w") as output:
        child = subprocess.Popen([*timer, *command], stdout=output, stderr=subprocess.STDOUT, env=env)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        wall = time.perf_counter() - started
        io = {}
        try:
            for line in Path(f"/proc/{child.pid}/io").read_text().splitlines():
                key, value = line.split(":")
                io[key] = int(value)
        except OSError:
            pass
        _, status, usage = os.wait4(child.pid, 0)
    peak_kb = usage.ru_maxrss
    if timer and rss_file.is_file() and rss_file.read_text().strip().splitlines():
        peak_kb = int(rss_file.read_text().strip().splitlines()[-1])
    return {
        "ok": os.waitstatus_to_exitcode(status) == 0,
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(peak_kb / 1024),
        "storage_read_mb": round(io.get("read_bytes", 0) / 1e6),
        "syscall_read_mb": round(io.get("rchar", 0) / 1e6),
        "storage_write_mb": round(io.get("write_bytes", 0) / 1e6),
    }


def read_inputs(inputs: list[Path]) -> None:
    """Read every safetensors file of the input folders once (into the page cache)."""
    chunk = bytearray(16 * 2**20)
    for folder in inputs:
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb", buffering=0) as handle:
                while handle.readinto(chunk):
                    pass


def io_floor(inputs: list[Path], output_bytes: int, scratch: Path) -> float:
    """Seconds to read every input shard once and write (and fsync) an output of the same size."""
    started = time.perf_counter()
    read_inputs(inputs)
    chunk = bytearray(16 * 2**20)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    with open(scratch, "wb", buffering=0) as handle:
        written = 0
        while written < output_bytes:
            written += handle.write(memoryview(chunk)[: min(len(chunk), output_bytes - written)])
        os.fsync(handle.fileno())
    scratch.unlink()
    return round(time.perf_counter() - started, 2)


def recipe_inputs(text: str) -> list[Path]:
    paths = []
    for line in text.splitlines():
        for key in ("model:", "source_model:", "base_model:"):
            if line.strip().lstrip("- ").startswith(key):
                paths.append(Path(line.split(key, 1)[1].strip()))
    return list(dict.fromkeys(paths))


def max_abs_diff(ours: Path, theirs: Path) -> float | None:
    """Largest |ours - mergekit| over every tensor, compared one tensor at a time in float32."""
    from moemerge.io.loader import LazyModel

    a, b = LazyModel(ours), LazyModel(theirs)
    if set(a.names) != set(b.names):
        print(f"  tensor names differ: {sorted(set(a.names) ^ set(b.names))[:4]}")
        return None
    return max((a.read(n, torch.float32) - b.read(n, torch.float32)).abs().max().item() for n in a.names)


# ---------------------------------------------------------------- main


def tool_command(tool: str, kind: str, config: Path, out: Path, peer: Path | None, extra: list[str]) -> list[str]:
    if tool.startswith("moemerge"):
        device = ["--device", tool.split("-", 1)[1]] if "-" in tool else []
        options = ["--out-shard-size", "500M", "--quiet", "--overwrite", *device, *extra]
        script = shutil.which(f"moemerge-{kind}")
        if script:
            return [script, str(config), str(out), *options]
        # not installed (e.g. a bare GPU machine with the repo on PYTHONPATH): call the click command directly
        call = f"import sys; from moemerge.cli.{kind}_command import main; sys.argv[0] = 'moemerge-{kind}'; main()"
        return [sys.executable, "-c", call, str(config), str(out), *options]
    assert peer is not None
    command = [str(peer / "bin" / f"mergekit-{kind}"), str(config), str(out), "--out-shard-size", "500M"]
    return command + (
        ["--random-seed", "0"] if kind == "yaml" else ["--i-understand-this-is-not-useful-without-training"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="recipes to run (default: all)")
    parser.add_argument("--peer-venv", type=Path, help="virtual environment with mergekit installed")
    parser.add_argument(
        "--cache",
        choices=("cold", "warm"),
        default="cold",
        help="cold: drop the page cache before each run; warm: read every input once before each run",
    )
    parser.add_argument(
        "--math-dtype", choices=("float32", "bfloat16"), default="float32", help="the recipes' dtype (math dtype)"
    )
    parser.add_argument("--extra", default="", help="extra moemerge options, e.g. '--max-memory 1G --device cuda'")
    parser.add_argument("--label", default="", help="suffix for result keys, e.g. gpu")
    parser.add_argument("--also-device", nargs="*", default=[], help="also run moemerge with --device X (cuda)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads for moemerge (OMP_NUM_THREADS)")
    parser.add_argument(
        "--tools",
        nargs="*",
        choices=("moemerge", "mergekit"),
        help="run only these (default: moemerge, and mergekit with --peer-venv); figures merge into existing rows",
    )
    parser.add_argument("--generate-only", action="store_true")
    arguments = parser.parse_args()

    every = recipes(BENCH / f"models-{arguments.layers}L")
    names = arguments.only or list(every)
    needed = {"base", *FINE_TUNES, *EXPERTS} if "moe" in names else {"base", *FINE_TUNES}
    models = model_set(arguments.layers, tuple(sorted(needed)))
    if arguments.generate_only:
        return
    every = recipes(models, arguments.math_dtype)
    # result keys: name-8L, plus -bf16 for bfloat16 math and -warm for a warm cache (old keys stay valid)
    variant = ("-bf16" if arguments.math_dtype == "bfloat16" else "") + ("-warm" if arguments.cache == "warm" else "")
    chosen = arguments.tools or ["moemerge", *(["mergekit"] if arguments.peer_venv else [])]
    tools = ["moemerge"] + [f"moemerge-{device}" for device in arguments.also_device] if "moemerge" in chosen else []
    tools += ["mergekit"] if "mergekit" in chosen else []
    if "mergekit" in tools and not arguments.peer_venv:
        parser.error("--tools mergekit needs --peer-venv")
    floors: dict[tuple, float] = {}  # one I/O floor per input set and output size in a run
    results_path = BENCH / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " + (
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    )
    run_info = {
        "command": " ".join(["python", "scripts/bench.py", *sys.argv[1:]]),
        "machine": machine,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
    }
    for name in names:
        kind, text = every[name]
        config = BENCH / "recipes" / f"{name}.yml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(text)
        key = f"{name}-{arguments.layers}L{variant}{arguments.label}"
        earlier = results.get(key, {}) if arguments.tools else {}  # a row measured one tool at a time
        row = {**earlier, "recipe": name, "layers": arguments.layers, "math_dtype": arguments.math_dtype, **run_info}
        if earlier:  # each tool's last run keeps its own date and command
            measured = [tool for tool in ("moemerge", "mergekit") if tool in earlier]
            row["runs"] = {**{tool: earlier["date"] for tool in measured}, **earlier.get("runs", {})}
            row["runs"].update({tool: run_info["date"] for tool in tools})
            row["commands"] = {**{tool: earlier["command"] for tool in measured}, **earlier.get("commands", {})}
            row["commands"].update({tool: run_info["command"] for tool in tools})
        outputs = {}
        for tool in tools:
            out = BENCH / "out" / f"{tool}-{name}-{arguments.layers}L"
            shutil.rmtree(out, ignore_errors=True)
            cold = arguments.cache == "cold" and drop_caches()
            if arguments.cache == "warm":
                read_inputs(recipe_inputs(text))  # a warm cache: the user's second merge
            command = tool_command(tool, kind, config, out, arguments.peer_venv, arguments.extra.split())
            log = BENCH / "logs" / f"{tool}-{name}-{arguments.layers}L{arguments.label}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ)
            if arguments.threads and tool == "moemerge":
                env["OMP_NUM_THREADS"] = str(arguments.threads)
            load_before = os.getloadavg()[0]
            figures = measure(command, env=env, log=log)
            figures["load_avg_1min_before_after"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
            figures["cache"] = "cold" if cold else "warm"
            figures["output_mb"] = round(folder_bytes(out) / 1e6) if out.is_dir() else 0
            row[tool] = figures
            outputs[tool] = out
            print(f"{name:16s} {tool:9s} {json.dumps(figures)}", flush=True)
        output_bytes = folder_bytes(outputs[tools[0]]) if outputs[tools[0]].is_dir() else 10**9
        inputs = recipe_inputs(text)
        floor_key = (tuple(map(str, inputs)), round(output_bytes / 1e7))
        if floor_key not in floors:
            cold = arguments.cache == "cold" and drop_caches()
            if arguments.cache == "warm":
                read_inputs(inputs)  # a warm cache: the user's second merge
            floors[floor_key] = io_floor(inputs, output_bytes, BENCH / "out" / "floor.bin")
            row["io_floor_cache"] = "cold" if cold else "warm"
        row["io_floor_s"] = floors[floor_key]
        if row.get("mergekit", {}).get("ok") and row.get("moemerge", {}).get("ok"):
            row["wall_ratio"] = round(row["moemerge"]["wall_s"] / row["mergekit"]["wall_s"], 3)
            row["rss_ratio"] = round(row["moemerge"]["peak_rss_mb"] / row["mergekit"]["peak_rss_mb"], 3)
            if name in COMPARED and {"moemerge", "mergekit"} <= set(outputs):
                row["max_abs_diff_vs_mergekit"] = max_abs_diff(outputs["moemerge"], outputs["mergekit"])
        for device in arguments.also_device if "moemerge" in tools else []:
            if row[f"moemerge-{device}"]["ok"] and row["moemerge"]["ok"]:
                row[f"max_abs_diff_{device}_vs_cpu"] = max_abs_diff(outputs["moemerge"], outputs[f"moemerge-{device}"])
                row[f"wall_ratio_{device}_vs_cpu"] = round(
                    row[f"moemerge-{device}"]["wall_s"] / row["moemerge"]["wall_s"], 3
                )
        print(f"{name:16s} summary   {json.dumps({k: v for k, v in row.items() if k not in tools})}", flush=True)
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}  # another run may write
        results[key] = row
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
