#!/usr/bin/env python3
"""Verify an appliance audit export offline: python3 verify.py BUNDLE.zip --pubkey-fingerprint FP.

Needs only Python 3 and the `cryptography` package. Exit status 0: intact; 1: a problem, named
with the first affected sequence number; 2: the bundle cannot be read or the arguments are wrong.

This file is copied into every export as verify.py, so it imports nothing from the appliance and
is one file on purpose (an auditor copies it alone), which makes it longer than our other modules.
The appliance imports its Merkle and signed-note checks from here, so box and auditor share them.
"""
import argparse
import base64
import hashlib
import json
import sys
import zipfile
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

GENESIS_HASH = "0" * 64
EMPTY_ROOT = hashlib.sha256(b"").digest()
ROTATION_STATEMENT = "llm-appliance audit key rotation v1"


# ----- Merkle tree hashing and proofs (RFC 9162, section 2.1) -----

class ProofError(ValueError):
    """Raised when a Merkle proof does not verify."""


def leaf_hash(data: bytes) -> bytes:
    """Return the RFC 9162 leaf hash of data."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 9162 interior node hash of two children."""
    return hashlib.sha256(b"\x01" + left + right).digest()


class Frontier:
    """The roots of the perfect subtrees of a tree prefix, enough to extend it and get its root."""

    def __init__(self, size: int = 0, hashes: list[bytes] | None = None):
        hashes = list(hashes or [])
        # One subtree per set bit of size, largest first: anything else was not made by append().
        if size < 0 or len(hashes) != bin(size).count("1") or any(len(h) != 32 for h in hashes):
            raise ProofError(f"a frontier of size {size} cannot hold {len(hashes)} hashes")
        self.size, self.hashes = size, hashes

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash, merging the equal-sized subtrees it completes."""
        h, n = leaf, self.size
        while n & 1:
            h = node_hash(self.hashes.pop(), h)
            n >>= 1
        self.hashes.append(h)
        self.size += 1

    def root(self) -> bytes:
        """Return the root hash of the tree of the leaves appended so far."""
        if not self.hashes:
            return EMPTY_ROOT
        r = self.hashes[-1]
        for h in reversed(self.hashes[:-1]):
            r = node_hash(h, r)
        return r


def _check_hashes(*hashes: bytes) -> None:
    """Raise ProofError unless every hash is 32 bytes long."""
    if any(len(h) != 32 for h in hashes):
        raise ProofError("a hash is not 32 bytes long")


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: list[bytes]) -> bytes:
    """Return the root that an inclusion proof of leaf at index in a tree of size leads to."""
    if index >= size or index < 0:
        raise ProofError(f"index {index} is beyond tree size {size}")
    _check_hashes(leaf, *proof)
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: list[bytes], root: bytes) -> None:
    """Raise ProofError unless proof shows leaf at index in the tree of size with root."""
    if root_from_inclusion(index, size, leaf, proof) != root:
        raise ProofError("inclusion proof leads to a different root")


def verify_consistency(size1: int, size2: int, proof: list[bytes], root1: bytes, root2: bytes) -> None:
    """Raise ProofError unless proof shows the tree of size1 is a prefix of the tree of size2."""
    if size2 < size1:
        raise ProofError(f"tree shrank from {size1} to {size2}")
    if size1 == size2:
        if proof or root1 != root2:
            raise ProofError(f"two trees of size {size1} differ")
        return
    if size1 == 0:
        if proof:
            raise ProofError("consistency proof from an empty tree must be empty")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    _check_hashes(*proof)
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # a power of two: the old root is itself a node of the new tree
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or fr != root1 or sr != root2:
        raise ProofError(f"consistency proof from {size1} to {size2} does not verify")


# ----- C2SP signed notes and tlog checkpoints -----

class NoteError(ValueError):
    """Raised when a signed note is malformed or carries no valid signature."""


def canonical(obj) -> bytes:
    """Return the canonical JSON bytes the appliance hashes and signs; raise ValueError on what they cannot hold.

    The rules of the appliance's audit/canonical.py, restated because this file must run alone: integers,
    strings without NUL, booleans, null, lists and objects with string keys; no floats (they have no single
    textual form). The appliance's tests check that the two give the same bytes and refuse the same values.
    """
    pending = [obj]
    while pending:  # a loop, not recursion: a bundle's nesting is the attacker's choice
        value = pending.pop()
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    raise ValueError(f"key {key!r} is not a string")
            pending.extend(value)
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        elif isinstance(value, str):
            if "\x00" in value:
                raise ValueError("NUL characters are not allowed in audit data")
        elif not (value is None or isinstance(value, (bool, int))):
            raise ValueError(f"{type(value).__name__} is not allowed in audit data")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def fingerprint(public_key: bytes) -> str:
    """Return the hex SHA-256 of a raw Ed25519 public key: the key's fingerprint."""
    return hashlib.sha256(public_key).hexdigest()


