"""Autoregressive sampling from a language model: greedy, temperature, top-k, top-p, stop token."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with probability >= top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token is always kept)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """Pick one token per row of logits (batch, vocab); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probabilities = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    tokens: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Extend tokens (batch, seq) by up to `max_new_tokens`; rows that emit `stop_token` stop growing.

    With `use_cache`, each step feeds only the new token through the KV cache; once the context window is
    full, the model conditions on the last `context_length` tokens (recomputed, as nanoGPT does).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if tokens.shape[1] < 1:
        raise ValueError("generation needs at least one prompt token")
    context_length = model.config.context_length
    was_training = model.training
    model.eval()
    caches = model.new_caches() if use_cache else None
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    pending = tokens[:, -context_length:]  # what the next forward pass must read
    for _ in tqdm(range(max_new_tokens), desc="generating", disable=not progress, leave=False):
        if caches is not None and len(caches[0]) + pending.shape[1] > context_length:
            caches = model.new_caches()
            pending = tokens[:, -context_length:]
        if caches is None:
            pending = tokens[:, -context_length:]
        logits = model(pending, caches=caches)[:, -1, :]
        next_token = sample_next(logits.float(), temperature, top_k, top_p, generator)
        if stop_token is not None:
            next_token = torch.where(finished, torch.full_like(next_token, stop_token), next_token)
            finished |= next_token == stop_token
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        pending = next_token[:, None]
        if stop_token is not None and bool(finished.all()):
            break
    model.train(was_training)
    return tokens
