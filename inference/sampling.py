"""Turn next-token logits into tokens: temperature, nucleus (top-p) filtering, seeded sampling.

Pure tensor functions with no engine state, so the batching engine can reuse them row by row and tests
can pin them without a model. Shapes: B = rows (requests), V = vocabulary.
"""

from __future__ import annotations

import torch


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Return the sampling distribution [B, V] for logits [B, V] at `temperature` > 0 after top-p filtering."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 to sample; use greedy decoding for 0")
    logits = logits.float()
    # Subtract the row maximum before dividing: every scaled logit is then <= 0, so a tiny temperature gives
    # -inf and 0 rather than inf - inf = nan, and softmax stays finite.
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # [B, V]
    probs = torch.softmax(scaled, dim=-1)  # [B, V]
    if top_p >= 1.0:
        return probs
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)  # [B, V] each
    # Drop a token once the more likely tokens before it already reach top_p; the most likely always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, sorted_ids, sorted_probs)  # [B, V], back in vocabulary order
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Return one token id per row [B] for logits [B, V]: argmax at temperature 0, else a seeded draw."""
    if temperature == 0:
        # Same rule as transformers' greedy search (argmax of the float32 logits), so outputs match it exactly.
        return logits.float().argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """Return a generator on `device`, seeded with `seed`, or with fresh entropy when seed is None."""
    # One generator per request: a seeded answer must not depend on which other requests shared the engine,
    # which a global RNG could not promise.
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
