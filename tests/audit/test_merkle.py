"""The Merkle tree against transparency-dev/merkle's vectors and a naive RFC 9162 reference."""
import hashlib

import pytest

from audit.merkle import EMPTY_ROOT, Frontier, MerkleTree, leaf_hash, node_hash
from audit.verifier import ProofError, root_from_inclusion, verify_consistency, verify_inclusion
from tests.audit import merkle_vectors as kat


def naive_root(leaves: list[bytes]) -> bytes:
    """Return MTH(D[n]) by the definition in RFC 9162 2.1.1."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(naive_root(leaves[:k]), naive_root(leaves[k:]))


def naive_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """Return PATH(m, D[n]) by the definition in RFC 9162 2.1.3.1."""
    n = len(leaves)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return naive_path(m, leaves[:k]) + [naive_root(leaves[k:])]
    return naive_path(m - k, leaves[k:]) + [naive_root(leaves[:k])]


def naive_subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    """Return SUBPROOF(m, D[n], b) by the definition in RFC 9162 2.1.4.1."""
    n = len(leaves)
    if m == n:
        return [] if complete else [naive_root(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return naive_subproof(m, leaves[:k], complete) + [naive_root(leaves[k:])]
    return naive_subproof(m - k, leaves[k:], False) + [naive_root(leaves[:k])]


def rejects_inclusion(index, size, root, leaf, proof) -> bool:
    try:
        verify_inclusion(index, size, leaf, proof, root)
    except ProofError:
        return True
    return False


def rejects_consistency(size1, size2, root1, root2, proof) -> bool:
    try:
        verify_consistency(size1, size2, proof, root1, root2)
    except ProofError:
        return True
    return False


KAT_LEAF_HASHES = [leaf_hash(data) for data in kat.LEAVES]
NAIVE_LEAVES = [leaf_hash(f"event {i}".encode()) for i in range(70)]


def test_leaf_and_node_hashes_use_the_rfc_9162_prefixes():
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    assert EMPTY_ROOT == kat.EMPTY_TREE_HASH


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_match_the_known_answers(size):
    tree = MerkleTree(KAT_LEAF_HASHES)
    assert tree.root(size) == kat.ROOTS[size - 1]
    frontier = Frontier()
    for leaf in KAT_LEAF_HASHES[:size]:
        frontier.append(leaf)
    assert frontier.root() == kat.ROOTS[size - 1]


@pytest.mark.parametrize("number,size,proof", kat.INCLUSION_PROOFS)
def test_inclusion_proofs_match_the_known_answers_and_survive_every_corruption_probe(number, size, proof):
    tree = MerkleTree(KAT_LEAF_HASHES)
    leaf, root = KAT_LEAF_HASHES[number - 1], kat.ROOTS[size - 1]
    assert tree.inclusion_proof(number - 1, size) == proof
    assert root_from_inclusion(number - 1, size, leaf, proof) == root
    verify_inclusion(number - 1, size, leaf, proof, root)
    accepted = [p[0] for p in kat.corrupt_inclusion(number - 1, size, proof, root, leaf) if not rejects_inclusion(*p[1:])]
    assert accepted == []


@pytest.mark.parametrize("size1,size2,proof", kat.CONSISTENCY_PROOFS)
def test_consistency_proofs_match_the_known_answers_and_survive_every_corruption_probe(size1, size2, proof):
    tree = MerkleTree(KAT_LEAF_HASHES)
    root1, root2 = kat.ROOTS[size1 - 1], kat.ROOTS[size2 - 1]
    assert tree.consistency_proof(size1, size2) == proof
    verify_consistency(size1, size2, proof, root1, root2)
    if proof:  # as in the Go test, only non-trivial proofs are probed
        probes = kat.corrupt_consistency(size1, size2, root1, root2, proof)
        assert [p[0] for p in probes if not rejects_consistency(*p[1:])] == []


def test_single_entry_inclusion_accepts_only_the_leaf_itself():
    h = leaf_hash(b"data")
    verify_inclusion(0, 1, h, [], h)
    assert rejects_inclusion(0, 1, h, b"", [])
    assert rejects_inclusion(0, 1, b"", h, [])
    assert rejects_inclusion(0, 1, b"", b"", [])


@pytest.mark.parametrize("index,size", [(0, 0), (0, 1), (1, 0), (2, 1)])
def test_inclusion_rejects_empty_and_mismatched_roots_and_leaves(index, size):
    assert rejects_inclusion(index, size, b"", kat.SOME_HASH, [])
    assert rejects_inclusion(index, size, kat.EMPTY_TREE_HASH, b"", [])
    assert rejects_inclusion(index, size, kat.EMPTY_TREE_HASH, kat.SOME_HASH, [])


R1, R2 = b"don't care 1", b"don't care 2"


@pytest.mark.parametrize("size1,size2,root1,root2,proof,ok", [
    (0, 0, R1, R2, [], False),
    (1, 1, R1, R2, [], False),
    (0, 0, R1, R1, [], True),
    (0, 1, R1, R2, [], True),
    (1, 1, R2, R2, [], True),
    (1, 0, R1, R2, [], False),
    (2, 1, R1, R2, [], False),
    (1, 2, R1, R2, [], False),
    (0, 0, kat.EMPTY_TREE_HASH, R2, [], False),
    (1, 1, kat.EMPTY_TREE_HASH, R2, [], False),
    (0, 0, kat.EMPTY_TREE_HASH, kat.EMPTY_TREE_HASH, [kat.EMPTY_TREE_HASH], False),
    (0, 1, kat.EMPTY_TREE_HASH, kat.EMPTY_TREE_HASH, [kat.EMPTY_TREE_HASH], False),
    (1, 1, kat.EMPTY_TREE_HASH, kat.EMPTY_TREE_HASH, [kat.EMPTY_TREE_HASH], False),
])
def test_consistency_edge_cases_match_the_go_table(size1, size2, root1, root2, proof, ok):
    assert rejects_consistency(size1, size2, root1, root2, proof) is not ok


def test_roots_and_frontiers_match_the_naive_reference_at_sizes_0_to_70():
    tree = MerkleTree(NAIVE_LEAVES)
    frontier = Frontier()
    for size in range(71):
        assert tree.root(size) == naive_root(NAIVE_LEAVES[:size]) == frontier.root()
        assert Frontier(frontier.size, frontier.hashes).root() == frontier.root()
        if size < 70:
            frontier.append(NAIVE_LEAVES[size])


def test_inclusion_proofs_match_the_naive_reference_at_sizes_1_to_70():
    tree = MerkleTree(NAIVE_LEAVES)
    for size in range(1, 71):
        root = naive_root(NAIVE_LEAVES[:size])
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            assert proof == naive_path(index, NAIVE_LEAVES[:size])
            verify_inclusion(index, size, NAIVE_LEAVES[index], proof, root)


def test_consistency_proofs_match_the_naive_reference_at_sizes_0_to_70():
    tree = MerkleTree(NAIVE_LEAVES)
    roots = [naive_root(NAIVE_LEAVES[:n]) for n in range(71)]
    for size2 in range(71):
        for size1 in range(size2 + 1):
            proof = tree.consistency_proof(size1, size2)
            expected = [] if size1 in (0, size2) else naive_subproof(size1, NAIVE_LEAVES[:size2], True)
            assert proof == expected
            verify_consistency(size1, size2, proof, roots[size1], roots[size2])
            if 0 < size1 < size2:
                assert rejects_consistency(size1, size2, roots[size1 - 1], roots[size2], proof)


def test_a_frontier_with_the_wrong_number_of_hashes_is_refused():
    with pytest.raises(ProofError):
        Frontier(3, [kat.SOME_HASH])


def test_a_frontier_taken_from_the_tree_resumes_to_the_same_roots():
    tree = MerkleTree(NAIVE_LEAVES)
    for size in range(71):
        frontier = tree.frontier(size)
        for leaf in NAIVE_LEAVES[size:]:
            frontier.append(leaf)
        assert frontier.root() == tree.root()
