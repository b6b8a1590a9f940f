"""Train a small Mixtral-style MoE on Python's standard-library sources, so split quality can be measured.

Random weights say nothing about what an expert extraction keeps, so this trains one for a few CPU
minutes: a byte-level BPE tokenizer on the training split, then MixtralForCausalLM with the router's
load-balancing loss on (so every expert gets used). Writes a model folder (save_pretrained + tokenizer)
with `heldout.txt` (never trained on), `calibration.txt` (from the training split) and `training.json`.

    python scripts/train_toy_moe.py --minutes 6 --out .bench/toy-moe
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_data import BOS, EOS, PAD, heldout_perplexity, stdlib_corpus, token_stream, train_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".bench/toy-moe"), help="model folder to write")
    parser.add_argument("--minutes", type=float, default=7.0, help="wall-clock training budget")
    parser.add_argument("--steps", type=int, default=None, help="exact step count (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-intermediate", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--aux-coef", type=float, default=0.02, help="router load-balancing loss weight")
    parser.add_argument("--calibration-chars", type=int, default=400_000)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def mixtral_config(args: argparse.Namespace):
    """The toy Mixtral config: small dense parts, `--experts` experts of `--expert-intermediate` each."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.expert_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=max(512, args.seq_len),
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        router_jitter_noise=0.0,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


def learning_rate(step: int, total_steps: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import MixtralForCausalLM

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    corpus = stdlib_corpus()
    training_texts = corpus.read(corpus.training)
    print(
        f"corpus: {corpus.root}, {len(corpus.training)} training files ({sum(map(len, training_texts)):,} chars), "
        f"{len(corpus.held_out)} held-out files, {len(corpus.calibration)} calibration files",
        flush=True,
    )
    tokenizer = train_tokenizer(training_texts, args.vocab)
    stream = torch.tensor(token_stream(tokenizer, training_texts), dtype=torch.long)
    print(f"tokenizer: vocab {len(tokenizer)}, {len(stream):,} training tokens ({time.perf_counter() - started:.0f} s)")

    config = mixtral_config(args)
    model = MixtralForCausalLM(config).to(args.device).train()
    parameter_count = sum(p.numel() for p in model.parameters())
    print(f"model: {parameter_count:,} parameters, {args.experts} experts top-{args.top_k}", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq_len + 1)

    total_steps = args.steps or 10**9  # fixed after timing the first steps when only --minutes is given
    history: list[dict] = []
    train_started = time.perf_counter()
    step = 0
    while step < total_steps:
        if args.steps is None and step == 20:
            seconds_per_step = (time.perf_counter() - train_started) / step
            total_steps = max(step + 1, int(args.minutes * 60 / seconds_per_step))
            print(f"{seconds_per_step:.2f} s/step -> {total_steps} steps in {args.minutes} min", flush=True)
        starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch,), generator=generator)
        batch = stream[starts[:, None] + offsets].to(args.device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, args.lr)
        output = model(input_ids=batch, labels=batch)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lm_loss = output.loss.item() - args.aux_coef * output.aux_loss.item()
        history.append({"step": step, "lm_loss": lm_loss, "aux_loss": output.aux_loss.item()})
        if step % 50 == 0 or step == total_steps - 1:
            elapsed = time.perf_counter() - train_started
            aux_loss = history[-1]["aux_loss"]
            print(f"step {step:5d}  {elapsed:6.0f} s  lm loss {lm_loss:.3f}  aux {aux_loss:.3f}", flush=True)
        step += 1
    train_seconds = time.perf_counter() - train_started
    final_loss = sum(h["lm_loss"] for h in history[-50:]) / len(history[-50:])

    args.out = args.out.resolve()
    if args.out.exists():
        shutil.rmtree(args.out)
    model.config.output_router_logits = False  # inference and splitting need no auxiliary loss
    model.to("cpu").save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "heldout.txt").write_text("\n\n".join(corpus.read(corpus.held_out)), encoding="utf-8")
    calibration = corpus.read(corpus.calibration, max_chars=args.calibration_chars)
    (args.out / "calibration.txt").write_text("\n\n".join(calibration), encoding="utf-8")

    heldout_ids = tokenizer((args.out / "heldout.txt").read_text(encoding="utf-8"))["input_ids"][: 64 * args.seq_len]
    measured = heldout_perplexity(args.out, heldout_ids, window=args.seq_len, batch_size=8)
    summary = {
        "corpus_root": str(corpus.root),
        "python": sys.version.split()[0],
        "training_files": len(corpus.training),
        "held_out_files": len(corpus.held_out),
        "calibration_files_written": len(calibration),
        "training_tokens": len(stream),
        "parameters": parameter_count,
        "steps": step,
        "tokens_seen": step * args.batch * args.seq_len,
        "train_seconds": round(train_seconds, 1),
        "final_train_lm_loss_mean_last_50": round(final_loss, 4),
        "heldout_perplexity_first_64_windows": round(measured.perplexity, 3),
        "uniform_perplexity": len(tokenizer),
        "args": {key: str(value) for key, value in vars(args).items()},
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"trained {step} steps in {train_seconds:.0f} s; final train loss {final_loss:.3f} "
        f"(train ppl {math.exp(final_loss):.1f}); held-out ppl {measured.perplexity:.2f} on {measured.tokens:,} "
        f"tokens vs uniform {len(tokenizer)}; wrote {args.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
