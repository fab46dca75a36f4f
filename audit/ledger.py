"""Append events to the hash-chained audit ledger, and verify the chain."""
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from django.conf import settings
from django.db import connections, router, transaction

from audit.canonical import canonical_bytes
from audit.kek import derived_key
from audit.models import GENESIS_HASH, AuditEvent

# Key of the PostgreSQL advisory lock that serialises appends from every
# process (and every box sharing the database). Fixed and arbitrary: the bytes
# "auditlog" read as a signed 64-bit integer.
LEDGER_LOCK_KEY = int.from_bytes(b"auditlog", "big", signed=True)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a walk over the chain."""

    ok: bool
    events_checked: int  # rows read, including the first bad one
    first_bad_seq: int | None
    reason: str
    head_hash: str = GENESIS_HASH  # hash of the last event found intact


def digest(text: str) -> str:
    """Return "hmac-sha256:" and the hex HMAC of text under the box's digest key, to store instead of text."""
    # Keyed, so that nobody holding the ledger can confirm a guess of a short prompt ("yes",
    # a name, a number) by hashing candidates; only the box, asked with the text, can compare.
    return "hmac-sha256:" + hmac.new(derived_key("digest"), text.encode("utf-8"), hashlib.sha256).hexdigest()


def digest_matches(text: str, stored: str) -> bool:
    """Return whether stored (an "hmac-sha256:" or older "sha256:" digest) is the digest of text."""
    if stored.startswith("sha256:"):  # events recorded before digests were keyed
        candidate = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    else:
        candidate = digest(text)
    return hmac.compare_digest(candidate, stored)


def append(
    action: str,
    *,
    actor: str,
    target: str = "",
    outcome: str = "ok",
    details: dict | None = None,
) -> AuditEvent:
    """Append one event after the current head of the chain and return it."""
    return append_many([dict(action=action, actor=actor, target=target, outcome=outcome, details=details)])[0]


def append_many(events: list[dict]) -> list[AuditEvent]:
    """Append events (the keyword arguments of `append`), in order, after the current head, in one transaction.

    Every event is checked before any is stored: one malformed event appends none of them.
    """
    built = []
    for fields in events:
        details = fields.get("details")
        event = AuditEvent(actor=fields["actor"], action=fields["action"], target=fields.get("target", ""),
                           outcome=fields.get("outcome", "ok"), details={} if details is None else details)
        _check_columns(event)
        event.details = _with_node(event.details)
        built.append(event)
    using = router.db_for_write(AuditEvent)
    # Called inside an outer atomic block this is only a savepoint, and the lock
    # below (on SQLite: the database write lock) is held until the outer
    # transaction ends, so callers should keep such blocks short.
    with transaction.atomic(using=using):
        lock(using)
        head = AuditEvent.objects.using(using).order_by("-seq").values_list("seq", "hash").first()
        seq, prev_hash = head if head else (0, GENESIS_HASH)
        for event in built:
            seq += 1
            event.seq, event.prev_hash = seq, prev_hash
            # Read the clock under the lock, so times never go backwards along seq
            # (unless the system clock itself is stepped back).
            event.created_at = datetime.now(timezone.utc)
            event.body = canonical_bytes(event.body_fields())
            event.hash = prev_hash = hashlib.sha256(event.body).hexdigest()
            event.save(using=using)
    return built


def lock(using: str) -> None:
    """Hold the ledger's append lock until the current transaction ends (call inside atomic)."""
    connection = connections[using]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [LEDGER_LOCK_KEY])
    # SQLite needs nothing here: settings make every transaction BEGIN IMMEDIATE,
    # so the write lock is already held when the head is read. Without it, two
    # appenders could read the same head; the primary key on seq would then
    # refuse the second insert rather than let the chain fork.


def _with_node(details: dict) -> dict:
    """Return details with the node that writes the event: one ledger serves every node of the appliance."""
    # Inside details, so the hash covers it and every verifier already checks it, with no new column.
    if "node" in details:
        raise ValueError("details must not hold 'node': the ledger records the node that writes the event")
    return {**details, "node": settings.AUDIT_NODE}


def _check_columns(event: AuditEvent) -> None:
    """Raise ValueError unless the event's text columns and details can be stored as given."""
    for name in ("actor", "action", "target", "outcome"):
        value = getattr(event, name)
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, not {type(value).__name__}")
        limit = AuditEvent._meta.get_field(name).max_length
        if limit is not None and len(value) > limit:
            raise ValueError(f"{name} is longer than {limit} characters")
        if not value and name != "target":
            raise ValueError(f"{name} must not be empty")
    if not isinstance(event.details, dict):
        raise ValueError(f"details must be a dict, not {type(event.details).__name__}")
    # Refuse floats before taking the lock, naming the offending key.
    canonical_bytes({"details": event.details})


def verify(chunk_size: int = 2000) -> VerifyResult:
    """Walk the chain in seq order and report the first event that breaks it."""
    expected_seq, prev_hash, checked = 1, GENESIS_HASH, 0
    # Deliberately outside transaction.atomic(): on SQLite that would BEGIN
    # IMMEDIATE and stall every append for the length of the walk. Appends
    # only extend the tail, so a walk without one snapshot is still sound.
    events = AuditEvent.objects.order_by("seq").iterator(chunk_size=chunk_size)
    for event in events:
        checked += 1
        problem = _find_problem(event, expected_seq, prev_hash)
        if problem:
            bad_seq, reason = problem
            return VerifyResult(False, checked, bad_seq, reason, prev_hash)
        expected_seq, prev_hash = expected_seq + 1, event.hash
    return VerifyResult(True, checked, None, f"{checked} events, chain intact", prev_hash)


def _find_problem(event: AuditEvent, expected_seq: int, prev_hash: str) -> tuple[int, str] | None:
    """Return (seq, reason) for the first problem with event, or None when it is intact."""
    seq = event.seq
    if seq > expected_seq:
        return expected_seq, f"sequence gap: expected {expected_seq}, found {seq}"
    if seq < expected_seq:
        return seq, f"sequence repeats: expected {expected_seq}, found {seq}"
    body = bytes(event.body)
    if hashlib.sha256(body).hexdigest() != event.hash:
        return seq, f"event {seq}: hash does not match its body"
    try:
        # Comparing canonical bytes, not parsed values, also catches type
        # changes that Python equality forgives (true == 1) and a body that
        # is valid JSON but not in canonical form.
        columns_body = canonical_bytes(event.body_fields())
    except ValueError as exc:
        return seq, f"event {seq}: a column holds a value the canonical form refuses ({exc})"
    if body != columns_body:
        mismatch = _describe_mismatch(event, body)
        return seq, f"event {seq}: body does not match its columns ({mismatch})"
    if event.prev_hash != prev_hash:
        if seq == 1:
            return seq, "event 1: prev_hash is not the genesis hash"
        return seq, f"event {seq}: prev_hash does not link to event {seq - 1}"
    return None


def _describe_mismatch(event: AuditEvent, body: bytes) -> str:
    """Name the fields where body and the event's columns disagree."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return "body is not JSON"
    if not isinstance(parsed, dict):
        return "body is not a JSON object"
    expected = event.body_fields()
    differing = [
        key
        for key in sorted(expected.keys() | parsed.keys())
        if key not in parsed or key not in expected or not _same(parsed[key], expected[key])
    ]
    return ", ".join(differing) if differing else "body is not in canonical form"


def _same(a: object, b: object) -> bool:
    """Return whether a and b have the same canonical bytes."""
    try:
        return canonical_bytes(a) == canonical_bytes(b)
    except ValueError:
        return False
