"""KV caches for a batch whose requests come and go: one growable store per request, one view per step.

Each request owns its keys and values (per layer, in its own buffers), so it joins and leaves the running
batch without copying anyone else's cache, and its attention reads exactly the tensors `generate` would
have built for it alone. A step hands the model a `BatchCache` over the stores of the requests in it.
"""

from __future__ import annotations

import torch

# Model types whose attention passes the cache's output straight to the attention function; for those the
# cache returns only the new tokens and attention reads each request's history from its store (no copy).
# Others (MLA expands the cached latents first) get the histories concatenated, which works for any model.
DIRECT_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi3", "olmo2"}
)


class KVStore:
    """One request's cached keys and values: a pair of buffers [1, h, capacity, d] per layer.

    `max_capacity` is the request's KV reservation; the scheduler raises it as the request grows, and the
    buffers double up to it, never past it, so what the stores hold stays within the budget.
    """

    def __init__(self, initial_capacity: int, max_capacity: int) -> None:
        self.length = 0  # tokens committed (visible to attention) in every layer
        self.capacity = max(1, min(initial_capacity, max_capacity))
        self.max_capacity = max_capacity
        self.layers: dict[int, list[torch.Tensor]] = {}  # layer index → [keys, values]

    def buffers(self, layer: int, keys: torch.Tensor, values: torch.Tensor, end: int) -> list[torch.Tensor]:
        """Return this layer's [keys, values] buffers, allocated like `keys`/`values` or grown to `end` tokens."""
        buffers = self.layers.get(layer)
        if buffers is None:
            buffers = self.layers[layer] = [_empty_like(keys, self.capacity), _empty_like(values, self.capacity)]
        if end > buffers[0].shape[2]:
            capacity = max(end, min(2 * buffers[0].shape[2], self.max_capacity))
            buffers[:] = [_grow(buffers[0], capacity, self.length), _grow(buffers[1], capacity, self.length)]
        return buffers

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store new keys/values [1, h, n, d] after the committed tokens (committed later by `commit`)."""
        end = self.length + keys.shape[2]
        stored_keys, stored_values = self.buffers(layer, keys, values, end)
        stored_keys[:, :, self.length : end] = keys
        stored_values[:, :, self.length : end] = values

    def view(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return this layer's first `length` keys and values, [1, h, length, d] each (views, no copy)."""
        keys, values = self.layers[layer]
        return keys.narrow(2, 0, length), values.narrow(2, 0, length)  # narrow: the cheapest view to make

    def commit(self, n: int) -> None:
        """Make the last step's `n` tokens part of the history."""
        self.length += n

    def copy_out(self, start: int, end: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Return a copy of every layer's keys and values of tokens [start, end): a prefix-cache block."""
        return {layer: (keys[:, :, start:end].clone(), values[:, :, start:end].clone())
                for layer, (keys, values) in self.layers.items()}

    def load_prefix(self, blocks: list[dict[int, tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Fill an empty store with the KV of cached blocks, in order, and commit them as its history."""
        assert self.length == 0, "a prefix goes into an empty store"
        if not blocks:
            return
        for layer in blocks[0]:
            keys = torch.cat([block[layer][0] for block in blocks], dim=2)
            values = torch.cat([block[layer][1] for block in blocks], dim=2)
            self.write(layer, keys, values)
        self.commit(blocks[0][next(iter(blocks[0]))][0].shape[2] * len(blocks))

    def nbytes(self) -> int:
        """Return the bytes held by this store's buffers."""
        return sum(t.numel() * t.element_size() for pair in self.layers.values() for t in pair)


def _empty_like(states: torch.Tensor, capacity: int) -> torch.Tensor:
    return states.new_empty(states.shape[0], states.shape[1], capacity, states.shape[3])


def _grow(buffer: torch.Tensor, capacity: int, keep: int) -> torch.Tensor:
    grown = _empty_like(buffer, capacity)
    grown[:, :, :keep] = buffer[:, :, :keep]
    return grown


class BatchCache:
    """The cache a model sees for one step: it files each request's new tokens into that request's store."""

    is_compileable = False

    def __init__(self, stores: list[KVStore], token_lengths: list[int], *, direct: bool) -> None:
        self.stores = stores
        self.token_lengths = token_lengths
        self.direct = direct

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store new keys/values [1, h, N, d]; return them (direct) or every request's history [1, h, ΣL, d]."""
        new_keys = key_states.split(self.token_lengths, dim=2)  # [1, h, n_i, d] views
        new_values = value_states.split(self.token_lengths, dim=2)
        key_slots, value_slots = [], []
        for store, n, keys, values in zip(self.stores, self.token_lengths, new_keys, new_values):
            stored_keys, stored_values = store.buffers(layer_idx, keys, values, store.length + n)
            key_slots.append(stored_keys.narrow(2, store.length, n))
            value_slots.append(stored_values.narrow(2, store.length, n))
        # One call per tensor kind instead of two copies per request.
        torch._foreach_copy_(key_slots, new_keys)
        torch._foreach_copy_(value_slots, new_values)
        if self.direct:
            return key_states, value_states
        views = self.history(layer_idx)
        if len(views) == 1:
            return views[0]
        return torch.cat([k for k, _ in views], dim=2), torch.cat([v for _, v in views], dim=2)

    def history(self, layer_idx: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return each request's keys and values after this step, [1, h, L_i, d] each."""
        return [store.view(layer_idx, store.length + n) for store, n in zip(self.stores, self.token_lengths)]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def commit(self) -> None:
        """Make this step's tokens part of every request's history, once the forward has succeeded."""
        for store, n in zip(self.stores, self.token_lengths):
            store.commit(n)
