"""The text the quality study trains and measures on (Python's own standard-library sources), and its yardstick.

Real text that ships with every Python, so the study needs no download. Files are listed in sorted
order and assigned to a split by a hash of their path relative to the stdlib folder, so the split of
a file does not depend on which other files exist:

- held-out: sha256(path)[0] % 10 == 0 (about 10% of files; never trained on),
- calibration: sha256(path)[0] % 10 == 1 (about 10%; part of the training split, used by `--calibration`),
- training: every file that is not held-out.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from moemerge.quality import Perplexity, heldout_perplexity  # noqa: F401  (the scripts' yardstick)

# Folders left out: test suites (huge, repetitive data files), IDLE and lib2to3 (large, niche),
# demos, and third-party packages installed into this interpreter.
EXCLUDED_FOLDERS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
BOS, EOS, PAD = 0, 1, 2


@dataclass(frozen=True)
class StdlibCorpus:
    """Relative paths of the stdlib `.py` files in each split (sorted)."""

    root: Path
    training: list[str]
    held_out: list[str]
    calibration: list[str]

    def read(self, relative_paths: list[str], max_chars: int | None = None) -> list[str]:
        """The texts of `relative_paths`, in order, stopping once `max_chars` characters are collected."""
        texts, total = [], 0
        for relative in relative_paths:
            text = (self.root / relative).read_text(encoding="utf-8", errors="replace")
            texts.append(text)
            total += len(text)
            if max_chars is not None and total >= max_chars:
                break
        return texts


def split_of(relative_path: str) -> str:
    """'held_out', 'calibration' or 'training' for a path relative to the stdlib folder."""
    bucket = hashlib.sha256(relative_path.encode()).digest()[0] % 10
    return {0: "held_out", 1: "calibration"}.get(bucket, "training")


def stdlib_corpus(root: Path | None = None) -> StdlibCorpus:
    """Every stdlib `.py` file outside EXCLUDED_FOLDERS, split by path hash."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    relative_paths = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*.py")
        if not EXCLUDED_FOLDERS.intersection(path.relative_to(root).parts[:-1])
        and not path.name.startswith("_sysconfigdata")  # machine-specific build settings
    )
    splits = {name: [] for name in ("training", "held_out", "calibration")}
    for relative in relative_paths:
        split = split_of(relative)
        splits[split].append(relative)
        if split == "calibration":
            splits["training"].append(relative)
    return StdlibCorpus(root=root, **splits)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts` with the `tokenizers` library (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """All texts encoded and joined into one stream, each text followed by the end-of-text token."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    return stream
