"""Signed checkpoints: C2SP note format, encrypted key, extension-only signing, rotation."""
import base64
import os
import stat
from io import StringIO

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.conf import settings
from django.core.management import call_command
from django.db import DatabaseError, transaction

from audit import keys
from audit.checkpoints import InconsistentLedger, make_checkpoint, rotate_key
from audit.ledger import append
from audit.merkle import MerkleTree, leaf_hash
from audit.models import AppendOnlyError, AuditEvent, Checkpoint, SigningKey
from audit.verifier import Key, NoteError, key_id, open_checkpoint, trusted_keys
from tests.audit import tamper

pytestmark = pytest.mark.django_db


def append_events(count: int) -> None:
    for index in range(count):
        append("chat.completion", actor="team:research", details={"index": index})


def tree_root(size: int) -> bytes:
    bodies = AuditEvent.objects.order_by("seq").values_list("body", flat=True)[:size]
    return MerkleTree([leaf_hash(bytes(b)) for b in bodies]).root()


def test_a_checkpoint_is_a_c2sp_signed_note_over_the_rfc_9162_root():
    append_events(5)
    checkpoint = make_checkpoint("manual")
    key = SigningKey.objects.get()
    text, _, signature_line = checkpoint.note.partition("\n\n")
    origin, size, root, time_line = text.split("\n")
    # Five events and the key's creation, recorded just before the first checkpoint.
    assert (origin, size) == (settings.AUDIT_ORIGIN, "6")
    assert base64.b64decode(root) == tree_root(6)
    assert time_line == f"time {int(checkpoint.created_at.timestamp())}"
    dash, name, blob = signature_line.rstrip("\n").split(" ")
    blob = base64.b64decode(blob)
    assert (dash, name, blob[:4]) == ("\u2014", settings.AUDIT_ORIGIN, key_id(name, bytes(key.public_key)))
    Ed25519PublicKey.from_public_bytes(bytes(key.public_key)).verify(blob[4:], (text + "\n").encode())


def test_the_first_checkpoint_creates_the_key_records_it_and_pins_its_fingerprint(pin_file):
    make_checkpoint("manual")
    key = SigningKey.objects.get()
    created = AuditEvent.objects.get(action="audit.key_created")
    assert created.target == key.fingerprint
    assert pin_file.read_text().split() == [key.fingerprint]


def test_the_private_key_is_stored_encrypted_under_a_0600_kek_file():
    make_checkpoint("manual")
    key = SigningKey.objects.get()
    raw = keys.private_key(key).private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())
    assert raw not in bytes(key.private_key_encrypted)
    assert stat.S_IMODE(os.stat(settings.AUDIT_KEK_FILE).st_mode) == 0o600


def test_a_heartbeat_over_an_idle_ledger_signs_the_same_size_and_root():
    append_events(3)
    first = make_checkpoint("heartbeat")
    second = make_checkpoint("heartbeat")
    assert (second.tree_size, second.root_hash) == (first.tree_size, first.root_hash)


def test_each_checkpoint_extends_the_last_with_only_the_new_events():
    append_events(3)
    make_checkpoint("heartbeat")
    append_events(14)
    checkpoint = make_checkpoint("heartbeat")
    assert checkpoint.tree_size == AuditEvent.objects.count()
    assert bytes.fromhex(checkpoint.root_hash) == tree_root(checkpoint.tree_size)


def test_the_checkpoint_table_refuses_changes_from_the_orm_and_from_sql():
    checkpoint = make_checkpoint("manual")
    with pytest.raises(AppendOnlyError):
        Checkpoint.objects.all().delete()
    with pytest.raises(AppendOnlyError):
        checkpoint.save()
    for sql in ("UPDATE audit_checkpoint SET tree_size = 99", "DELETE FROM audit_checkpoint"):
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            tamper.run_sql(sql)


def test_a_rolled_back_ledger_is_never_signed():
    append_events(4)
    make_checkpoint("heartbeat")
    # Event 1 records the key's creation, so the checkpoint signed events 1..5.
    tamper.delete(5)
    tamper.delete(4)
    with pytest.raises(InconsistentLedger, match="no longer holds event 5"):
        make_checkpoint("heartbeat")
    assert Checkpoint.objects.count() == 1
    refused = AuditEvent.objects.get(action="audit.checkpoint_refused")
    assert refused.outcome == "refused"


def test_a_ledger_rewritten_under_the_last_checkpoint_is_never_signed():
    append_events(4)
    make_checkpoint("heartbeat")
    tamper.delete(5)
    append("chat.completion", actor="team:research", details={"index": "replacement"})
    with pytest.raises(InconsistentLedger, match="event 5 changed"):
        make_checkpoint("heartbeat")
    assert Checkpoint.objects.count() == 1


def test_a_tampered_stored_frontier_is_never_extended():
    append_events(3)
    checkpoint = make_checkpoint("heartbeat")
    tamper.edit_checkpoint(checkpoint.pk, frontier='["' + "00" * 32 + '"]')  # size 4: one subtree
    with pytest.raises(InconsistentLedger, match="stored tree"):
        make_checkpoint("heartbeat")


def test_rotation_is_a_ledger_event_signed_by_the_old_key_and_later_checkpoints_use_the_new_one():
    append_events(2)
    old_checkpoint = make_checkpoint("manual")
    old = SigningKey.objects.get()
    new_checkpoint = rotate_key("admin:alice")
    new = SigningKey.objects.order_by("-id").first()
    assert new.fingerprint != old.fingerprint == old_checkpoint.key_fingerprint
    assert new_checkpoint.key_fingerprint == new.fingerprint
    rotation = AuditEvent.objects.get(action="audit.key_rotated")
    assert rotation.details["old_fingerprint"] == old.fingerprint
    document = keys.keys_document()
    # Trusting either key vouches for the other, through the old key's signed statement.
    for fingerprint in (old.fingerprint, new.fingerprint):
        trusted = {k.fingerprint for k in trusted_keys(document, fingerprint)}
        assert trusted == {old.fingerprint, new.fingerprint}
    with pytest.raises(NoteError):
        open_checkpoint(new_checkpoint.note, [Key(old.origin, bytes(old.public_key))])


def test_a_rotation_statement_signed_by_another_key_is_not_trusted():
    make_checkpoint("manual")
    old = SigningKey.objects.get()
    rotate_key("admin:alice")
    document = keys.keys_document()
    document["rotations"][0]["signature"] = base64.b64encode(b"\x00" * 64).decode()
    assert {k.fingerprint for k in trusted_keys(document, old.fingerprint)} == {old.fingerprint}


def test_audit_checkpoint_command_prints_the_signed_note():
    append_events(2)
    out = StringIO()
    call_command("audit_checkpoint", stdout=out)
    checkpoint = Checkpoint.objects.get()
    assert out.getvalue().endswith(checkpoint.note)
    assert "checkpoint of 3 events" in out.getvalue()  # two events and the key's creation
