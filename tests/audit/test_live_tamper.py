"""Every attack on the live ledger that audit_verify must catch, against its checkpoints and pin file."""
import base64
import hashlib
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.core.management import CommandError, call_command

from audit import keys
from audit.live_verify import verify_live
from audit.models import AuditEvent, Checkpoint, SigningKey
from audit.verifier import fingerprint, key_id
from tests.audit import tamper
from tests.audit.evidence import history

pytestmark = pytest.mark.django_db


@pytest.fixture
def ledger(settings):
    """The key, 12 chat events and three heartbeats (after events 5, 9 and 13)."""
    history(settings)


def failure(**kwargs):
    result = verify_live(**kwargs)
    assert not result.ok
    return result


def test_an_intact_live_ledger_verifies_against_its_checkpoints(ledger):
    result = verify_live()
    assert result.ok and result.checkpoints == 3 and "3 checkpoints verified" in result.reason


def test_it_names_an_edited_event(ledger):
    tamper.edit(6, outcome="error")
    assert failure().first_bad_seq == 6


def test_it_names_an_edited_event_whose_chain_was_rewritten_after_it(ledger):
    # The attacker rewrites event 6 and every later event so the hash chain holds again.
    for seq in range(6, 14):
        event = AuditEvent.objects.get(seq=seq)
        prev = AuditEvent.objects.get(seq=seq - 1).hash
        details = dict(event.details, rewritten=True)
        forged = tamper.forge(seq, prev, event.created_at, actor=event.actor, action=event.action,
                              target=event.target, outcome=event.outcome, details=details)
        tamper.edit(seq, details=details, prev_hash=prev, body=forged.body, hash=forged.hash)
    result = failure()
    assert result.first_bad_seq == 6 and "do not match the signed checkpoint of size 9" in result.reason


def test_it_names_a_deleted_event(ledger):
    tamper.delete(7)
    assert failure().first_bad_seq == 7


def test_it_names_an_inserted_event(ledger):
    tamper.renumber_from(4, 1)
    prev = AuditEvent.objects.get(seq=3).hash
    tamper.insert(tamper.forge(4, prev, AuditEvent.objects.get(seq=3).created_at, actor="team:x",
                               action="chat.completion", target="tiny", outcome="ok", details={}))
    assert failure().first_bad_seq == 5


def test_it_names_reordered_events(ledger):
    tamper.swap(3, 4)
    assert failure().first_bad_seq == 3


def test_it_names_a_duplicated_event(ledger):
    tamper.renumber_from(5, 1)
    original = AuditEvent.objects.get(seq=4)
    copy = AuditEvent(**{f.attname: getattr(original, f.attname) for f in AuditEvent._meta.concrete_fields})
    copy.seq = 5
    tamper.insert(copy)
    result = failure()
    assert result.first_bad_seq == 5 and "body does not match" in result.reason


def test_it_names_re_encoded_event_bytes(ledger):
    event = AuditEvent.objects.get(seq=8)
    body = json.dumps(json.loads(bytes(event.body)), indent=1).encode()
    tamper.edit(8, body=body, hash=hashlib.sha256(body).hexdigest())
    result = failure()
    assert result.first_bad_seq == 8 and "canonical form" in result.reason


def test_it_catches_a_truncated_tail_under_a_checkpoint(ledger):
    for seq in (13, 12):
        tamper.delete(seq)
    result = failure()
    assert (result.first_bad_seq, result.reason.startswith("truncated")) == (12, True)


def test_it_catches_a_truncated_tail_with_its_checkpoints_removed(ledger):
    tamper.delete_checkpoints_from(Checkpoint.objects.order_by("id")[2].pk)
    for seq in (13, 12, 11, 10):
        tamper.delete(seq)
    assert verify_live().ok  # right after the cut it cannot be told from a quiet moment...
    later = failure(now=int(time.time()) + 3601)  # ...but the next heartbeat never comes
    assert later.reason.startswith("truncated tail") and later.first_bad_seq == 10


def test_it_catches_a_missing_heartbeat(settings):
    last = history(settings, seconds_apart=True)
    assert verify_live(now=last).ok  # judged at the last heartbeat, not whenever a busy machine got here
    tamper.delete_checkpoint(Checkpoint.objects.order_by("id")[1].pk)
    result = failure(now=last)
    assert result.reason.startswith("heartbeat missing") and result.first_bad_seq == 6


def test_it_catches_a_forged_checkpoint_signature(ledger):
    cp = Checkpoint.objects.order_by("id")[1]
    text, _, line = cp.note.partition("\n\n")
    blob = bytearray(base64.b64decode(line.split(" ")[2]))
    blob[20] ^= 1
    tamper.edit_checkpoint(cp.pk, note=f"{text}\n\n\u2014 {line.split(' ')[1]} {base64.b64encode(blob).decode()}\n")
    result = failure()
    assert "forged or missing signature" in result.reason and result.first_bad_seq == 6


def test_it_catches_a_missing_checkpoint_signature(ledger):
    cp = Checkpoint.objects.order_by("id")[0]
    tamper.edit_checkpoint(cp.pk, note=cp.note.partition("\n\n")[0] + "\n")
    assert "carries no signature" in failure().reason


def test_it_catches_a_replayed_older_checkpoint(ledger):
    old = Checkpoint.objects.order_by("id")[0]
    Checkpoint(created_at=old.created_at, kind="heartbeat", tree_size=old.tree_size, root_hash=old.root_hash,
               head_hash=old.head_hash, frontier=old.frontier, key_fingerprint=old.key_fingerprint,
               note=old.note).save()
    assert failure().reason.startswith("replayed older checkpoint")


def test_it_catches_a_fork(ledger):
    cp = Checkpoint.objects.order_by("id")[1]
    key = SigningKey.objects.get()
    note = keys.checkpoint_note(cp.tree_size, b"\x42" * 32, int(time.time()) + 1, key)
    Checkpoint(created_at=cp.created_at, kind="heartbeat", tree_size=cp.tree_size, root_hash="42" * 32,
               head_hash=cp.head_hash, frontier=cp.frontier, key_fingerprint=key.fingerprint, note=note).save()
    assert failure().reason.startswith("fork: two checkpoints of size 9")


def test_it_catches_a_swapped_public_key(ledger):
    forger = Ed25519PrivateKey.generate()
    public = forger.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key = SigningKey.objects.get()
    SigningKey.objects.filter(pk=key.pk).update(public_key=public, fingerprint=fingerprint(public))
    for cp in Checkpoint.objects.all():
        text = cp.note.partition("\n\n")[0] + "\n"
        blob = key_id(key.origin, public) + forger.sign(text.encode())
        tamper.edit_checkpoint(cp.pk, note=f"{text}\n\u2014 {key.origin} {base64.b64encode(blob).decode()}\n")
    assert failure().reason.startswith("public key swapped")
    # The same attack, judged against a fingerprint the auditor brought along.
    assert failure(expected_fingerprint=key.fingerprint).reason.startswith("public key swapped")


def test_audit_verify_command_reports_checkpoints_and_exits_1_on_a_problem(ledger):
    call_command("audit_verify")
    tamper.delete(13)
    with pytest.raises(CommandError, match="BROKEN at event 13: truncated") as info:
        call_command("audit_verify")
    assert info.value.returncode == 1
