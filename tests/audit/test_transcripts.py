"""Transcripts: kept only when the team asks, encrypted, read with permission, purged, shredded."""
from datetime import datetime, timedelta, timezone

import pytest
from django.contrib.auth.models import AnonymousUser, Permission, User
from django.core.exceptions import PermissionDenied

from audit import transcripts
from audit.models import AuditEvent, Transcript

pytestmark = pytest.mark.django_db
SECRET = "the merger closes on Friday"


@pytest.fixture
def reader():
    user = User.objects.create_user("auditor", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="read_transcript"))
    return User.objects.get(pk=user.pk)  # reloaded, so the permission cache is fresh


@pytest.fixture
def kept():
    transcripts.set_policy("research", keep=True, actor="admin:alice")
    return transcripts.store("research", "tiny", [{"role": "user", "content": SECRET}], "noted")


def test_transcripts_are_not_kept_unless_the_team_asks():
    assert transcripts.store("sales", "tiny", [{"role": "user", "content": SECRET}], "ok") is None
    assert Transcript.objects.count() == 0


def test_a_burst_reads_the_policies_once_and_keeps_only_teams_that_ask(django_assert_max_num_queries):
    transcripts.set_policy("research", keep=True, actor="admin:alice")
    burst = [(team, "tiny", [{"role": "user", "content": f"{team} {i}"}], "ok")
             for i in range(3) for team in ("research", "sales")]
    with django_assert_max_num_queries(20) as queries:
        stored = transcripts.store_many(burst)
    assert [s is not None for s in stored] == [True, False] * 3
    assert sum("audit_transcriptpolicy" in q["sql"] for q in queries.captured_queries) == 1
    assert Transcript.objects.filter(team="research").count() == 3 and Transcript.objects.count() == 3


def test_kept_transcripts_are_encrypted_at_rest(kept):
    assert SECRET.encode() not in bytes(kept.ciphertext)
    assert kept.team == "research" and len(bytes(kept.nonce)) == 12


def test_a_staff_member_with_the_permission_reads_and_the_read_is_recorded(kept, reader):
    assert transcripts.read(kept, reader) == {"messages": [{"role": "user", "content": SECRET}],
                                              "completion": "noted"}
    event = AuditEvent.objects.get(action="transcript.read")
    assert (event.actor, event.target, event.outcome) == ("admin:auditor", "research", "ok")
    assert SECRET not in bytes(event.body).decode()


@pytest.mark.parametrize("who", ["staff without the permission", "another team's member", "a stranger"])
def test_everyone_else_is_refused_and_the_attempt_is_recorded(kept, who):
    user = {"staff without the permission": lambda: User.objects.create_user("bob", is_staff=True),
            "another team's member": lambda: User.objects.create_user("sales-carol"),
            "a stranger": AnonymousUser}[who]()
    with pytest.raises(PermissionDenied):
        transcripts.read(kept, user)
    assert AuditEvent.objects.get(action="transcript.read").outcome == "denied"


def test_retention_purges_old_transcripts_per_team_and_records_it(kept):
    transcripts.set_policy("research", keep=True, retention_days=7, actor="admin:alice")
    assert transcripts.purge_expired("system:beat", now=datetime.now(timezone.utc) + timedelta(days=6)) == 0
    assert transcripts.purge_expired("system:beat", now=datetime.now(timezone.utc) + timedelta(days=8)) == 1
    event = AuditEvent.objects.get(action="transcript.purged")
    assert (event.target, event.details["count"], event.details["retention_days"]) == ("research", 1, 7)


def test_the_default_retention_is_30_days(kept):
    assert transcripts.purge_expired("system:beat", now=datetime.now(timezone.utc) + timedelta(days=29)) == 0
    assert transcripts.purge_expired("system:beat", now=datetime.now(timezone.utc) + timedelta(days=31)) == 1


def test_shredding_the_team_key_makes_its_transcripts_unreadable(kept, reader):
    assert transcripts.shred("research", actor="admin:alice") == 1
    with pytest.raises(transcripts.Shredded):
        transcripts.read(Transcript.objects.get(), reader)
    assert AuditEvent.objects.get(action="transcript.shredded").details["transcripts_unreadable"] == 1
    assert AuditEvent.objects.get(action="transcript.read").outcome == "shredded"
    # New transcripts get a new key; the old ciphertext stays unreadable.
    fresh = transcripts.store("research", "tiny", [{"role": "user", "content": "hi"}], "hello")
    assert transcripts.read(fresh, reader)["completion"] == "hello"
    with pytest.raises(transcripts.Shredded):
        transcripts.read(Transcript.objects.get(pk=kept.pk), reader)
