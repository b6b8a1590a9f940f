"""Merges of models whose vocabularies differ (added tokens, shuffled ids, tied and untied heads), run by transformers.

Expected rows are computed here by token string from each input's own tokenizer and tensors, independently of
moemerge's row maps; expected logits come from a transformers model loaded with those expected weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import read_tensors
from transformers import AutoModelForCausalLM, AutoTokenizer
from vocab_fixtures import CHAT_TOKENS

from moemerge.cli.yaml_command import main as yaml_main

pytest_plugins = ("vocab_fixtures",)

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
TEXT = "<|im_start|>merge the models <tool> now<|im_end|>"


def token_rows(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """Token -> row of `name` (the embeddings when the model ties its lm_head), by the model's own tokenizer."""
    tensors = read_tensors(folder)
    tensor = tensors.get(name, tensors[EMBED])
    return {token: tensor[index] for token, index in AutoTokenizer.from_pretrained(folder).get_vocab().items()}


def expected_rows(out_vocab: dict[str, int], rows: list[dict[str, torch.Tensor]], weights: list[float], base: int):
    """mergekit's rule, per output token: own row, else the only donor's, else the base's, else the donors' mean;
    then the weighted average (linear, normalised)."""
    out = torch.zeros(len(out_vocab), next(iter(rows[0].values())).shape[0])
    for token, index in out_vocab.items():
        donors = [r[token] for r in rows if token in r]
        if len(donors) == 1:
            fill = donors[0]
        elif token in rows[base]:
            fill = rows[base][token]
        else:
            fill = torch.stack(donors).mean(0)
        out[index] = sum(w * r.get(token, fill) for w, r in zip(weights, rows, strict=True)) / sum(weights)
    return out


def merge(recipe: dict, out: Path, tmp_path: Path, command: str = "yaml") -> None:
    import yaml

    from moemerge.cli.moe_command import main as moe_main
    from moemerge.cli.yaml_command import main as yaml_main

    path = tmp_path / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = CliRunner().invoke(yaml_main if command == "yaml" else moe_main, [str(path), str(out), "--quiet"])
    assert result.exit_code == 0, result.output


def logits(folder: Path, state: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Logits of TEXT under the output's tokenizer; with `state`, of the output's architecture holding `state`."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {HEAD}, (missing, unexpected)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0], ids[0].tolist()


def linear_entries(models: dict[str, Path], weights: dict[str, float]) -> list[dict]:
    return [{"model": str(models[name]), "parameters": {"weight": w}} for name, w in weights.items()]


def test_union_maps_rows_by_token_and_runs_added_tokens(vocab_models, tmp_path):
    weights = {"base": 0.5, "chat": 0.3, "tools": 0.2}
    out = tmp_path / "union"
    recipe = {
        "merge_method": "linear",
        "base_model": str(vocab_models["base"]),
        "models": linear_entries(vocab_models, weights),
        "tokenizer_source": "union",
    }
    merge(recipe, out, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = tokenizer.get_vocab()
    base_vocab = AutoTokenizer.from_pretrained(vocab_models["base"]).get_vocab()
    assert {token: vocab[token] for token in base_vocab} == base_vocab  # base ids kept, new tokens appended
    assert [vocab[t] for t in (*CHAT_TOKENS, "<tool>")] == [384, 385, 386]
    added = {info.content: info.special for info in tokenizer.added_tokens_decoder.values()}
    assert added["<|im_start|>"] and added["<|im_end|>"] and not added["<tool>"]  # each input's own settings
    assert tokenizer.decode([384, 100, 385], skip_special_tokens=True) == tokenizer.decode([100])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 387 and config["tie_word_embeddings"] is False
    merged = read_tensors(out)
    expected = {}
    for name in (EMBED, HEAD):
        rows = [token_rows(vocab_models[model], name) for model in weights]
        expected[name] = expected_rows(vocab, rows, list(weights.values()), base=0)
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged[EMBED], merged[HEAD])  # chat's untied lm_head was not dropped
    inputs = {model: read_tensors(vocab_models[model]) for model in weights}
    state = {
        name: sum(w * inputs[m][name] for m, w in weights.items()) / sum(weights.values())
        for name in merged
        if name not in (EMBED, HEAD)
    }
    got, ids = logits(out)
    want, _ = logits(out, {**state, **expected})
    assert {384, 385, 386} <= set(ids)  # the text really uses the added tokens
    assert got.shape == (len(ids), 387)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("first", "second"), [("base", "same"), ("untied_base", "base")])
