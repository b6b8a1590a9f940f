"""Session fixture: a tied toy base and fine-tunes whose vocabularies differ from it (added, shuffled, tied/untied)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moemerge.toys import make_toy_model, make_vocab_variant

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="session")
def vocab_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base: tied lm_head; chat: untied, two added special tokens; tools: tied, ids shuffled, one added plain token;
    same: untied, same vocabulary as the base; untied_base: an untied base with the base's vocabulary."""
    root = tmp_path_factory.mktemp("vocab-models")
    base = make_toy_model(root / "base", seed=0, tie_word_embeddings=True)
    return {
        "base": base,
        "chat": make_vocab_variant(base, root / "chat", seed=1, added_tokens=CHAT_TOKENS),
        "tools": make_vocab_variant(
            base, root / "tools", seed=2, added_tokens=("<tool>",), special=False, permute=True, tie=True
        ),
        "same": make_vocab_variant(base, root / "same", seed=3),
        "untied_base": make_vocab_variant(base, root / "untied_base", seed=4, delta_scale=0.0),
    }
