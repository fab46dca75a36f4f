"""The prefix cache's index: KV blocks keyed by a hash of the scope and every token before and in them.

A block holds the KV of `block_tokens` consecutive tokens. Its key chains the key of the block before it
with its own tokens, so equal keys mean an equal whole prefix, and the first block's key starts from the
scope: requests of one team find each other's blocks, a team never finds another team's (no cross-team
reuse, so no timing side channel between teams). SHA-256, because a collision would hand a request KV of
another text.

The index knows nothing of tensors: a block's payload is whatever the engine stored (its KV slices), and
`nbytes` is what it costs in the KV budget. Blocks are evicted least recently used first; a match touches
a chain deepest block first, so a chain's first blocks are the last of it to go.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)
class Block:
    """One cached block: its key, the KV the engine stored for it, and what it costs."""

    key: bytes
    payload: Any
    nbytes: int


def scope_root(scope: str) -> bytes:
    """Return the key every chain of `scope` starts from."""
    return hashlib.sha256(b"appliance-prefix-scope\0" + scope.encode("utf-8")).digest()


def extend_hashes(hashes: list[bytes], scope: str, token_ids: list[int], block_tokens: int) -> list[bytes]:
    """Append the keys of the full blocks of `token_ids` that `hashes` does not cover yet; return `hashes`."""
    parent = hashes[-1] if hashes else scope_root(scope)
    for start in range(len(hashes) * block_tokens, len(token_ids) - block_tokens + 1, block_tokens):
        tokens = array("q", token_ids[start : start + block_tokens]).tobytes()
        parent = hashlib.sha256(parent + tokens).digest()
        hashes.append(parent)
    return hashes


class PrefixCache:
    """Blocks by key, least recently used first, with the bytes they hold."""

    def __init__(self, block_tokens: int) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be at least 1, got {block_tokens}")
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.nbytes = 0
        self.hit_tokens = 0  # prompt tokens served from the cache since the engine started
        self.query_tokens = 0  # prompt tokens looked up
        self.evicted_blocks = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def match(self, hashes: list[bytes], limit_tokens: int) -> list[Block]:
        """Return the cached blocks that start the chain `hashes`, at most `limit_tokens` tokens of them."""
        found: list[Block] = []
        for key in hashes[: limit_tokens // self.block_tokens]:
            block = self._blocks.get(key)
            if block is None:
                break
            found.append(block)
        for block in reversed(found):  # deepest first, so the chain's head ends most recently used
            self._blocks.move_to_end(block.key)
        return found

    def record_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.query_tokens += prompt_tokens
        self.hit_tokens += hit_tokens

    def touch(self, key: bytes) -> None:
        self._blocks.move_to_end(key)

    def insert(self, block: Block) -> None:
        """Add a block as the most recently used (its key must be new)."""
        assert block.key not in self._blocks
        self._blocks[block.key] = block
        self.nbytes += block.nbytes

    def evict(self, nbytes: int, keep: frozenset[bytes] = frozenset()) -> int:
        """Drop least recently used blocks (except those in `keep`) until `nbytes` are freed or none is left;
        return the bytes freed."""
        victims, freed = [], 0
        for key, block in self._blocks.items():  # least recently used first
            if freed >= nbytes:
                break
            if key not in keep:
                victims.append(key)
                freed += block.nbytes
        for key in victims:
            self.nbytes -= self._blocks.pop(key).nbytes
        self.evicted_blocks += len(victims)
        return freed

    def figures(self) -> dict:
        """Return the cache's figures as plain data."""
        return {
            "prefix_cache_blocks": len(self._blocks),
            "prefix_cache_bytes": self.nbytes,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_query_tokens": self.query_tokens,
            "prefix_cache_evicted_blocks": self.evicted_blocks,
        }
