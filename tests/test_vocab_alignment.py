"""Row maps and default rows (mergekit's PermutedVocabulary rules) on hand-made vocabularies and tensors."""

from __future__ import annotations

import pytest
import torch

from moemerge.errors import ConfigError
from moemerge.vocab.alignment import MISSING, PAD, OutputVocabulary, padded_size, row_map
from moemerge.vocab.config import TokenEmbedding
from moemerge.vocab.rows import align_rows

# Output tokens a..f; "a" in every model, "b" only in m1, "c" in m1 and m2 (not the base), "d" in base and m2,
# "e" in none; model ids are shuffled against the output's.
VOCABS = {
    "base": {"a": 1, "d": 0},
    "m1": {"b": 0, "a": 2, "c": 1},
    "m2": {"c": 0, "a": 1, "d": 2},
}
OUT = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}


def vocabulary(size: int = 5, tokens: dict | None = None) -> OutputVocabulary:
    return OutputVocabulary(
        tokenizer=None,
        vocab=OUT,
        size=size,
        model_rows={model: row_map(OUT, size, vocab) for model, vocab in VOCABS.items()},
        model_vocabs=VOCABS,
        model_sizes={model: len(vocab) for model, vocab in VOCABS.items()},
        token_configs={token: TokenEmbedding.model_validate(value) for token, value in (tokens or {}).items()},
        reference_tokens={},
    )


def tensors() -> dict[str, torch.Tensor]:
    """Each model's rows: 100 * model number + its own id, so every row says where it came from."""
    return {model: torch.tensor([[100.0 * n + i] for i in range(len(VOCABS[model]))]) for n, model in enumerate(VOCABS)}


def own(model: str, token: str) -> float:
    return 100.0 * list(VOCABS).index(model) + VOCABS[model][token]


def test_row_map_by_token_string_with_missing_and_padding():
    assert row_map(OUT, 7, VOCABS["m1"]) == (2, 0, 1, MISSING, MISSING, PAD, PAD)
    assert padded_size(5, 4) == 8 and padded_size(8, 4) == 8 and padded_size(5, None) == 5


def test_defaults_follow_mergekit_rules():
    models = ["m1", "m2", "base"]
    aligned = align_rows(vocabulary().rows_for(models, "base", "embed"), [tensors()[m] for m in models])
    by_model = dict(zip(models, aligned, strict=True))
    for model in models:  # "a": everyone keeps their own row
        assert by_model[model][OUT["a"]].item() == own(model, "a")
    for model in models:  # "b": only m1 has it, everyone takes m1's
        assert by_model[model][OUT["b"]].item() == own("m1", "b")
    assert by_model["base"][OUT["c"]].item() == (own("m1", "c") + own("m2", "c")) / 2  # two donors, no base: mean
    assert by_model["m1"][OUT["c"]].item() == own("m1", "c")
    assert by_model["m1"][OUT["d"]].item() == own("base", "d")  # base has it: base wins over m2
    assert all(by_model[m][OUT["e"]].item() == 0.0 for m in models)  # nobody has it: zeros


def test_base_not_among_inputs_means_average():
    models = ["m1", "m2"]
    aligned = align_rows(vocabulary().rows_for(models, "base", "embed"), [tensors()[m] for m in models])
    assert aligned[0][OUT["d"]].item() == own("m2", "d")  # one donor among these inputs


def test_configured_tokens_zero_model_token_force_and_padding():
    tokens = {
        "b": {"source": {"kind": "zero"}},
        "a": {"source": "m2", "force": True},
        "c": {"source": {"kind": "model_token", "model": "base", "token": "d"}},
    }
    models = ["base", "m1", "m2"]
    aligned = align_rows(
        vocabulary(size=8, tokens=tokens).rows_for(models, "base", "embed"), [tensors()[m] for m in models]
    )
    for tensor in aligned:
        assert tensor.shape == (8, 1)
        assert tensor[OUT["a"]].item() == own("m2", "a")  # forced onto every input, even those with their own
        assert torch.equal(tensor[5:], tensor[:5].mean(dim=0).expand(3, 1))  # padding: the mean of the token rows
    assert aligned[0][OUT["b"]].item() == 0.0
    assert aligned[0][OUT["c"]].item() == own("base", "d")
    assert aligned[1][OUT["c"]].item() == own("m1", "c")  # not forced: m1 keeps its own "c"


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ({"b": {"source": "m2"}}, "model 'm2' has no token 'b'"),
        ({"b": {"source": "elsewhere"}}, "'elsewhere' is not an input"),
        ({"b": {"source": {"kind": "model_token", "model": "m1", "token": "zzz"}}}, "has no token 'zzz'"),
        ({"b": {"force": True}}, "say where its rows come from"),
    ],
)
def test_bad_token_sources_name_the_key(tokens, message):
    with pytest.raises(ConfigError, match="tokenizer.tokens\\['b'\\].source") as error:
        vocabulary(tokens=tokens).rows_for(["base", "m1", "m2"], "base", "embed")
    assert message in str(error.value)