def normalise_fingerprint(text: str) -> str:
    """Return text as bare lowercase hex, accepting a sha256: prefix, colons and spaces."""
    text = text.strip().lower().removeprefix("sha256:")
    return "".join(c for c in text if c not in ": ")


def key_id(name: str, public_key: bytes) -> bytes:
    """Return the signed-note key ID: 4 bytes of SHA-256(name, newline, 0x01, key)."""
    return hashlib.sha256(name.encode() + b"\n\x01" + public_key).digest()[:4]


def ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Return whether signature is a valid Ed25519 signature of message."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class Key:
    """A public key the verifier trusts."""

    name: str
    public_key: bytes

    @property
    def fingerprint(self) -> str:
        """Return the key's fingerprint."""
        return fingerprint(self.public_key)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint whose signature has been checked."""

    origin: str
    size: int
    root: bytes
    time: int  # Unix seconds, from the "time" extension line
    note: str
    signer: str  # fingerprint of the key that signed it


def format_checkpoint_body(origin: str, size: int, root: bytes, time: int) -> str:
    """Return the text of a tlog checkpoint, with the timestamp as an extension line."""
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\ntime {time}\n"


def open_checkpoint(note: str, keys: list[Key]) -> Checkpoint:
    """Return the checkpoint in note, checking that one of keys signed it."""
    text, sep, signatures = note.partition("\n\n")
    if not sep or not signatures.strip():
        raise NoteError("checkpoint carries no signature")
    text += "\n"
    lines = text.split("\n")[:-1]
    if len(lines) < 4 or not lines[3].startswith("time "):
        raise NoteError("checkpoint text is malformed")
    try:
        origin, size, root, time = lines[0], int(lines[1]), base64.b64decode(lines[2], validate=True), int(lines[3][5:])
    except ValueError as exc:
        raise NoteError(f"checkpoint text is malformed ({exc})") from None
    if size < 0 or len(root) != 32:
        raise NoteError("checkpoint size or root is malformed")
    for line in signatures.rstrip("\n").split("\n"):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != "\u2014":
            raise NoteError("checkpoint signature line is malformed")
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except ValueError:
            raise NoteError("checkpoint signature is not base64") from None
        for key in keys:
            if key.name == parts[1] and blob[:4] == key_id(key.name, key.public_key):
                if ed25519_verify(key.public_key, blob[4:], text.encode("utf-8")):
                    return Checkpoint(origin, size, root, time, note, key.fingerprint)
    raise NoteError("checkpoint signature is invalid or made by an unknown key")


def trusted_keys(keys_doc: dict, expected_fp: str) -> list[Key]:
    """Return the bundle's keys that the expected fingerprint vouches for, through rotations."""
    keys = {fingerprint(k): Key(d["name"], k) for d in keys_doc.get("keys", [])
            for k in [base64.b64decode(d["public_key"])]}
    expected_fp = normalise_fingerprint(expected_fp)
    if expected_fp not in keys:
        found = ", ".join(sorted(keys)) or "none"
        raise Problem(f"public key swapped: the bundle's keys ({found}) do not include "
                      f"the expected fingerprint {expected_fp}", None)
    trusted = {expected_fp}
    rotations = keys_doc.get("rotations", [])
    # Rotations link keys both ways: the old key signs the new one; the new key's checkpoints
    # cover the ledger event recording the rotation, so trusting it vouches for its predecessor.
    for _ in rotations:
        for r in rotations:
            old, new = r["old_fingerprint"], r["new_fingerprint"]
            if (old in trusted) == (new in trusted) or old not in keys or new not in keys:
                continue
            statement = canonical({k: v for k, v in r.items() if k != "signature"})
            if r.get("statement") == ROTATION_STATEMENT and keys[new].public_key == base64.b64decode(
                    r["new_public_key"]) and ed25519_verify(
                    keys[old].public_key, base64.b64decode(r["signature"]), statement):
                trusted |= {old, new}
    return [keys[fp] for fp in sorted(trusted)]


