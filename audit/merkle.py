"""The box's side of the RFC 9162 Merkle tree: build it over leaf hashes and produce proofs.

Hashing and proof verification live in audit.verifier, the standalone file that exports
carry, so the box and the auditor check proofs with the same code.
"""
from audit.verifier import EMPTY_ROOT, Frontier, leaf_hash, node_hash

__all__ = ["EMPTY_ROOT", "Frontier", "MerkleTree", "leaf_hash", "node_hash"]


def _split(n: int) -> int:
    """Return the largest power of two smaller than n (n >= 2)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


class MerkleTree:
    """A tree over a list of leaf hashes, keeping every level so proofs cost O(log² n)."""

    def __init__(self, leaves: list[bytes]):
        # levels[h][i] is the root of the perfect subtree over leaves i*2^h .. (i+1)*2^h - 1;
        # an odd last node is not promoted into the next level: _hash() handles ragged edges.
        self.levels = [list(leaves)]
        while len(self.levels[-1]) > 1:
            below = self.levels[-1]
            self.levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])

    @property
    def size(self) -> int:
        """Return the number of leaves."""
        return len(self.levels[0])

    def _hash(self, start: int, end: int) -> bytes:
        """Return MTH(D[start:end]) for a range that RFC 9162's recursion produces."""
        n = end - start
        if n == 0:
            return EMPTY_ROOT
        height = n.bit_length() - 1
        if n == 1 << height and start % n == 0:
            return self.levels[height][start >> height]
        k = _split(n)
        return node_hash(self._hash(start, start + k), self._hash(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        """Return the root of the first size leaves (all of them by default)."""
        size = self.size if size is None else size
        self._check_size(size)
        return self._hash(0, size)

    def frontier(self, size: int) -> Frontier:
        """Return the frontier (perfect subtree roots, largest first) of the first size leaves."""
        self._check_size(size)
        hashes, start = [], 0
        for height in range(size.bit_length() - 1, -1, -1):
            if size >> height & 1:
                hashes.append(self.levels[height][start >> height])
                start += 1 << height
        return Frontier(size, hashes)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Return the RFC 9162 inclusion proof of leaf index in the tree of the first size leaves."""
        size = self.size if size is None else size
        self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"index {index} is outside a tree of size {size}")
        proof, start, end = [], 0, size
        while end - start > 1:  # PATH(m, D[n]) from the top down; reversed at the end
            k = _split(end - start)
            if index < start + k:
                proof.append(self._hash(start + k, end))
                end = start + k
            else:
                proof.append(self._hash(start, start + k))
                start += k
        return proof[::-1]

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """Return the RFC 9162 consistency proof between trees of size1 and size2 leaves."""
        size2 = self.size if size2 is None else size2
        self._check_size(size2)
        if not 0 <= size1 <= size2:
            raise ValueError(f"no consistency proof from {size1} to {size2}")
        if size1 in (0, size2):
            return []
        proof, start, end, complete = [], 0, size2, True
        # SUBPROOF(m, D[start:end], b) of RFC 9162 2.1.4.1, unrolled into a loop.
        m = size1
        while True:
            n = end - start
            if m == n:
                if not complete:
                    proof.append(self._hash(start, end))
                break
            k = _split(n)
            if m <= k:
                proof.append(self._hash(start + k, end))
                end = start + k
            else:
                proof.append(self._hash(start, start + k))
                start, m, complete = start + k, m - k, False
        return proof[::-1]

    def _check_size(self, size: int) -> None:
        """Raise ValueError unless the tree holds at least size leaves."""
        if not 0 <= size <= self.size:
            raise ValueError(f"the tree holds {self.size} leaves, not {size}")
