"""`moemerge-split --dry-run` prints a per-layer table (per tensor with -v) that matches what a real run writes."""

from __future__ import annotations

import re

import yaml
from split_fixtures import read_tensors, run_split

from moemerge.sizes import format_bytes


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def rows(output: str) -> dict[str, list[str]]:
    """Table rows keyed by their first cell (a layer, `-`, `total` or a tensor name), cells split on 2+ spaces."""
    table = {}
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and (cells[0] in ("-", "total") or cells[0].isdigit() or cells[0].startswith(("model.", "lm_"))):
            table[cells[0]] = cells
    return table


def recipe_layers(folder) -> dict[int, dict]:
    recipe = yaml.safe_load((folder / "moemerge_split_config.yml").read_text())
    return {int(layer): described for layer, described in recipe["layers"].items()}


def written_bytes(folder) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in read_tensors(folder).values())


def test_expert_dry_run_is_a_layer_table_with_the_written_size(split_models, tmp_path):
    output = ok(run_split(split_models["mixtral"], tmp_path / "out", "--expert", 2, "--dry-run"))
    assert not (tmp_path / "out").exists()
    assert "{" not in output and "'" not in output
    table = rows(output)
    assert [table[str(layer)][3] for layer in range(4)] == ["expert 2"] * 4
    assert table["-"][1] == "3"  # embeddings, final norm, lm_head
    ok(run_split(split_models["mixtral"], tmp_path / "out", "--expert", 2))
    size = format_bytes(written_bytes(tmp_path / "out"))
    assert table["total"][1:3] == [str(len(read_tensors(tmp_path / "out"))), size]
    assert f"mistral, 39 tensors, {size} (float32)" in output


def test_prune_dry_run_lists_kept_and_dropped_experts_per_layer(split_models, calibrated_prune, tmp_path):
    output = ok(run_split(split_models["mixtral"], tmp_path / "out", "--prune-to", 2,
                          "--usage", calibrated_prune / "usage.json", "--dry-run"))  # fmt: skip
    assert "{" not in output and "kept experts" in output and "dropped experts" in output
    table = rows(output)
    for layer, described in recipe_layers(calibrated_prune / "pruned").items():
        kept = described["kept_experts"]
        dropped = sorted(set(range(4)) - set(kept))
        assert table[str(layer)][3:5] == [", ".join(map(str, kept)), ", ".join(map(str, dropped))]
        assert table[str(layer)][5].endswith("%")
    assert table["total"][2] == format_bytes(written_bytes(calibrated_prune / "pruned"))
    assert "calibration: 708 tokens; experts ranked by reap" in output


def test_prune_dry_run_per_tensor_names_each_kept_expert(split_models, calibrated_prune, tmp_path):
    output = ok(run_split(split_models["mixtral"], tmp_path / "out", "--prune-to", 2,
                          "--usage", calibrated_prune / "usage.json", "--dry-run", "-v"))  # fmt: skip
    table = rows(output)
    written = read_tensors(calibrated_prune / "pruned")
    assert set(written) == set(table) - {"total"}
    for layer, described in recipe_layers(calibrated_prune / "pruned").items():
        for new_index, old_index in enumerate(described["kept_experts"]):
            row = table[f"model.layers.{layer}.block_sparse_moe.experts.{new_index}.w2.weight"]
            assert row[1:5] == ["64×128", "float32", format_bytes(64 * 128 * 4), f"expert {old_index}"]
        router = table[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert router[4] == "slice of experts " + ", ".join(map(str, described["kept_experts"]))
    assert table["model.embed_tokens.weight"][4] == "copied"


def test_concat_dry_run_shows_scales_and_the_shared_expert(split_models, tmp_path):
    calibration = split_models["calibration"]
    output = ok(run_split(split_models["qwen2_moe"], tmp_path / "out", "--select", "concat:2", "--calibration",
                          calibration, "--max-tokens", 64, "--dry-run"))  # fmt: skip
    assert "{" not in output and "shared expert scale" in output
    for layer in range(4):
        cells = rows(output)[str(layer)]
        assert re.fullmatch(r"experts \d, \d \+ shared expert", cells[3]), cells
        assert len(cells[4].split(", ")) == 2 and 0 < float(cells[5]) < 1


def test_all_experts_dry_run_is_one_row_per_folder(split_models, tmp_path):
    output = ok(run_split(split_models["mixtral"], tmp_path / "out", "--all-experts", "--dry-run"))
    table = {line.split()[0]: line for line in output.splitlines() if line.startswith(("expert-", "total"))}
    assert [table[f"expert-0{e}"].split("  ")[1].strip() for e in range(4)] == [
        f"expert {e} in every layer" for e in range(4)
    ]
    assert "4 folders" in table["total"] and "{" not in output


def test_fused_only_family_per_tensor_dry_run_names_the_sliced_experts(split_models, tmp_path):
    output = ok(run_split(split_models["gpt_oss"], tmp_path / "out", "--prune-to", 2, "--calibration",
                          split_models["calibration"], "--max-tokens", 64, "--dry-run", "-v"))  # fmt: skip
    table = rows(output)
    assert not any(key.isdigit() for key in table)  # one row per tensor, none per layer
    for layer in range(4):
        fused = table[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        assert fused[1].startswith("2×") and re.fullmatch(r"slice of experts \d, \d", fused[4]), fused
        assert table[f"model.layers.{layer}.mlp.router.bias"][4] == fused[4]
