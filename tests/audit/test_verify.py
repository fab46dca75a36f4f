import pytest

from audit.ledger import append, verify
from audit.models import GENESIS_HASH, AuditEvent
from tests.audit import tamper

pytestmark = pytest.mark.django_db


@pytest.fixture
def chain():
    """Append five events and return them."""
    return [
        append("system.start", actor="system:web"),
        append("auth.failed", actor="key:ab12cd", outcome="denied", details={"reason": "revoked"}),
        append("chat.completion", actor="team:research", target="tiny", details={"stream": True}),
        append("variant.import", actor="admin:alice", target="tiny", details={"files": 3}),
        append("deployment.load", actor="system:web", target="tiny"),
    ]


def test_verify_accepts_an_empty_ledger():
    result = verify()
    assert (result.ok, result.events_checked, result.first_bad_seq) == (True, 0, None)
    assert result.head_hash == GENESIS_HASH


def test_verify_accepts_an_intact_chain(chain):
    result = verify(chunk_size=2)
    assert (result.ok, result.events_checked, result.first_bad_seq) == (True, 5, None)
    assert result.head_hash == chain[-1].hash


def test_verify_names_the_first_edited_column(chain):
    tamper.edit(2, outcome="ok")
    result = verify()
    assert (result.ok, result.first_bad_seq) == (False, 2)
    assert result.reason == "event 2: body does not match its columns (outcome)"


def test_verify_notices_a_type_change_that_python_equality_forgives(chain):
    tamper.edit(3, details={"stream": 1})
    result = verify()
    assert result.first_bad_seq == 3
    assert result.reason == "event 3: body does not match its columns (details)"


def test_verify_names_the_first_edited_body(chain):
    body = bytes(AuditEvent.objects.get(seq=2).body)
    tamper.edit(2, body=body.replace(b'"outcome":"denied"', b'"outcome":"ok"'))
    result = verify()
    assert (result.first_bad_seq, result.reason) == (2, "event 2: hash does not match its body")


def test_verify_names_the_event_after_a_fully_rewritten_one(chain):
    # A rewrite with a fresh body and hash is self-consistent; only the next link betrays it.
    original = AuditEvent.objects.get(seq=2)
    forged = tamper.forge(
        2, original.prev_hash, original.created_at,
        actor=original.actor, action=original.action, target="", outcome="ok", details={},
    )
    tamper.edit(2, outcome="ok", details={}, body=forged.body, hash=forged.hash)
    result = verify()
    assert (result.first_bad_seq, result.reason) == (3, "event 3: prev_hash does not link to event 2")


def test_verify_names_a_deleted_event(chain):
    tamper.delete(3)
    result = verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)
    assert result.reason == "sequence gap: expected 3, found 4"


def test_verify_names_the_event_displaced_by_an_inserted_one(chain):
    # The forged event at 3 links to 2 correctly; the old event 3, now at 4, still says it is 3.
    tamper.renumber_from(3, 1)
    previous = AuditEvent.objects.get(seq=2)
    tamper.insert(
        tamper.forge(
            3, previous.hash, previous.created_at,
            actor="admin:mallory", action="variant.delete", target="tiny", outcome="ok", details={},
        )
    )
    result = verify()
    assert (result.first_bad_seq, result.reason) == (4, "event 4: body does not match its columns (seq)")


def test_verify_names_a_replayed_event(chain):
    replay = AuditEvent.objects.get(seq=2)
    replay.seq = 6
    tamper.insert(replay)
    result = verify()
    assert (result.first_bad_seq, result.reason) == (6, "event 6: body does not match its columns (seq)")


def test_verify_names_the_first_of_two_swapped_events(chain):
    tamper.swap(2, 4)
    result = verify()
    assert (result.first_bad_seq, result.reason) == (2, "event 2: body does not match its columns (seq)")


def test_verify_names_a_first_event_that_does_not_start_from_genesis(chain):
    first = AuditEvent.objects.get(seq=1)
    forged = tamper.forge(
        1, "1" * 64, first.created_at,
        actor=first.actor, action=first.action, target=first.target,
        outcome=first.outcome, details=first.details,
    )
    tamper.edit(1, prev_hash=forged.prev_hash, body=forged.body, hash=forged.hash)
    result = verify()
    assert (result.first_bad_seq, result.reason) == (1, "event 1: prev_hash is not the genesis hash")


def test_verify_counts_the_events_it_read(chain):
    tamper.edit(4, actor="admin:mallory")
    result = verify()
    assert (result.events_checked, result.head_hash) == (4, chain[2].hash)