def test_tied_and_untied_heads_mix(vocab_models, tmp_path, first, second):
    """mergekit's optional, tied lm_head: written when any input stores one; tied inputs give their embeddings."""
    out = tmp_path / "mixed"
    recipe = {"merge_method": "linear", "models": linear_entries(vocab_models, {first: 0.5, second: 0.5})}
    merge(recipe, out, tmp_path)
    merged = read_tensors(out)
    a, b = read_tensors(vocab_models[first]), read_tensors(vocab_models[second])
    expected = 0.5 * a.get(HEAD, a[EMBED]) + 0.5 * b.get(HEAD, b[EMBED])
    torch.testing.assert_close(merged[HEAD], expected)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(model.lm_head.weight, expected)  # transformers uses it rather than tying


def test_all_tied_inputs_give_a_tied_output(vocab_models, tmp_path):
    out = tmp_path / "tied"
    recipe = {"merge_method": "linear", "models": linear_entries(vocab_models, {"base": 0.5, "tools": 0.5})}
    recipe["tokenizer_source"] = "base"
    merge(recipe, out, tmp_path)
    assert HEAD not in read_tensors(out)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 384
    got, _ = logits(out)
    assert got.shape[1] == 384


def test_lm_head_follows_the_last_slice(vocab_models, tmp_path):
    """A frankenmerge ending in a tied model writes no lm_head (mergekit's rule), even though the first stores one."""
    out = tmp_path / "stack"
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(vocab_models["chat"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(vocab_models["tools"]), "layer_range": [2, 4]}]},
        ],
        "tokenizer_source": "union",
    }
    merge(recipe, out, tmp_path)
    merged = read_tensors(out)
    assert HEAD not in merged and json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    chat, tools = token_rows(vocab_models["chat"], EMBED), token_rows(vocab_models["tools"], EMBED)
    torch.testing.assert_close(merged[EMBED][vocab["<tool>"]], torch.zeros(64))  # the first slice lacks it: zeros
    torch.testing.assert_close(merged[EMBED][vocab["<|im_end|>"]], chat["<|im_end|>"])
    assert "<tool>" in tools
    got, ids = logits(out)
    assert got.shape == (len(ids), 387)


def test_tokenizer_from_a_shuffled_model_moves_ids_and_rows(vocab_models, tmp_path):
    """The tokenizer source may be a folder with tokenizer files only; ids and rows follow its vocabulary."""
    out = tmp_path / "shuffled"
    tokenizer_only = tmp_path / "tokenizer-only"
    AutoTokenizer.from_pretrained(vocab_models["tools"]).save_pretrained(tokenizer_only)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(vocab_models["base"]),
        "models": [{"model": str(vocab_models["tools"]), "parameters": {"weight": 0.5}}],
        "tokenizer_source": str(tokenizer_only),
    }
    merge(recipe, out, tmp_path)
    dry = CliRunner().invoke(yaml_main, [str(tmp_path / "shuffled.yml"), str(tmp_path / "dry"), "--dry-run"])
    assert "vocabulary: 385 tokens in 385 rows; tensors mapped by token: 1" in dry.output, dry.output
    tools_tokenizer = AutoTokenizer.from_pretrained(vocab_models["tools"])
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tools_tokenizer.get_vocab()
    eos = tools_tokenizer.eos_token_id
    assert eos != 1  # the shuffle moved it
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos
    base_rows, tools_rows = token_rows(vocab_models["base"], EMBED), token_rows(vocab_models["tools"], EMBED)
    merged = read_tensors(out)[EMBED]
    for token, index in tools_tokenizer.get_vocab().items():
        base_row = base_rows.get(token, tools_rows[token])  # <tool>: only tools has it, the base takes its row
        torch.testing.assert_close(merged[index], base_row + 0.5 * (tools_rows[token] - base_row))


def test_tokenizer_block_tokens_and_padding(vocab_models, tmp_path):
    out = tmp_path / "block"
    chat = str(vocab_models["chat"])
    recipe = {
        "merge_method": "linear",
        "models": linear_entries(vocab_models, {"base": 0.5, "chat": 0.5}),
        "tokenizer": {
            "source": "base",
            "pad_to_multiple_of": 64,
            "tokens": {
                "<|im_start|>": {"source": chat},
                "<think>": {"source": {"kind": "model_token", "model": chat, "token": "<|im_end|>"}},
                "<s>": {"source": {"kind": "zero"}, "force": True},
            },
        },
    }
    merge(recipe, out, tmp_path)
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert len(vocab) == 386 and "<|im_end|>" not in vocab
    merged = read_tensors(out)[EMBED]
    assert merged.shape[0] == 448 and json.loads((out / "config.json").read_text())["vocab_size"] == 448
    chat_rows = token_rows(vocab_models["chat"], EMBED)
    torch.testing.assert_close(merged[vocab["<|im_start|>"]], chat_rows["<|im_start|>"])
    torch.testing.assert_close(merged[vocab["<think>"]], chat_rows["<|im_end|>"])
    assert not merged[vocab["<s>"]].any()
    torch.testing.assert_close(merged[386:], merged[:386].mean(0).expand(62, -1))  # padding: mean token row
    got, ids = logits(out)
    assert got.shape == (len(ids), 448)


