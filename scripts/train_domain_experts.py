"""Train a small base model and one fine-tune per domain on text that ships with Python, for the router study.

    python scripts/train_domain_experts.py --out .bench/domains   # a few CPU minutes on 2 free cores

Domains (all offline): `code` is the standard library's `.py` sources (split by path hash as in
quality_data.py); `prose` is English text: the documentation topics shipped in `pydoc_data` and the
package descriptions (`METADATA`) of the installed distributions, split by a hash of the topic or
package name. The base is trained on both domains, then each fine-tune continues from it on its own
domain only. Writes OUT/base, OUT/code, OUT/prose (Mistral, float32, shared tokenizer) and, per domain,
`heldout-<domain>.txt` (never trained on) and `calibration-<domain>.txt` (from the training split).

`--tune-params mlp` trains only the fine-tunes' MLP weights (attention, norms, embeddings and lm_head stay the
base's): the kind of fine-tune a frankenMoE can keep whole, since it takes only the experts' MLPs.
`--base-from FOLDER` reuses a base (and its tokenizer) trained earlier instead of training one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_data import stdlib_corpus, token_stream, train_tokenizer  # noqa: E402

DOMAINS = ("code", "prose")


def _held_out(key: str) -> bool:
    return hashlib.sha256(key.encode()).digest()[0] % 10 == 0


def prose_texts() -> tuple[list[str], list[str]]:
    """(training, held-out) English texts: pydoc topics and installed packages' descriptions."""
    import importlib.metadata
    from pydoc_data.topics import topics

    training, held_out = [], []
    for name in sorted(topics):
        (held_out if _held_out("topic:" + name) else training).append(topics[name])
    seen = set()
    for distribution in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        name = distribution.metadata["Name"]
        body = distribution.metadata.get_payload() if hasattr(distribution.metadata, "get_payload") else None
        text = body or distribution.metadata.get("Description") or ""
        if not name or name in seen or len(text) < 500:
            continue
        seen.add(name)
        (held_out if _held_out("package:" + name) else training).append(text)
    return training, held_out


def code_texts(max_chars: int) -> tuple[list[str], list[str]]:
    corpus = stdlib_corpus()
    return corpus.read(corpus.training, max_chars=max_chars), corpus.read(corpus.held_out, max_chars=max_chars // 4)


def trainable(model, tune_params: str) -> list[torch.nn.Parameter]:
    """The parameters a fine-tune updates: all, or only the decoder layers' MLPs (the rest frozen)."""
    chosen = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(tune_params == "all" or ".mlp." in name)
        if parameter.requires_grad:
            chosen.append(parameter)
    return chosen


def train(
    model, stream: torch.Tensor, *, steps: int, lr: float, seq_len: int, batch: int, seed: int, tune_params="all"
) -> dict:
    """AdamW for `steps` steps: linear warmup over 20, cosine decay to a tenth of `lr`."""
    parameters = trainable(model, tune_params)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    model.train()
    started, cpu_started, step, total, losses = time.perf_counter(), time.process_time(), 0, steps, []
    while step < total:
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=generator)
        tokens = stream[starts[:, None] + offsets]
        warm = min(1.0, (step + 1) / 20)
        decay = 0.5 * (1 + torch.cos(torch.tensor(min(step / max(total, 1), 1.0) * torch.pi))).item()
        for group in optimizer.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * decay)
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 25 == 0:
            print(
                f"  step {step:4d}/{total}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f} s", flush=True
            )
        step += 1
    model.eval()
    final = sum(losses[-20:]) / len(losses[-20:])
    return {
        "steps": step,
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "final_loss": round(final, 4),
        "trained_parameters": sum(p.numel() for p in parameters),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".bench/domains"))
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--tune-steps", type=int, default=150, help="steps of each domain fine-tune")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune-params", choices=("all", "mlp"), default="all", help="what the fine-tunes train")
    parser.add_argument("--base-from", type=Path, help="reuse this base (and its tokenizer) instead of training one")
    args = parser.parse_args()
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a busy shared machine: one thread avoids OpenMP threads waiting on each other
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    prose_train, prose_held = prose_texts()
    code_train, code_held = code_texts(max_chars=3 * sum(map(len, prose_train)))
    texts = {"code": (code_train, code_held), "prose": (prose_train, prose_held)}
    if args.base_from:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.base_from)
    else:
        tokenizer = train_tokenizer(code_train + prose_train, args.vocab)
    streams = {d: torch.tensor(token_stream(tokenizer, texts[d][0])) for d in DOMAINS}
    summary: dict = {"domains": {}, "tune_params": args.tune_params}
    for domain in DOMAINS:
        training, held = texts[domain]
        (out / f"heldout-{domain}.txt").write_text("\n\n".join(held), encoding="utf-8")
        (out / f"calibration-{domain}.txt").write_text("\n\n".join(training)[:200_000], encoding="utf-8")
        summary["domains"][domain] = {
            "training_texts": len(training),
            "training_tokens": len(streams[domain]),
            "held_out_texts": len(held),
        }
        print(f"{domain}: {len(training)} training texts, {len(streams[domain]):,} tokens, {len(held)} held out")
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq_len * 4,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    common = dict(seq_len=args.seq_len, batch=args.batch, seed=args.seed)
    base_folder = out / "base"
    if args.base_from:
        base_folder = args.base_from.resolve()
        summary["base"] = {"from": str(base_folder)}
        if not (out / "base").exists():
            (out / "base").symlink_to(base_folder, target_is_directory=True)  # router_quality.py reads OUT/base
    else:
        model = MistralForCausalLM(config)
        shortest = min(len(s) for s in streams.values())
        mixed = torch.cat([streams[d][:shortest] for d in DOMAINS])  # both domains equally
        print("base on both domains", flush=True)
        summary["base"] = train(model, mixed, steps=args.base_steps, lr=3e-3, **common)
        model.save_pretrained(base_folder)
        tokenizer.save_pretrained(base_folder)
    for index, domain in enumerate(DOMAINS):
        print(f"{domain} fine-tune ({args.tune_params} parameters)", flush=True)
        tuned = MistralForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
        tune = {**common, "seed": index + 1, "tune_params": args.tune_params}
        summary[domain] = train(tuned, streams[domain], steps=args.tune_steps, lr=1e-3, **tune)
        tuned.save_pretrained(out / domain)
        tokenizer.save_pretrained(out / domain)
    (out / "training.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
