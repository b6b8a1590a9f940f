"""The quality study's yardstick and data split (scripts/quality_data.py, scripts/split_quality.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from quality_data import heldout_perplexity, split_of, stdlib_corpus, token_stream  # noqa: E402
from split_quality import heldout_windows, markdown_table, put_between_markers  # noqa: E402

from moemerge.toys import make_toy_model, toy_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def toy_llama(tmp_path_factory) -> Path:
    return make_toy_model(tmp_path_factory.mktemp("quality") / "llama", seed=3)


def _independent_mean_nll(folder: Path, token_ids: list[int], window: int) -> float:
    """One window at a time, log-softmax by hand: mean of -log p(next token) over every window's predictions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll, predicted = 0.0, 0
    for start in range(0, len(token_ids) - window + 1, window):
        ids = torch.tensor([token_ids[start : start + window]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        log_probs = logits - logits.exp().sum(-1, keepdim=True).log()
        for position in range(window - 1):
            nll -= log_probs[position, ids[0, position + 1]].item()
            predicted += 1
    return nll / predicted


def test_perplexity_matches_an_independent_computation(toy_llama):
    token_ids = torch.randint(0, 384, (5 * 16 + 7,), generator=torch.Generator().manual_seed(0)).tolist()
    measured = heldout_perplexity(toy_llama, token_ids, window=16, batch_size=2)
    expected = _independent_mean_nll(toy_llama, token_ids, window=16)
    assert measured.tokens == 5 * 15  # 5 whole windows, first token of each is context only, tail of 7 dropped
    assert measured.mean_nll == pytest.approx(expected, rel=1e-5)
    assert measured.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_uniform_logits_give_the_vocabulary_size(toy_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_llama, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(tmp_path / "uniform")
    measured = heldout_perplexity(tmp_path / "uniform", list(range(40)), window=8, batch_size=3)
    assert measured.tokens == 5 * 7
    assert measured.perplexity == pytest.approx(384, rel=1e-6)


def test_too_few_tokens_is_an_error(toy_llama):
    with pytest.raises(ValueError, match="at least 16 tokens"):
        heldout_perplexity(toy_llama, list(range(10)), window=16)


def test_token_stream_ends_each_text_with_eos():
    tokenizer = toy_tokenizer()
    texts = ["def add(a, b):", "return a + b"]
    first, second = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts)
    assert token_stream(tokenizer, texts) == [*first, tokenizer.eos_token_id, *second, tokenizer.eos_token_id]


def _fake_stdlib(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")


def test_corpus_split_is_by_path_disjoint_and_stable(tmp_path):
    kept = [f"pkg{i % 3}/module_{i}.py" for i in range(80)]
    excluded = ["test/test_x.py", "site-packages/lib.py", "idlelib/run.py", "_sysconfigdata_x.py", "pkg0/notes.txt"]
    _fake_stdlib(tmp_path, kept + excluded)
    corpus = stdlib_corpus(tmp_path)

    assert sorted(corpus.training + corpus.held_out) == sorted(set(kept))  # every file once, exclusions dropped
    assert not set(corpus.held_out) & set(corpus.training)
    assert set(corpus.calibration) <= set(corpus.training)
    assert corpus.held_out and corpus.calibration  # ~10% each of 80 files
    assert corpus.held_out == sorted(name for name in kept if split_of(name) == "held_out")
    assert corpus.calibration == sorted(name for name in kept if split_of(name) == "calibration")
    assert stdlib_corpus(tmp_path) == corpus

    # A file's split depends only on its own path, not on which other files exist.
    for name in kept[::2]:
        (tmp_path / name).unlink()
    fewer = stdlib_corpus(tmp_path)
    assert fewer.held_out == [name for name in corpus.held_out if name in kept[1::2]]


def test_this_interpreters_stdlib_has_a_held_out_split():
    corpus = stdlib_corpus()
    assert len(corpus.held_out) > 10 and len(corpus.training) > 100
    assert not set(corpus.held_out) & set(corpus.training)


def test_heldout_windows_are_whole_windows_spread_over_the_text():
    def tokenizer(text, add_special_tokens):
        return {"input_ids": list(range(len(text)))}

    ids = heldout_windows(tokenizer, "x" * 103, window=10, count=4)  # 10 whole windows available
    assert ids == [*range(0, 10), *range(20, 30), *range(50, 60), *range(80, 90)]
    with pytest.raises(SystemExit, match="fewer than --windows 11"):
        heldout_windows(tokenizer, "x" * 103, window=10, count=11)


def test_table_folds_experts_and_divides_by_the_original():
    def row(mode, flags, ppl):
        return dict(
            mode=mode, flags=flags, parameters=2_000_000, active_parameters=1_000_000, size_mb=8.0,
            perplexity=ppl, mean_nll=math.log(ppl),
        )  # fmt: skip

    report = {
        "results": [
            row("original MoE", "", 10.0),
            row("expert 0", "--expert 0", 50.0),
            row("expert 1", "--expert 1", 30.0),
            row("average", "--average", 80.0),
        ]
    }
    lines = markdown_table(report).splitlines()
    assert lines[2].startswith("| original MoE |") and lines[2].endswith("| 10.00 | 1.00 |")
    assert lines[3].startswith("| expert N, best (N=1) |") and lines[3].endswith("| 30.00 | 3.00 |")
    assert lines[4].startswith("| expert N, mean of 2 |") and lines[4].endswith("| 40.00 | 4.00 |")
    assert lines[5].startswith("| expert N, worst (N=0) |") and lines[5].endswith("| 50.00 | 5.00 |")
    assert lines[6] == "| average | `--average` | 2.00 M | 1.00 M | 8.0 MB | 80.00 | 8.00 |"


def test_table_goes_between_the_markers_only():
    readme = "intro\n<!-- quality-table -->\nold table\n<!-- /quality-table -->\noutro\n"
    assert put_between_markers(readme, "new") == "intro\n<!-- quality-table -->\nnew\n<!-- /quality-table -->\noutro\n"
    with pytest.raises(SystemExit, match="markers"):
        put_between_markers("no markers here", "new")
