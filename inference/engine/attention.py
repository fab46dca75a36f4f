"""Attention for a flat batch of requests: each request attends to its own keys only, as if alone.

Registered with transformers as the attention implementation "appliance_rows". The model hands it the
queries of every request in the step [1, h, N, d]; it runs scaled-dot-product attention once per request
with exactly the arguments `sdpa_attention_forward` would use for that request alone (no mask, causal only
for a prompt), so the result matches `generate` bit for bit and no padding is ever computed. A prompt chunk
after cached tokens (chunked prefill, a cached prefix; never in exact mode) gets the causal mask aligned to
its place in the history.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from inference.engine.exact import current_layout

ATTENTION_NAME = "appliance_rows"


def rows_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attend each request's queries to its own history; return [1, N, h, d_v] and no weights."""
    layout = current_layout()
    groups = getattr(module, "num_key_value_groups", 1)
    if layout is None or (groups > 1 and not key.shape[-1] == value.shape[-1] <= 256):
        # Outside the engine (a test's generate), or rare head shapes that transformers handles by repeating
        # or packing heads: its own function, request by request.
        return _stock_rows(layout, module, query, key, value, attention_mask, scaling, **kwargs)
    # The call sdpa_attention_forward makes for one unpadded request: no mask, grouped heads natively,
    # causal for a prompt (more than one query).
    extra = {"enable_gqa": True} if groups > 1 else {}
    causal = getattr(module, "is_causal", True)
    outputs = []
    for q, k, v in _per_request(layout, module, query, key, value):
        mask = chunk_mask(q.shape[2], k.shape[2], q.device) if causal else None
        outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=scaling,
                                                      is_causal=causal and mask is None and q.shape[2] > 1,
                                                      **extra))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)  # [1, h, N, d_v]
    return out.transpose(1, 2).contiguous(), None  # [1, N, h, d_v]


def causal_mask(t: int, length: int, device: torch.device) -> torch.Tensor:
    """Return which of `length` keys each of the last `t` queries sees: bool [T, L], query i keys up to L - T + i.

    SDPA's `is_causal` aligns the first query with the first key; a chunk of T queries after L - T cached
    tokens needs the mask aligned at the bottom right.
    """
    keys = torch.arange(length, device=device)
    queries = torch.arange(length - t, length, device=device)
    return keys[None, :] <= queries[:, None]


def chunk_mask(t: int, length: int, device: torch.device) -> torch.Tensor | None:
    """Return SDPA's mask [1, 1, T, L] for a chunk of `t` queries over `length` keys, or None where `is_causal`
    (a whole prompt) or no mask (one query) is right."""
    if t == 1 or t == length:
        return None
    return causal_mask(t, length, device)[None, None]


def _per_request(layout, module, query, key, value):
    """Yield each request's queries [1, h, T_i, d] with its keys and values [1, h_kv, L_i, d]."""
    # A cache that returns only the new tokens keeps each history in its store; otherwise the keys passed
    # here are all histories concatenated [1, h, ΣL, d].
    queries = query.split(layout.token_lengths, dim=2)  # one call for every request's view
    if key.shape[2] != layout.n_history:
        for q, (k, v) in zip(queries, layout.cache.history(module.layer_idx)):  # views into each request's store
            yield q, k, v
    else:
        yield from zip(queries, key.split(layout.history_lengths, dim=2), value.split(layout.history_lengths, dim=2))


def _stock_rows(layout, module, query, key, value, attention_mask, scaling, **kwargs) -> tuple[torch.Tensor, None]:
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    causal = getattr(module, "is_causal", True)
    outputs = [sdpa_attention_forward(module, q, k, v, chunk_mask(q.shape[2], k.shape[2], q.device) if causal else None,
                                      dropout=0.0, scaling=scaling)[0]
               for q, k, v in _per_request(layout, module, query, key, value)]
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), None


AttentionInterface.register(ATTENTION_NAME, rows_attention)
