"""Every attack on an export that verify.py must catch, each named with its first affected event."""
import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from audit import keys
from audit.export import export
from audit.models import AuditEvent, Checkpoint, SigningKey
from audit.verifier import Problem, canonical, format_checkpoint_body, key_id, verify_bundle
from tests.audit import tamper
from tests.audit.evidence import change_json, change_lines, chat, history, rewrite

pytestmark = pytest.mark.django_db
SINCE = datetime(2020, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def bundle(settings, tmp_path):
    """Export a history of 12 chat events, the key's creation and three heartbeats."""
    history(settings)
    path = tmp_path / "bundle.zip"
    export(path, SINCE, actor="test:auditor")
    return path


@pytest.fixture
def fingerprint():
    return SigningKey.objects.get().fingerprint


def problem(path, fingerprint, since=None) -> Problem:
    with pytest.raises(Problem) as info:
        verify_bundle(str(path), fingerprint, since)
    return info.value


def test_an_intact_bundle_verifies(bundle, fingerprint):
    assert verify_bundle(str(bundle), fingerprint).startswith("OK: events 1..13 (13 events) intact")


def test_verify_py_runs_alone_from_a_directory_outside_the_repository(bundle, fingerprint, tmp_path):
    outside = tmp_path / "auditor"
    outside.mkdir()
    (outside / "verify.py").write_bytes(zipfile.ZipFile(bundle).read("verify.py"))
    run = subprocess.run([sys.executable, "-I", "verify.py", str(bundle), "--pubkey-fingerprint", fingerprint],
                         cwd=outside, capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout[:3]) == (0, "OK:"), run.stdout + run.stderr
    forged = rewrite(bundle, "events.jsonl", change_lines(lambda ls: ls[:3] + ls[4:]))
    run = subprocess.run([sys.executable, "-I", "verify.py", str(forged), "--pubkey-fingerprint", fingerprint],
                         cwd=outside, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "first affected sequence number: 4" in run.stdout


def test_it_names_an_edited_event(bundle, fingerprint):
    found = problem(rewrite(bundle, "events.jsonl", change_lines(
        lambda ls: ls[:4] + [ls[4].replace(b'"completion_tokens":3', b'"completion_tokens":4')] + ls[5:])), fingerprint)
    assert (found.seq, "edited" in found.message) == (5, True)


def test_it_names_an_edited_last_event_through_the_signed_root(bundle, fingerprint):
    found = problem(rewrite(bundle, "events.jsonl", change_lines(
        lambda ls: ls[:-1] + [ls[-1].replace(b'"prompt_tokens":21', b'"prompt_tokens":2')])), fingerprint)
    # Nothing follows it to name it: the signed root narrows it to the events after the last match.
    assert found.seq == 10 and found.message == "events 10..13 do not match the signed checkpoint of size 13"


def test_it_names_a_deleted_event(bundle, fingerprint):
    found = problem(rewrite(bundle, "events.jsonl", change_lines(lambda ls: ls[:6] + ls[7:])), fingerprint)
    assert (found.seq, found.message.startswith("deleted event")) == (7, True)


def test_it_names_an_inserted_event(bundle, fingerprint):
    def insert(lines):
        forged = json.loads(lines[6])
        forged["details"]["prompt_tokens"] = 1
        forged["prev_hash"] = hashlib.sha256(lines[5]).hexdigest()
        return lines[:6] + [canonical(forged)] + lines[6:]
    found = problem(rewrite(bundle, "events.jsonl", change_lines(insert)), fingerprint)
    assert (found.seq, found.message.startswith("inserted event")) == (7, True)


def test_it_names_reordered_events(bundle, fingerprint):
    found = problem(rewrite(bundle, "events.jsonl", change_lines(
        lambda ls: ls[:7] + [ls[8], ls[7]] + ls[9:])), fingerprint)
    assert (found.seq, found.message.startswith("events reordered")) == (8, True)


def test_it_names_a_duplicated_event(bundle, fingerprint):
    found = problem(rewrite(bundle, "events.jsonl", change_lines(lambda ls: ls[:5] + [ls[4]] + ls[5:])), fingerprint)
    assert (found.seq, found.message.startswith("duplicated event")) == (5, True)


def test_it_names_re_encoded_event_bytes(bundle, fingerprint):
    found = problem(rewrite(bundle, "events.jsonl", change_lines(
        lambda ls: ls[:2] + [json.dumps(json.loads(ls[2]), sort_keys=True).encode()] + ls[3:])), fingerprint)
    assert (found.seq, "re-encoded" in found.message) == (3, True)


def test_it_names_a_truncated_tail_of_events(bundle, fingerprint):
    found = problem(rewrite(bundle, "events.jsonl", change_lines(lambda ls: ls[:-3])), fingerprint)
    assert (found.seq, found.message.startswith("truncated tail")) == (11, True)


def test_it_catches_a_missing_last_checkpoint(bundle, fingerprint):
    found = problem(rewrite(bundle, "checkpoints.json", change_json(lambda notes: notes[:1])), fingerprint)
    assert "(size 5) does not cover" in found.message and found.seq == 6


def test_it_catches_a_missing_heartbeat(settings, tmp_path):
    history(settings, seconds_apart=True)
    path = tmp_path / "bundle.zip"
    export(path, SINCE, actor="test:auditor")
    fp = SigningKey.objects.get().fingerprint
    assert verify_bundle(str(path), fp).startswith("OK")
    found = problem(rewrite(path, "checkpoints.json", change_json(lambda notes: notes[:1] + notes[2:])), fp)
    assert found.message.startswith("heartbeat missing") and found.seq == 6


def test_it_catches_a_last_checkpoint_too_old_for_the_export_time(settings, tmp_path):
    history(settings, seconds_apart=True)
    path = tmp_path / "bundle.zip"
    export(path, SINCE, actor="test:auditor")
    fp = SigningKey.objects.get().fingerprint
    # The tail's events and its checkpoints removed together, so what is left is self-consistent.
    found = problem(rewrite(rewrite(path, "checkpoints.json", change_json(lambda notes: notes[:1])),
                            "events.jsonl", change_lines(lambda ls: ls[:5])), fp)
    assert found.message.startswith("truncated tail") and found.seq == 6


def test_it_catches_a_forged_checkpoint_signature(bundle, fingerprint):
    def forge(notes):
        text, _, signature = notes[1].partition("\n\n")
        blob = bytearray(base64.b64decode(signature.split(" ")[2]))
        blob[10] ^= 1
        return [notes[0], f"{text}\n\n\u2014 {signature.split(' ')[1]} {base64.b64encode(blob).decode()}\n"] + notes[2:]
    found = problem(rewrite(bundle, "checkpoints.json", change_json(forge)), fingerprint)
    assert "forged or missing signature" in found.message and found.seq == 6


def test_it_catches_a_missing_checkpoint_signature(bundle, fingerprint):
    found = problem(rewrite(bundle, "checkpoints.json", change_json(
        lambda notes: [notes[0].partition("\n\n")[0] + "\n"] + notes[1:])), fingerprint)
    assert "carries no signature" in found.message and found.seq == 1


def test_it_catches_a_replayed_older_checkpoint(bundle, fingerprint):
    found = problem(rewrite(bundle, "checkpoints.json", change_json(lambda notes: notes + [notes[0]])), fingerprint)
    assert found.message.startswith("replayed older checkpoint")


def test_it_catches_a_fork(bundle, fingerprint):
    key = SigningKey.objects.get()
    cp = Checkpoint.objects.order_by("id")[1]
    fork = keys.checkpoint_note(cp.tree_size, b"\x42" * 32, int(cp.created_at.timestamp()) + 1, key)
    found = problem(rewrite(bundle, "checkpoints.json", change_json(
        lambda notes: notes[:2] + [fork] + notes[2:])), fingerprint)
    assert found.message.startswith("fork: two checkpoints of size 9")


def test_it_catches_a_swapped_public_key(bundle, fingerprint):
    forger = Ed25519PrivateKey.generate()
    public = forger.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    origin = SigningKey.objects.get().origin

    def resign(note):
        text = note.partition("\n\n")[0] + "\n"
        blob = key_id(origin, public) + forger.sign(text.encode())
        return f"{text}\n\u2014 {origin} {base64.b64encode(blob).decode()}\n"
    swapped = rewrite(bundle, "keys.json", change_json(lambda doc: {"keys": [
        {"name": origin, "public_key": base64.b64encode(public).decode()}], "rotations": []}))
    swapped = rewrite(swapped, "checkpoints.json", change_json(lambda notes: [resign(n) for n in notes]))
    found = problem(swapped, fingerprint)
    assert found.message.startswith("public key swapped")


def test_consecutive_exports_chain_through_since_checkpoint(settings, tmp_path):
    history(settings)
    first = tmp_path / "first.zip"
    manifest = export(first, SINCE, actor="test:auditor")
    chat(3, start=100)
    second = tmp_path / "second.zip"
    export(second, datetime.fromisoformat(manifest["until_iso"]) + timedelta(microseconds=1), actor="test:auditor")
    fp = SigningKey.objects.get().fingerprint
    assert verify_bundle(str(second), fp, zipfile.ZipFile(first).read("checkpoint.txt").decode()).startswith("OK")


def test_it_catches_a_database_rolled_back_between_exports(settings, tmp_path):
    history(settings)
    first = tmp_path / "first.zip"
    export(first, SINCE, actor="test:auditor")
    previous = zipfile.ZipFile(first).read("checkpoint.txt").decode()
    # Someone with the database restores an old backup: events 10.. and later checkpoints vanish.
    tamper.delete_checkpoints_from(Checkpoint.objects.filter(tree_size__gte=10).order_by("id").first().pk)
    for seq in range(AuditEvent.objects.count(), 9, -1):
        tamper.delete(seq)
    chat(8, start=200)
    second = tmp_path / "second.zip"
    export(second, SINCE, actor="test:auditor")
    fp = SigningKey.objects.get().fingerprint
    assert verify_bundle(str(second), fp).startswith("OK")  # alone, the rewritten history looks fine
    found = problem(second, fp, previous)
    assert found.message.startswith("rolled back")


def test_a_bundle_carries_the_report_readme_and_signed_manifest(bundle):
    names = set(zipfile.ZipFile(bundle).namelist())
    assert {"report.html", "report.pdf", "README.txt", "verify.py", "manifest.sig", "checkpoint.txt"} <= names
    report = zipfile.ZipFile(bundle).read("report.html").decode()
    assert "Blocked egress attempts" in report and "research" in report
    assert zipfile.ZipFile(bundle).read("report.pdf").startswith(b"%PDF")
