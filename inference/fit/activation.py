"""Measure the activation memory of a forward pass, on real tensors or on the meta device.

The same tracker serves both: it records every tensor storage an op returns while the forward runs and
keeps the peak of the bytes still alive. On a loaded model (CPU here) that is a measurement; on a
meta-built model it is the same bookkeeping at the real model's shapes, with no memory used, which is how
the figures for a 671B model are obtained on a box that could never hold it. The tests check that both
paths agree on the demo models.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AttentionInterface, DynamicCache, PreTrainedModel

FUSED_ATTENTION = "fit_fused_meta"


class LiveBytes(TorchDispatchMode):
    """Track the peak bytes of tensor storages created inside the mode and still referenced."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude  # storages that existed before (weights, inputs): not activations
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                ref = StorageWeakRef(tensor.untyped_storage())
                if ref.cdata not in self.exclude and ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, tensor.untyped_storage().nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, self.current)
        return out

    @property
    def current(self) -> int:
        """Return the bytes of tracked storages alive now."""
        return sum(size for _, size in self.live.values())


def _fused_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Return an attention output of the right shape without materialising scores, as a fused kernel does."""
    # Flash and memory-efficient kernels on GPUs (and PyTorch's CPU flash kernel) never hold the
    # [B, H, S, S] score matrix; the meta device would run sdpa's decomposition and count it.
    batch, heads, seq, _ = query.shape
    out = query.new_empty(batch, seq, heads, value.shape[-1])  # [B, S, H, Dv], as attention functions return
    return out, None


AttentionInterface.register(FUSED_ATTENTION, _fused_attention)


@dataclass(frozen=True)
class ForwardPeak:
    """Peak activation bytes of one forward pass, with the KV cache it leaves behind."""

    batch: int
    tokens: int
    cached_tokens: int
    peak_bytes: int  # everything the forward created, cache writes included
    cache_bytes: int  # the part of the peak that survives as KV cache

    @property
    def transient_bytes(self) -> int:
        """Return the peak minus the cache: what the runtime must keep free beyond KV."""
        return max(0, self.peak_bytes - self.cache_bytes)


def _storages(tensors) -> set[int]:
    """Return the storage ids of `tensors`."""
    return {StorageWeakRef(t.untyped_storage()).cdata for t in tensors}


def forward_peak(model: PreTrainedModel, batch: int, tokens: int, cached_tokens: int = 0) -> ForwardPeak:
    """Run one forward of `tokens` new tokens per sequence (after `cached_tokens`) and return its peak."""
    device = model.device
    cache = None
    if cached_tokens:
        # A decode step reads a cache that already holds the context; fill it first, outside the tracker.
        cache = DynamicCache(config=model.config)
        warm = torch.zeros(batch, cached_tokens, dtype=torch.long, device=device)
        with torch.no_grad():
            model(input_ids=warm, cache=cache, use_cache=True, logits_to_keep=1)
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    exclude = _storages(list(model.parameters()) + list(model.buffers()) + [ids])
    if cache is not None:
        exclude |= _storages(_cache_tensors(cache))
    before = _cache_bytes(cache)
    # logits_to_keep=1: serving engines compute logits for the last position only, not [B, S, vocab].
    # The cycle collector is paused so that when garbage dies depends on reference counts alone: the
    # peak is then the same on every run (and errs high, if anything, never low).
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad(), LiveBytes(exclude) as tracker:
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    finally:
        gc.enable()
    cache_after = _cache_bytes(out.cache if hasattr(out, "cache") else out.past_key_values)
    return ForwardPeak(batch, tokens, cached_tokens, tracker.peak, cache_after - before)


def meta_forward_peak(model: PreTrainedModel, batch: int, tokens: int, cached_tokens: int = 0) -> ForwardPeak:
    """Return the forward peak of a meta-built model, with attention modelled as a fused kernel."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(FUSED_ATTENTION)
    try:
        return forward_peak(model, batch, tokens, cached_tokens)
    finally:
        model.set_attn_implementation(previous)


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Return the key and value tensors a transformers cache holds."""
    if cache is None:
        return []
    found = []
    for entry in cache.layers:
        found += [t for t in (getattr(entry, "keys", None), getattr(entry, "values", None)) if t is not None]
    return found


def _cache_bytes(cache) -> int:
    """Return the bytes held by a transformers cache."""
    return sum(t.numel() * t.element_size() for t in _cache_tensors(cache))
