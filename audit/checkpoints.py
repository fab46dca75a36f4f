"""Sign checkpoints of the ledger, each one provably an extension of the one before."""
import hashlib
from datetime import datetime, timezone

from django.db import router, transaction

from audit import keys, ledger
from audit.merkle import Frontier, leaf_hash
from audit.models import GENESIS_HASH, AuditEvent, Checkpoint, SigningKey
from audit.verifier import Key, NoteError, ProofError, open_checkpoint


class InconsistentLedger(Exception):
    """Raised instead of signing a checkpoint that would not extend the previous one."""


def make_checkpoint(kind: str = "manual") -> Checkpoint:
    """Sign and store a checkpoint of the whole ledger as it stands; refuse if it forked or shrank."""
    if kind not in Checkpoint.KINDS:
        raise ValueError(f"kind must be one of {Checkpoint.KINDS}")
    key = keys.active_key()
    using = router.db_for_write(Checkpoint)
    try:
        # Under the ledger lock: no event can slip in between the tree we hash and the size we sign.
        with transaction.atomic(using=using):
            ledger.lock(using)
            return _extend(kind, key, using)
    except InconsistentLedger as exc:
        # Outside the rolled-back transaction, so the refusal itself stays on record.
        ledger.append("audit.checkpoint_refused", actor="system:audit", outcome="refused",
                      details={"kind": kind, "reason": str(exc)})
        raise


def _extend(kind: str, key: SigningKey, using: str) -> Checkpoint:
    """Build on the latest checkpoint with the events after it, then sign and store the result."""
    prev = Checkpoint.objects.using(using).order_by("-id").first()
    frontier, head_hash = _resume(prev, using)
    size = frontier.size
    rows = (AuditEvent.objects.using(using).filter(seq__gt=size).order_by("seq")
            .values_list("seq", "body", "hash", "prev_hash").iterator(chunk_size=2000))
    for seq, body, event_hash, prev_hash in rows:
        body = bytes(body)
        if seq != size + 1:
            raise InconsistentLedger(f"event {size + 1} is missing")
        if prev_hash != head_hash or hashlib.sha256(body).hexdigest() != event_hash:
            raise InconsistentLedger(f"event {seq} does not extend the hash chain")
        frontier.append(leaf_hash(body))
        size, head_hash = seq, event_hash
    now = datetime.now(timezone.utc)
    seconds = int(now.timestamp())
    if prev is not None:
        prev_seconds = int(prev.created_at.timestamp())
        if seconds < prev_seconds:
            raise InconsistentLedger("the clock is behind the previous checkpoint; not signing out of order")
        # Ed25519 is deterministic, so the same tree in the same second would repeat the previous
        # note byte for byte, which verifiers rightly treat as a replay: that one already says it.
        if seconds == prev_seconds and prev.tree_size == size and prev.key_fingerprint == key.fingerprint:
            return prev
    checkpoint = Checkpoint(
        created_at=now, kind=kind, tree_size=size, root_hash=frontier.root().hex(), head_hash=head_hash,
        frontier=[h.hex() for h in frontier.hashes], key_fingerprint=key.fingerprint,
        note=keys.checkpoint_note(size, frontier.root(), seconds, key),
    )
    checkpoint.save(using=using)
    return checkpoint


def _resume(prev: Checkpoint | None, using: str) -> tuple[Frontier, str]:
    """Return the frontier and head hash that prev signed, after checking they still hold."""
    if prev is None:
        return Frontier(), GENESIS_HASH
    signer = SigningKey.objects.using(using).filter(fingerprint=prev.key_fingerprint).first()
    if signer is None:
        raise InconsistentLedger(f"the key {prev.key_fingerprint} that signed the last checkpoint is gone")
    try:
        signed = open_checkpoint(prev.note, [Key(signer.origin, bytes(signer.public_key))])
        frontier = Frontier(prev.tree_size, [bytes.fromhex(h) for h in prev.frontier])
    except (NoteError, ProofError, ValueError) as exc:
        raise InconsistentLedger(f"the last checkpoint does not verify ({exc})") from None
    if (signed.size, signed.root.hex()) != (prev.tree_size, prev.root_hash) or frontier.root() != signed.root:
        raise InconsistentLedger("the last checkpoint's stored tree does not match what it signed")
    if prev.tree_size == 0:
        return frontier, GENESIS_HASH
    head = AuditEvent.objects.using(using).filter(seq=prev.tree_size).values_list("hash", flat=True).first()
    if head is None:
        raise InconsistentLedger(f"the ledger no longer holds event {prev.tree_size}, which the last "
                                 "checkpoint signed: it was truncated or rolled back")
    if head != prev.head_hash:
        raise InconsistentLedger(f"event {prev.tree_size} changed since the last checkpoint signed it")
    return frontier, prev.head_hash


def rotate_key(actor: str) -> Checkpoint:
    """Close the old key's history with a checkpoint, rotate the key, and open the new key's."""
    make_checkpoint("rotation")
    keys.rotate(actor)
    return make_checkpoint("rotation")