# ----- the bundle -----

class Problem(Exception):
    """A finding that makes the bundle (or the live ledger) fail verification."""

    def __init__(self, message: str, seq: int | None):
        super().__init__(message)
        self.message, self.seq = message, seq

    def __str__(self) -> str:
        where = f" (first affected sequence number: {self.seq})" if self.seq is not None else ""
        return f"{self.message}{where}"


def check_checkpoint_series(checkpoints: list[Checkpoint], origin: str, max_gap: int, end_time: int) -> None:
    """Raise Problem at the first replayed, forked or missing checkpoint in time order."""
    roots: dict[int, bytes] = {}
    prev = None
    for cp in checkpoints:
        if cp.origin != origin:
            raise Problem(f"checkpoint of size {cp.size} names origin {cp.origin!r}, not {origin!r}", cp.size)
        if cp.size in roots and roots[cp.size] != cp.root:
            raise Problem(f"fork: two checkpoints of size {cp.size} with different roots", cp.size)
        roots[cp.size] = cp.root
        if prev is not None:
            if cp.time < prev.time or cp.size < prev.size or cp.note == prev.note:
                raise Problem(f"replayed older checkpoint: size {cp.size} at time {cp.time} follows "
                              f"size {prev.size} at time {prev.time}", min(cp.size, prev.size) + 1)
            if cp.time - prev.time > max_gap:
                raise Problem(f"heartbeat missing: no checkpoint for {cp.time - prev.time} s between "
                              f"time {prev.time} and {cp.time} (at most {max_gap} s allowed)", prev.size + 1)
        prev = cp
    if prev is None:
        raise Problem("no checkpoint covers the ledger", 1)
    if end_time - prev.time > max_gap:
        raise Problem(f"truncated tail: the last checkpoint (size {prev.size}) is {end_time - prev.time} s "
                      f"older than the end of the period (at most {max_gap} s allowed)", prev.size + 1)


def is_canonical(line: bytes) -> bool:
    """Return whether line is an event in canonical form."""
    try:
        return canonical(json.loads(line)) == line
    except ValueError:
        return False


def _seq_of(line: bytes):
    """Return the seq of an event line, or None when it is not a JSON event."""
    try:
        value = json.loads(line)
        return value.get("seq") if isinstance(value, dict) else None
    except ValueError:
        return None


def diagnose(lines: list[bytes], i: int, expected: int) -> Problem:
    """Return the problem that makes line i break the sequence or the hash chain."""
    seqs = [_seq_of(line) for line in lines]
    seq = seqs[i]
    if not isinstance(seq, int) or isinstance(seq, bool):
        if not is_canonical(lines[i]):
            return Problem(f"event {expected}: re-encoded or corrupt bytes", expected)
        return Problem(f"event {expected}: line {i + 1} carries no sequence number", expected)
    if seq == expected:
        if not is_canonical(lines[i]):
            return Problem(f"event {seq}: bytes are re-encoded (not the canonical form that was hashed)", seq)
        if i > 0 and not is_canonical(lines[i - 1]):
            return Problem(f"event {seq - 1}: bytes are re-encoded (not the canonical form that was hashed)", seq - 1)
        if i == 0:
            return Problem(f"event {seq} does not link to the event before the exported period", seq)
        return Problem(f"event {seq - 1} was edited: its hash differs from the prev_hash of event {seq}", seq - 1)
    if seq < expected:
        earlier = [j for j in range(i) if seqs[j] == seq]
        if any(lines[j] == lines[i] for j in earlier):
            return Problem(f"duplicated event: event {seq} appears twice", seq)
        if earlier:
            return Problem(f"inserted event: two different events claim sequence number {seq}", seq)
        return Problem(f"events reordered: event {seq} comes after event {expected - 1}", seq)
    if expected in seqs[i + 1:]:
        return Problem(f"events reordered: event {seq} comes before event {expected}", expected)
    return Problem(f"deleted event: event {expected} is missing (event {seq} follows {expected - 1})", expected)


