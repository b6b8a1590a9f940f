"""Router weights: one row per expert per layer, from prompt directions or from a seed.

Prompt modes turn each expert's prompts into a direction in the residual stream: mean over the
positive prompts minus mean over the negative prompts, L2-normalised per layer. A token whose hidden
state points that way scores highest for that expert.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

from moemerge.errors import ConfigError

log = logging.getLogger(__name__)

PARALLEL_COSINE = 0.99  # rows closer than this cannot separate tokens: the prompts are too similar
NOISE_SEED_OFFSET = 1_000_003  # keeps router noise independent of random-mode rows for the same seed


def last_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real (mask 1) token, whichever side the padding is on."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(dim=1)


def pool_prompts(hidden: torch.Tensor, attention_mask: torch.Tensor, pool: str) -> torch.Tensor:
    """[batch, tokens, hidden] → [batch, hidden]: the last real token's state, or the mean over real tokens."""
    if pool == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_real_positions(attention_mask)]
    if pool == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    raise ValueError(f"unknown pooling {pool!r}")


def normalise(vectors: torch.Tensor, what: str) -> torch.Tensor:
    """L2-normalise along the last dimension; a zero vector means the prompts cancel out."""
    norms = vectors.norm(dim=-1, keepdim=True)
    if bool((norms <= 1e-12).any()):
        raise ConfigError(f"{what}: positive and negative prompts give the same direction; the router row is zero")
    return vectors / norms


def prompt_direction(positive_mean: torch.Tensor, negative_mean: torch.Tensor | None, what: str) -> torch.Tensor:
    """normalise(mean(positive) - mean(negative)) per layer; inputs are [layers, hidden]."""
    direction = positive_mean if negative_mean is None else positive_mean - negative_mean
    return normalise(direction.float(), what)


def random_rows(layers: int, experts: int, hidden: int, seed: int, uniform: bool) -> torch.Tensor:
    """[layers, experts, hidden]: standard normal, or uniform in ±1/sqrt(hidden)."""
    generator = torch.Generator().manual_seed(seed)
    if uniform:
        bound = 1.0 / math.sqrt(hidden)
        return (torch.rand((layers, experts, hidden), generator=generator) * 2 - 1) * bound
    return torch.randn((layers, experts, hidden), generator=generator)


def add_noise(rows: torch.Tensor, noise: list[float], seed: int) -> torch.Tensor:
    """rows[:, e] += noise[e] * N(0, 1), from a generator derived from the seed (same seed, same noise)."""
    generator = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET)
    draws = torch.randn(rows.shape, generator=generator)
    scale = torch.tensor(noise, dtype=rows.dtype).view(1, -1, 1)
    return rows + scale * draws.to(rows.dtype)


def parallel_pairs(rows: torch.Tensor, threshold: float = PARALLEL_COSINE) -> dict[tuple[int, int], int]:
    """(expert i, expert j) → number of layers where their rows' cosine exceeds the threshold."""
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = unit @ unit.transpose(1, 2)  # [layers, experts, experts]
    pairs: dict[tuple[int, int], int] = {}
    experts = rows.shape[1]
    for i in range(experts):
        for j in range(i + 1, experts):
            count = int((cosine[:, i, j] > threshold).sum())
            if count:
                pairs[(i, j)] = count
    return pairs


def warn_parallel(rows: torch.Tensor) -> None:
    layers = rows.shape[0]
    for (i, j), count in parallel_pairs(rows).items():
        log.warning(
            "experts[%d] and experts[%d] have nearly parallel router rows (cosine > %.2f) in %d of %d layers: "
            "their prompts are too similar for the router to tell them apart",
            i,
            j,
            PARALLEL_COSINE,
            count,
            layers,
        )


FIT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # L2 strengths tried; the one with the best held-out NLL is kept
SMALL_FIT = 1 << 20  # state elements below which a fit runs on one thread (thread hand-offs cost more than the work)


@contextlib.contextmanager
def threads_for(elements: int):
    """One torch thread for a small fit, restored after: on a busy machine, each of the hundreds of small L-BFGS
    steps otherwise waits for every thread of the pool (measured 40× slower with 2 threads on 2 loaded cores)."""
    before = torch.get_num_threads()
    if elements < SMALL_FIT:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_softmax_rows(states: torch.Tensor, targets: torch.Tensor, experts: int, l2: float) -> torch.Tensor:
    """argmin_W mean(−Σ_e target_e · log softmax(states Wᵀ)_e) + l2·‖W‖² (no intercept: a router has none), by
    L-BFGS; `targets` are class indices or rows of probabilities."""
    rows = torch.zeros(experts, states.shape[1], dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.LBFGS([rows], lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(states @ rows.T, targets) + l2 * rows.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return rows.detach()


def routing_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of tokens whose top expert is one the target wants: target[top] / max(target), so for class indices
    plain accuracy, and for a "not expert e" target (uniform over the others) 1 whenever the top expert is not e."""
    top = logits.argmax(dim=1)
    if targets.is_floating_point():
        picked = targets.gather(1, top[:, None]).squeeze(1)
        return float((picked / targets.max(dim=1).values).mean())
    return float((top == targets).float().mean())


def fit_router_rows(
    states: torch.Tensor,
    labels: torch.Tensor,
    experts: int,
    *,
    groups: torch.Tensor | None = None,
    held_out: float = 0.2,
    seed: int = 0,
) -> tuple[torch.Tensor, dict]:
    """[experts, hidden] router rows from multinomial logistic regression of `labels` on `states`.

    P(e | x) = softmax(W x)_e, the router's own softmax, so the fitted W is a router whose probabilities
    are calibrated on the data. `labels` are expert indices [tokens] or target probabilities [tokens, experts]
    (e.g. uniform over the experts a token must not go to). The L2 strength is chosen on a held-out share of
    `groups` (whole sequences, so neighbouring tokens do not leak across the split), then W is refitted on
    everything. States are standardised by one global scale (the router has no bias, so no per-feature
    centring), undone at the end. Returns the rows and a summary (chosen L2, held-out accuracy and NLL per strength).
    """
    states = states.float()
    if labels.is_floating_point():
        labels = labels.float()
    scale = states.pow(2).mean().sqrt().clamp_min(1e-12)
    states = states / scale
    groups = torch.arange(len(labels)) if groups is None else groups
    unique = groups.unique()
    generator = torch.Generator().manual_seed(seed)
    chosen = unique[torch.randperm(len(unique), generator=generator)[: max(1, int(len(unique) * held_out))]]
    test = torch.isin(groups, chosen)
    if test.all() or not test.any():
        test = torch.zeros(len(labels), dtype=torch.bool)
        test[:: max(2, int(1 / max(held_out, 1e-6)))] = True
    summary: dict = {"tokens": len(labels), "held_out_tokens": int(test.sum()), "by_l2": {}}
    best = (float("inf"), FIT_L2_GRID[0])
    with threads_for(states.numel()):
        for l2 in FIT_L2_GRID:
            rows = _fit_softmax_rows(states[~test], labels[~test], experts, l2)
            logits = states[test] @ rows.T
            nll = float(torch.nn.functional.cross_entropy(logits, labels[test]))
            accuracy = routing_accuracy(logits, labels[test])
            summary["by_l2"][l2] = {"nll": round(nll, 4), "accuracy": round(accuracy, 4)}
            best = min(best, (nll, l2))
        summary["l2"] = best[1]
        summary["held_out_accuracy"] = summary["by_l2"][best[1]]["accuracy"]
        rows = _fit_softmax_rows(states, labels, experts, best[1])
    return rows / scale, summary
