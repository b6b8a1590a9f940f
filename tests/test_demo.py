"""The demo's per-model line: decoded text, and a legend that says what each printed number is."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import demo  # noqa: E402


def test_demo_line_shows_decoded_text_and_the_logit_shift(toy_models, capsys):
    base_logits = demo.prompt_logits(toy_models["base"])
    demo.generate(toy_models["coder"], base_logits)
    same = capsys.readouterr().out
    demo.generate(toy_models["base"], base_logits)
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"base: LlamaForCausalLM, 4 layers; 'Merging language models' -> '(.*)'; Δlogit (\S+)", line)
    assert match, line
    assert match[2] == "0.0000" and match[1] and "[" not in match[1]  # text, not a list of token ids
    assert float(re.search(r"Δlogit (\S+)", same)[1]) > 0  # a fine-tune differs from its base
    assert "Δlogit = mean |logit - base model's logit|" in demo.LEGEND and "continuation" in demo.LEGEND