def _first_bad_in(lines: list[bytes], first_seq: int, start: int, end: int) -> Problem:
    """Return the problem for events start+1..end that do not match a signed root."""
    for seq in range(max(start + 1, first_seq), end + 1):
        if not is_canonical(lines[seq - first_seq]):
            return Problem(f"event {seq}: bytes are re-encoded (not the canonical form that was hashed)", seq)
    return Problem(f"events {start + 1}..{end} do not match the signed checkpoint of size {end}", start + 1)


def verify_bundle(path: str, expected_fp: str, since_checkpoint: str | None = None) -> str:
    """Return a summary of an intact bundle; raise Problem naming the first thing wrong."""
    with zipfile.ZipFile(path) as bundle:
        names = set(bundle.namelist())
        missing = {"manifest.json", "manifest.sig", "keys.json", "checkpoints.json", "proofs.json",
                   "frontier.json", "events.jsonl"} - names
        if missing:
            raise Problem(f"bundle lacks {', '.join(sorted(missing))}", None)
        manifest_bytes = bundle.read("manifest.json")
        keys = trusted_keys(json.loads(bundle.read("keys.json")), expected_fp)
        signature = json.loads(bundle.read("manifest.sig"))
        if not any(ed25519_verify(k.public_key, base64.b64decode(signature["signature"]), manifest_bytes)
                   for k in keys if k.fingerprint == signature.get("fingerprint")):
            raise Problem("manifest signature is invalid or made by an untrusted key", None)
        manifest = json.loads(manifest_bytes)
        notes = json.loads(bundle.read("checkpoints.json"))
        proofs = {(p["from"], p["to"]): [bytes.fromhex(h) for h in p["hashes"]]
                  for p in json.loads(bundle.read("proofs.json"))}
        frontier_doc = json.loads(bundle.read("frontier.json"))
        data = bundle.read("events.jsonl")
    first_seq, last_seq = manifest["first_seq"], manifest["last_seq"]

    checkpoints = []
    covered = first_seq - 1
    for note in notes:
        try:
            cp = open_checkpoint(note, keys)
        except NoteError as exc:
            raise Problem(f"checkpoint after size {covered}: {exc} (forged or missing signature)", covered + 1)
        checkpoints.append(cp)
        covered = max(covered, cp.size)
    check_checkpoint_series(checkpoints, manifest["origin"], manifest["max_gap_s"],
                            min(manifest["until"], manifest["export_time"]))
    if checkpoints[-1].size < last_seq:
        raise Problem(f"the last checkpoint (size {checkpoints[-1].size}) does not cover the "
                      f"exported events up to {last_seq}", checkpoints[-1].size + 1)

    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    frontier = Frontier(frontier_doc["size"], [bytes.fromhex(h) for h in frontier_doc["hashes"]])
    if frontier.size != first_seq - 1:
        raise Problem("the frontier does not end just before the first exported event", first_seq)
    prior = None
    if since_checkpoint is not None:
        try:
            prior = open_checkpoint(since_checkpoint, keys)
        except NoteError as exc:
            raise Problem(f"the previous export's checkpoint: {exc}", None) from None
    needed = {cp.size for cp in checkpoints} | {last_seq} | ({prior.size} if prior else set())
    roots = {frontier.size: frontier.root()}
    expected, prev_hash = first_seq, manifest["prev_hash"]
    sha256 = hashlib.sha256
    for i, line in enumerate(lines):
        # Read seq and prev_hash without parsing the whole line: in canonical JSON a quote is never
        # raw inside a string, so the last ',"prev_hash":"' and ',"seq":' are the top-level keys
        # (details, which may nest such keys, sorts before them). Any other reading of a line the
        # box did not write breaks the hash chain or the signed root below, so speed costs nothing.
        at = line.rfind(b',"prev_hash":"')
        link = line[at + 14:at + 78].decode("ascii", "replace") if at > 0 else None
        at = line.rfind(b',"seq":')
        end = line.find(b",", at + 7)
        number = line[at + 7:end]
        if at < 0 or end < 0 or not number.isdigit() or int(number) != expected or link != prev_hash:
            raise diagnose(lines, i, expected)
        prev_hash = sha256(line).hexdigest()
        frontier.append(sha256(b"\x00" + line).digest())
        if expected in needed:
            roots[expected] = frontier.root()
        expected += 1
    if expected - 1 != last_seq:
        raise Problem(f"truncated tail: events end at {expected - 1}, the export covers up to {last_seq}",
                      expected)

    known = dict(roots)
    for cp in checkpoints:
        if cp.size in roots and roots[cp.size] != cp.root:
            matched = max((s for s in roots if s < cp.size and s in {c.size for c in checkpoints}),
                          default=frontier_doc["size"])
            raise _first_bad_in(lines, first_seq, matched, cp.size)
        known[cp.size] = cp.root
    if prior is not None:
        if prior.size in known and known[prior.size] != prior.root:
            raise Problem(f"rolled back: the ledger at size {prior.size} differs from the previous export's "
                          f"checkpoint", min(prior.size, max(first_seq, 1)))
        if prior.size > max(known):
            raise Problem(f"rolled back: the previous export's checkpoint has size {prior.size}, "
                          f"beyond every checkpoint here", max(known) + 1)
        known.setdefault(prior.size, prior.root)
    sizes = sorted(known)
    for a, b in zip(sizes, sizes[1:]):
        if (a, b) not in proofs:
            hint = ("; export again with --since-checkpoint so the bundle carries it"
                    if prior is not None and a == prior.size else "")
            raise Problem(f"consistency proof from size {a} to {b} is missing{hint}", a + 1)
        try:
            verify_consistency(a, b, proofs[(a, b)], known[a], known[b])
        except ProofError as exc:
            who = "rolled back or forked" if since_checkpoint else "inconsistent"
            raise Problem(f"{who}: {exc}", a + 1) from None
    manifests = check_variant_manifests(lines, first_seq, keys)
    return (f"OK: events {first_seq}..{last_seq} ({len(lines)} events) intact; {len(checkpoints)} signed "
            f"checkpoints consistent up to size {checkpoints[-1].size}; signed by {checkpoints[-1].signer}"
            + (f"; {manifests} signed variant manifests verified" if manifests else ""))


