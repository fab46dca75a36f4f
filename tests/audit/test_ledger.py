import hashlib
import hmac
import json

import pytest
from django.conf import settings
from django.db import transaction

from audit.canonical import canonical_bytes
from audit.kek import derived_key
from audit.ledger import append, digest, digest_matches
from audit.models import GENESIS_HASH, AuditEvent

pytestmark = pytest.mark.django_db


def test_first_event_links_to_the_genesis_hash():
    event = append("system.start", actor="system:web")
    assert (event.seq, event.prev_hash) == (1, GENESIS_HASH)


def test_each_event_links_to_the_one_before():
    first = append("auth.failed", actor="key:ab12cd", outcome="denied")
    second = append("chat.completion", actor="team:research", target="tiny-moe")
    assert second.seq == first.seq + 1
    assert second.prev_hash == first.hash


def test_hash_covers_the_stored_body():
    append("variant.import", actor="admin:alice", target="tiny", details={"files": 3})
    stored = AuditEvent.objects.get(seq=1)
    body = bytes(stored.body)
    assert stored.hash == hashlib.sha256(body).hexdigest()
    assert body == canonical_bytes(stored.body_fields())


def test_body_holds_every_field_of_the_event():
    event = append("deployment.load", actor="system:web", target="tiny", details={"gpus": [0, 1]})
    body = json.loads(bytes(event.body))
    assert body == {
        "seq": 1,
        "time": event.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": "system:web",
        "action": "deployment.load",
        "target": "tiny",
        "outcome": "ok",
        "details": {"gpus": [0, 1], "node": settings.AUDIT_NODE},  # the node that wrote it, in every event
        "prev_hash": GENESIS_HASH,
    }


def test_stored_event_reads_back_as_appended():
    event = append("chat.completion", actor="team:research", details={"ok": True, "n": None})
    stored = AuditEvent.objects.get(seq=event.seq)
    assert stored.body_fields() == event.body_fields()
    assert stored.created_at.utcoffset().total_seconds() == 0


def test_append_refuses_floats_naming_the_key_and_stores_nothing():
    with pytest.raises(ValueError, match="latency_ms"):
        append("chat.completion", actor="team:research", details={"latency_ms": 12.5})
    assert not AuditEvent.objects.exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"actor": 7}, "actor must be a string"),
        ({"actor": ""}, "actor must not be empty"),
        ({"actor": "x" * 201}, "actor is longer than 200"),
        ({"actor": "system:web", "details": ["not", "a", "dict"]}, "details must be a dict"),
    ],
)
def test_append_refuses_malformed_events(kwargs, message):
    with pytest.raises(ValueError, match=message):
        append("system.start", **kwargs)


def test_append_records_a_target_of_any_length():
    path = "/v1/" + "a" * 10_000
    event = append("auth.failed", actor="anonymous", target=path, outcome="denied")
    assert AuditEvent.objects.get(seq=event.seq).target == path


def test_an_append_rolled_back_with_its_caller_leaves_no_gap():
    append("system.start", actor="system:web")
    with pytest.raises(RuntimeError), transaction.atomic():
        append("variant.import", actor="admin:alice")
        raise RuntimeError("the import failed after recording")
    event = append("variant.import", actor="admin:alice", outcome="failed")
    assert list(AuditEvent.objects.values_list("seq", flat=True)) == [1, 2]
    assert event.prev_hash == AuditEvent.objects.get(seq=1).hash


def test_digest_is_an_hmac_under_the_box_key_not_a_plain_hash():
    value = digest("héllo")
    key = derived_key("digest")
    assert value == "hmac-sha256:" + hmac.new(key, "héllo".encode(), hashlib.sha256).hexdigest()
    # Guessing "yes" by hashing it, as one could with a plain SHA-256, finds nothing.
    assert digest("yes").removeprefix("hmac-sha256:") != hashlib.sha256(b"yes").hexdigest()


def test_digest_matches_accepts_the_text_and_refuses_any_other():
    assert digest_matches("the plan", digest("the plan"))
    assert not digest_matches("the plan.", digest("the plan"))
    # Events recorded before digests were keyed still answer.
    assert digest_matches("old", "sha256:" + hashlib.sha256(b"old").hexdigest())
