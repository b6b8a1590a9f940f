"""Expert choice from calibration statistics: --select parsing, most used, REAP vs frequency pruning."""

from __future__ import annotations

import pytest
import torch

from moemerge.errors import MoemergeError
from moemerge.layerwise import equal_batches
from moemerge.split.select import Selection, experts_to_keep, most_used, parse_select
from moemerge.split.usage import RouterUsage, calibration_chunks


def usage_of(counts: list[float], weight_sums: list[float], reap_sums: list[float], tokens: int) -> RouterUsage:
    usage = RouterUsage.empty(1, len(counts))
    usage.counts[0] = torch.tensor(counts, dtype=torch.float64)
    usage.weight_sums[0] = torch.tensor(weight_sums, dtype=torch.float64)
    usage.reap_sums[0] = torch.tensor(reap_sums, dtype=torch.float64)
    usage.tokens = tokens
    return usage


def test_parse_select():
    assert parse_select("top-usage", 8) == Selection("top-usage", 1)
    assert parse_select("concat:3", 8) == Selection("concat", 3)
    for bad, message in (("concat:0", "between 1 and"), ("concat:9", "8 experts"), ("best", "top-usage or concat:K")):
        with pytest.raises(MoemergeError, match=message):
            parse_select(bad, 8)


def test_reap_and_frequency_disagree_as_defined():
    # Expert 0: routed often with small outputs; expert 2: rarely, with large ones; expert 3: never.
    # REAP = reap_sum / count: e0 = 10/100 = 0.1, e1 = 30/50 = 0.6, e2 = 20/10 = 2.0, e3 = 0.
    usage = usage_of([100, 50, 10, 0], [40, 20, 5, 0], [10, 30, 20, 0], tokens=80)
    assert usage.reap[0].tolist() == pytest.approx([0.1, 0.6, 2.0, 0.0])
    assert usage.mean_routing_weight[0].tolist() == pytest.approx([0.5, 0.25, 0.0625, 0.0])
    assert experts_to_keep(usage, 0, 2, "reap") == [1, 2]
    assert experts_to_keep(usage, 0, 2, "frequency") == [0, 1]
    assert experts_to_keep(usage, 0, 3, "reap") == [0, 1, 2]  # the never-routed expert goes first either way
    assert most_used(usage, 0, 3) == [0, 1, 2]


def test_ties_break_by_routing_weight_then_index():
    usage = usage_of([5, 5, 5, 1], [1, 3, 1, 0], [0, 0, 0, 0], tokens=8)
    assert most_used(usage, 0, 2) == [1, 0]


def test_calibration_chunks_and_batches():
    chunks = calibration_chunks(list(range(23)), seq_len=5, max_tokens=17)
    assert [len(c) for c in chunks] == [5, 5, 5, 2] and chunks[-1] == [15, 16]
    shapes = [tuple(batch.input_ids.shape) for batch in equal_batches(chunks, batch_size=2)]
    assert shapes == [(2, 5), (1, 5), (1, 2)]  # no padding: the short chunk runs alone
