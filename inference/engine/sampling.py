"""Turn next-token logits into tokens: penalties, temperature, top-k, nucleus (top-p), seeded draws.

Pure tensor functions with no engine state, so the batching engine applies them row by row and tests
can pin them without a model. Shapes: R = rows (requests), V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, presence_penalty: float, frequency_penalty: float
) -> torch.Tensor:
    """Return logits [V] lowered for tokens already generated: once by presence, per occurrence by frequency."""
    # OpenAI's definition: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty.
    return logits - counts * frequency_penalty - (counts > 0).to(logits.dtype) * presence_penalty  # [V]


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
) -> torch.Tensor:
    """Return the sampling distribution [R, V] for logits [R, V] at `temperature` > 0 after top-k and top-p."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 to sample; use greedy decoding for 0")
    logits = logits.float()
    # Subtract the row maximum before dividing: every scaled logit is then <= 0, so a tiny temperature gives
    # -inf and 0 rather than inf - inf = nan, and softmax stays finite.
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # [R, V]
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]  # [R, 1]: the k-th largest logit of each row
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [R, V]
    if top_p >= 1.0:
        return probs
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)  # [R, V] each
    # Drop a token once the more likely tokens before it already reach top_p; the most likely always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [R, V]
    dropped = mass_before >= top_p  # [R, V]
    dropped[..., 0] = False  # even a top_p that rounds to 0 in float32 (5e-324) keeps one token
    sorted_probs = sorted_probs.masked_fill(dropped, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, sorted_ids, sorted_probs)  # [R, V], back in vocabulary order
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    top_k: int = 0,
) -> torch.Tensor:
    """Return one token id per row [R] for logits [R, V]: argmax at temperature 0, else a seeded draw."""
    if temperature == 0:
        # Same rule as transformers' greedy search (argmax of the float32 logits), so outputs match it exactly.
        return logits.float().argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_p, top_k)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def sample_rows(
    logits: torch.Tensor,
    params: Sequence,
    generators: Sequence[torch.Generator | None],
    counts: Sequence[torch.Tensor | None],
    masks: Sequence[torch.Tensor | None] | None = None,
) -> list[int]:
    """Return the next token of every request from logits [R, V], each row with its own parameters.

    `masks` holds, per row, the tokens a grammar allows next (bool [V]) or None for a free row; a masked row
    picks only among its allowed tokens, whatever its temperature.
    """
    masks = masks if masks is not None else [None] * len(params)
    tokens: list[int | None] = [None] * len(params)
    plain_greedy = [i for i, p in enumerate(params) if p.greedy and p.plain and masks[i] is None]
    if plain_greedy:
        # One argmax for all plain greedy rows: argmax reads each row alone, so batching it changes nothing.
        picked = logits[plain_greedy].argmax(dim=-1).tolist()
        for i, token in zip(plain_greedy, picked):
            tokens[i] = token
    for i, p in enumerate(params):
        if tokens[i] is not None:
            continue
        row = logits[i : i + 1]  # [1, V]
        if p.penalised and counts[i] is not None:
            row = apply_penalties(row, counts[i], p.presence_penalty, p.frequency_penalty)
        if p.logit_bias:
            row = apply_logit_bias(row, p.logit_bias)
        if masks[i] is not None:
            row = apply_mask(row, masks[i])
        tokens[i] = int(sample(row, p.temperature, p.top_p, generators[i], p.top_k)[0])
    return tokens  # type: ignore[return-value]


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """Return logits [.., V] with each biased token's logit raised or lowered by its bias."""
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, values.expand(*logits.shape[:-1], -1))


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Return logits [.., V] with every token outside `allowed` (bool [V]) at -inf."""
    if not bool(allowed.any()):
        raise ValueError("the grammar allows no token here")
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


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
