"""Compare moemerge's vocabulary alignment with mergekit 0.1.5's on the same toy inputs (rows matched by token).

    python3 scripts/vocab_parity.py --mergekit-python /work/mkvenv/bin/python [--work DIR]

Builds a tied toy base, an untied fine-tune with two added special tokens, and a tied fine-tune with shuffled
ids and one added plain token; merges them with `tokenizer_source: union` (linear and TIES) and a `tokenizer:`
block (`tokens:` with zero / model_token / force, `pad_to_multiple_of`) with both tools; prints, per tensor,
the largest difference between rows of the same token, which tokens only one tool has, and the config fields.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moemerge.toys import make_toy_model, make_vocab_variant  # noqa: E402

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def build_inputs(root: Path) -> dict[str, Path]:
    base = make_toy_model(root / "base", seed=0, tie_word_embeddings=True)
    chat = make_vocab_variant(base, root / "chat", seed=1, added_tokens=("<|im_start|>", "<|im_end|>"))
    tools = make_vocab_variant(
        base, root / "tools", seed=2, added_tokens=("<tool>",), special=False, permute=True, tie=True
    )
    return {"base": base, "chat": chat, "tools": tools}


def recipes(models: dict[str, Path]) -> dict[str, dict]:
    entries = [
        {"model": str(models[name]), "parameters": {"weight": w}}
        for name, w in (("base", 0.5), ("chat", 0.3), ("tools", 0.2))
    ]
    ties_entries = [
        {"model": str(models[name]), "parameters": {"weight": 1.0, "density": 1.0}} for name in ("chat", "tools")
    ]
    return {
        "linear_union": {
            "merge_method": "linear",
            "base_model": str(models["base"]),
            "models": entries,
            "tokenizer_source": "union",
            "dtype": "float32",
        },
        "ties_union": {
            "merge_method": "ties",
            "base_model": str(models["base"]),
            "models": ties_entries,
            "tokenizer_source": "union",
            "dtype": "float32",
        },
        "passthrough_slices_union": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(models["chat"]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(models["tools"]), "layer_range": [2, 4]}]},
            ],
            "tokenizer_source": "union",
        },
        "linear_tokens": {
            "merge_method": "linear",
            "base_model": str(models["base"]),
            "models": entries,
            "dtype": "float32",
            "tokenizer": {
                "source": "union",
                "pad_to_multiple_of": 8,
                "tokens": {
                    "<|im_start|>": {"source": {"kind": "zero"}},
                    "<|im_end|>": {"source": str(models["chat"]), "force": True},
                    "<new>": {"source": {"kind": "model_token", "model": str(models["base"]), "token": "</s>"}},
                },
            },
        },
    }


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def compare(ours: Path, theirs: Path) -> dict:
    ours_t, theirs_t = tensors(ours), tensors(theirs)
    ours_v, theirs_v = vocab(ours), vocab(theirs)
    shared = sorted(set(ours_v) & set(theirs_v))
    report = {
        "tokens": {
            "moemerge": len(ours_v),
            "mergekit": len(theirs_v),
            "only_moemerge": sorted(set(ours_v) - set(theirs_v)),
            "only_mergekit": sorted(set(theirs_v) - set(ours_v)),
            "same_id": sum(ours_v[t] == theirs_v[t] for t in shared),
        }
    }
    for name in VOCAB_TENSORS:
        if name not in ours_t or name not in theirs_t:
            report[name] = {"moemerge": name in ours_t, "mergekit": name in theirs_t}
            continue
        a = ours_t[name][[ours_v[t] for t in shared]].float()
        b = theirs_t[name][[theirs_v[t] for t in shared]].float()
        pad_a, pad_b = ours_t[name][len(ours_v) :].float(), theirs_t[name][len(theirs_v) :].float()
        report[name] = {
            "rows": [ours_t[name].shape[0], theirs_t[name].shape[0]],
            "max_abs_diff_same_token": float((a - b).abs().max()),
            "max_abs_diff_padding": float((pad_a - pad_b).abs().max())
            if pad_a.numel() and pad_a.shape == pad_b.shape
            else None,
        }
    others = [n for n in ours_t if n not in VOCAB_TENSORS]
    report["other_tensors_max_abs_diff"] = max(
        float((ours_t[n].float() - theirs_t[n].float()).abs().max()) for n in others
    )
    ours_c, theirs_c = (json.loads((f / "config.json").read_text()) for f in (ours, theirs))
    report["config"] = {
        key: [ours_c.get(key), theirs_c.get(key)] for key in ("vocab_size", "tie_word_embeddings", "eos_token_id")
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-python", required=True, help="a python with mergekit 0.1.5 installed")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    root = args.work or Path(tempfile.mkdtemp(prefix="vocab-parity-"))
    models = build_inputs(root)
    mergekit_yaml = Path(args.mergekit_python).parent / "mergekit-yaml"
    results = {}
    for name, recipe in recipes(models).items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        ours, theirs = root / f"{name}-moemerge", root / f"{name}-mergekit"
        command = "from moemerge.cli.yaml_command import main; main()"
        subprocess.run([sys.executable, "-c", command, str(path), str(ours), "--overwrite"], check=True, cwd=REPO)
        subprocess.run([str(mergekit_yaml), str(path), str(theirs)], check=True)
        results[name] = compare(ours, theirs)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
