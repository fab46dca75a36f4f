"""Verify the live ledger as verify.py verifies a bundle: chain, signed checkpoints, Merkle roots."""
import base64
import time
from dataclasses import dataclass

from django.conf import settings

from audit import keys, ledger
from audit.merkle import Frontier, leaf_hash
from audit.models import AuditEvent, Checkpoint, SigningKey
from audit.verifier import Key, NoteError, Problem, check_checkpoint_series, open_checkpoint, trusted_keys


@dataclass(frozen=True)
class LiveResult:
    """Outcome of a full verification of the live ledger."""

    ok: bool
    first_bad_seq: int | None
    reason: str
    events: int = 0
    checkpoints: int = 0


def verify_live(expected_fingerprint: str | None = None, now: int | None = None,
                max_gap: int | None = None) -> LiveResult:
    """Check the chain, then every checkpoint's signature, order and root against the events."""
    chain = ledger.verify()
    if not chain.ok:
        return LiveResult(False, chain.first_bad_seq, chain.reason, chain.events_checked)
    try:
        return _verify_checkpoints(chain.events_checked, chain.head_hash, expected_fingerprint,
                                   int(time.time()) if now is None else now,
                                   settings.AUDIT_MAX_GAP_S if max_gap is None else max_gap)
    except Problem as problem:
        return LiveResult(False, problem.seq, problem.message, chain.events_checked)


def _trusted(expected_fingerprint: str | None) -> list[Key]:
    """Return the keys to trust: the given fingerprint's, else those pinned on this box."""
    if expected_fingerprint:
        return trusted_keys(keys.keys_document(), expected_fingerprint)
    stored = list(SigningKey.objects.order_by("id"))
    pinned = keys.pinned_fingerprints()
    # The pin file lives on the box's disk, out of reach of someone who only holds the database.
    strangers = [k.fingerprint for k in stored if pinned and k.fingerprint not in pinned]
    if strangers:
        raise Problem(f"public key swapped: the database holds key {strangers[0]}, "
                      f"which this box never created (pinned: {', '.join(sorted(pinned))})", None)
    return [Key(k.origin, bytes(k.public_key)) for k in stored]


def _verify_checkpoints(events: int, head_hash: str, expected_fingerprint: str | None, now: int,
                        max_gap: int) -> LiveResult:
    """Raise Problem at the first checkpoint that is forged, replayed, forked, stale or unmatched."""
    rows = list(Checkpoint.objects.order_by("id"))
    if not rows:
        return LiveResult(True, None, f"{events} events, head hash {head_hash}; no checkpoints yet", events)
    trusted = _trusted(expected_fingerprint)
    signed, covered = [], 0
    for row in rows:
        try:
            cp = open_checkpoint(row.note, trusted)
        except NoteError as exc:
            raise Problem(f"checkpoint #{row.pk}: {exc} (forged or missing signature)", covered + 1) from None
        if (cp.size, cp.root.hex()) != (row.tree_size, row.root_hash):
            raise Problem(f"checkpoint #{row.pk}: its columns differ from its signed note", covered + 1)
        signed.append(cp)
        covered = max(covered, cp.size)
    check_checkpoint_series(signed, signed[0].origin, max_gap, now)
    if covered > events:
        raise Problem(f"truncated: a checkpoint signed {covered} events, the ledger holds {events}", events + 1)
    _match_roots(signed)
    latest = signed[-1]
    return LiveResult(True, None, f"{events} events, head hash {head_hash}; {len(signed)} checkpoints "
                      f"verified, latest "
                      f"of size {latest.size} signed by {latest.signer} "
                      f"(root {base64.b64encode(latest.root).decode()})", events, len(signed))


def _match_roots(signed: list) -> None:
    """Raise Problem unless the events hash to every checkpoint's signed root."""
    wanted = {}
    for cp in signed:
        wanted[cp.size] = cp.root
    frontier, matched = Frontier(), 0
    if 0 in wanted and wanted[0] != frontier.root():
        raise Problem("a checkpoint of the empty ledger has the wrong root", 1)
    bodies = AuditEvent.objects.order_by("seq").values_list("body", flat=True).iterator(chunk_size=2000)
    for body in bodies:
        frontier.append(leaf_hash(bytes(body)))
        root = wanted.get(frontier.size)
        if root is not None:
            if root != frontier.root():
                raise Problem(f"events {matched + 1}..{frontier.size} do not match the signed checkpoint "
                              f"of size {frontier.size}", matched + 1)
            matched = frontier.size