@pytest.mark.parametrize(
    ("template", "start"),
    [
        ("chatml", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
        (
            "llama3",
            "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        ("mistral", "<s> [INST] hi [/INST]"),
        ("alpaca", "\n\n### Instruction:\nhi\n\n### Response:\n"),
        ("exaone", "[|system|][|endofturn|]\n[|user|]hi\n[|assistant|]"),
    ],
)
def test_named_chat_template_is_written(vocab_models, tmp_path, template, start):
    out = tmp_path / "chat"
    recipe = {
        "merge_method": "linear",
        "models": linear_entries(vocab_models, {"base": 1.0}),
        "chat_template": template,
    }
    merge(recipe, out, tmp_path)
    text = AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == start


def test_auto_chat_template_takes_the_most_common(vocab_models, tmp_path):
    folders = {}
    for name, template in (
        ("base", "{{ 'A' }}{{ messages[0]['content'] }}"),
        ("same", "{{ 'B' }}{{ messages[0]['content'] }}"),
        ("chat", "{{ 'B' }}{{ messages[0]['content'] }}"),
    ):
        folders[name] = shutil.copytree(vocab_models[name], tmp_path / name)
        tokenizer = AutoTokenizer.from_pretrained(folders[name])
        tokenizer.chat_template = template
        tokenizer.save_pretrained(folders[name])
    out = tmp_path / "auto"
    recipe = {"merge_method": "linear", "models": linear_entries(folders, {"base": 0.4, "same": 0.3, "chat": 0.3})}
    merge({**recipe, "chat_template": "auto", "tokenizer_source": "union"}, out, tmp_path)
    assert (
        AutoTokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        == "Bhi"
    )


def test_clown_car_moe_of_finetunes_with_added_tokens(vocab_models, tmp_path):
    out = tmp_path / "moe"
    recipe = {
        "base_model": str(vocab_models["base"]),
        "gate_mode": "random",
        "experts_per_token": 2,
        "tokenizer_source": "union",
        "chat_template": "chatml",
        "experts": [{"source_model": str(vocab_models[name])} for name in ("chat", "tools", "same")],
    }
    merge(recipe, out, tmp_path, command="moe")
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    merged = read_tensors(out)
    assert merged[EMBED].shape[0] == 387 and HEAD not in merged  # the base ties its lm_head, so does the MoE
    rows = {name: token_rows(vocab_models[name], EMBED) for name in ("base", "chat", "tools")}
    for token in ("<s>", *list(rows["base"])[::50]):
        torch.testing.assert_close(merged[EMBED][vocab[token]], rows["base"][token])  # the base's own rows
    torch.testing.assert_close(merged[EMBED][vocab["<|im_end|>"]], rows["chat"]["<|im_end|>"])
    torch.testing.assert_close(merged[EMBED][vocab["<tool>"]], rows["tools"]["<tool>"])
    got, ids = logits(out)
    assert {384, 385, 386} <= set(ids) and got.shape == (len(ids), 387) and torch.isfinite(got).all()


@pytest.mark.skipif(not os.environ.get("MOEMERGE_MERGEKIT_PYTHON"), reason="set MOEMERGE_MERGEKIT_PYTHON to compare")
def test_union_matches_mergekit(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "vocab_parity.py"
    mergekit = os.environ["MOEMERGE_MERGEKIT_PYTHON"]
    run = subprocess.run(
        [sys.executable, str(script), "--mergekit-python", mergekit, "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(run.stdout[run.stdout.index("{") :])
    for name, result in report.items():
        assert not result["tokens"]["only_moemerge"] and not result["tokens"]["only_mergekit"], name
        for tensor in (EMBED, HEAD):
            if "max_abs_diff_same_token" in result[tensor]:
                assert result[tensor]["max_abs_diff_same_token"] == 0.0, (name, tensor)
            else:  # neither tool wrote it
                assert result[tensor] == {"moemerge": False, "mergekit": False}, (name, tensor)
        assert result["other_tensors_max_abs_diff"] == 0.0
