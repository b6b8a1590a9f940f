"""Held-out perplexity: the yardstick the quality studies and `moemerge-evolve`'s built-in objective share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Perplexity:
    """exp of the mean next-token negative log-likelihood over `tokens` predictions."""

    perplexity: float
    mean_nll: float
    tokens: int


def model_perplexity(model, token_ids: list[int], *, window: int = 256, batch_size: int = 8, device: str = "cpu"):
    """Perplexity of a loaded causal LM on `token_ids` cut into non-overlapping windows.

    ppl = exp(sum of -log p(t_i | t_<i within its window) / number of predicted tokens); the first token
    of each window is context only, and a tail shorter than `window` is dropped.
    """
    import torch
    import torch.nn.functional as F

    window_count = len(token_ids) // window
    if window_count == 0:
        raise ValueError(f"need at least {window} tokens, got {len(token_ids)}")
    windows = torch.tensor(token_ids[: window_count * window], dtype=torch.long).view(window_count, window)
    total_nll = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += nll.double().cpu()
    predicted = window_count * (window - 1)
    mean_nll = total_nll.item() / predicted
    return Perplexity(perplexity=math.exp(mean_nll), mean_nll=mean_nll, tokens=predicted)


def heldout_perplexity(
    model_folder: Path, token_ids: list[int], *, window: int = 256, batch_size: int = 8, device: str = "cpu"
) -> Perplexity:
    """Perplexity of the model saved in `model_folder` (see `model_perplexity`)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).to(device).eval()
    return model_perplexity(model, token_ids, window=window, batch_size=batch_size, device=device)