VARIANT_MANIFEST = b'"action":"variant.manifest"'


def check_variant_manifests(lines: list[bytes], first_seq: int, keys: list[Key]) -> int:
    """Check each variant.manifest event: its document hashes to the digest it states and the box's key signed it.

    The box signs, at import, a manifest of a variant's files (SHA-256 each), provenance and parents; the
    event carries the document, its digest, the signature and the key's fingerprint. Returns how many.
    """
    checked = 0
    by_fingerprint = {k.fingerprint: k for k in keys}
    for i, line in enumerate(lines):
        if VARIANT_MANIFEST not in line:
            continue
        event = json.loads(line)
        if event.get("action") != "variant.manifest":
            continue
        details, seq = event.get("details") or {}, first_seq + i
        document = details.get("document")
        if not isinstance(document, dict):
            raise Problem(f"variant manifest of {event.get('target')} carries no document", seq)
        body = canonical(document)
        if hashlib.sha256(body).hexdigest() != details.get("manifest_sha256"):
            raise Problem(f"variant manifest of {event.get('target')}: the document does not hash to its "
                          "stated manifest_sha256", seq)
        key = by_fingerprint.get(details.get("key"))
        try:
            signature = base64.b64decode(details.get("signature", ""), validate=True)
        except ValueError:
            signature = b""
        if key is None or not ed25519_verify(key.public_key, signature, body):
            raise Problem(f"variant manifest of {event.get('target')}: the signature is invalid or made by an "
                          "untrusted key", seq)
        checked += 1
    return checked


def main(argv: list[str] | None = None) -> int:
    """Verify the bundle named on the command line and print the outcome."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--pubkey-fingerprint", required=True,
                        help="the fingerprint of the box's signing key, obtained outside this bundle")
    parser.add_argument("--since-checkpoint", metavar="FILE",
                        help="the last checkpoint of the previous export (checkpoint.txt in that bundle)")
    args = parser.parse_args(argv)
    try:
        since = open(args.since_checkpoint, encoding="utf-8").read() if args.since_checkpoint else None
        print(verify_bundle(args.bundle, args.pubkey_fingerprint, since))
        return 0
    except Problem as problem:
        print(f"FAILED: {problem}")
        return 1
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        print(f"ERROR: cannot read the bundle: {exc!r}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
