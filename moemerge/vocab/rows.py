"""Apply a tensor's row maps: each input's vocabulary-indexed tensor laid out in the output's token order."""

from __future__ import annotations

import torch

from moemerge.vocab.alignment import MISSING, PAD, VocabRows


def default_rows(vocab: VocabRows, tensors: list[torch.Tensor]) -> torch.Tensor:
    """[defaults, ...]: each default row, the mean of its source rows (zeros where it has none)."""
    sample = tensors[0]
    fills = sample.new_zeros((len(vocab.defaults), *sample.shape[1:]))
    for position, default in enumerate(vocab.defaults):
        for index, row in default.sources:
            fills[position] += tensors[index][row]
        if len(default.sources) > 1:
            fills[position] /= len(default.sources)
    return fills


def align_rows(vocab: VocabRows, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each input as an output-sized tensor: its own rows where it has the token, defaults or padding elsewhere."""
    fills = default_rows(vocab, tensors)
    device = tensors[0].device
    default_at = torch.tensor([default.out_row for default in vocab.defaults], dtype=torch.long, device=device)
    aligned = []
    for tensor, rows in zip(tensors, vocab.rows, strict=True):
        index = torch.tensor(rows, dtype=torch.long, device=device)
        own = index >= 0
        out = tensor.index_select(0, index.clamp(min=0))  # one gather; rows the input lacks are set below
        lacking_rows = (~own).nonzero().squeeze(1)
        out[lacking_rows] = 0
        if len(default_at):
            lacking = index[default_at] == MISSING
            out[default_at[lacking]] = fills[lacking]
        padding = index == PAD
        if padding.any():
            out[padding] = out[: vocab.tokens].mean(dim=0)
        aligned.append(out)
    return aligned
