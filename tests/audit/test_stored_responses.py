"""Stored /v1/responses answers: kept only under a keeping policy, encrypted, bound to their id, purged, shredded."""
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.exceptions import InvalidTag

from audit import stored_responses, transcripts
from audit.models import AuditEvent, StoredResponse

pytestmark = pytest.mark.django_db
SECRET = {"input": [{"role": "user", "content": "the merger closes on Friday"}], "output": "noted"}


def test_nothing_is_stored_for_a_team_that_keeps_no_transcripts():
    assert stored_responses.store("sales", "resp_1", "tiny", SECRET) is None
    assert not StoredResponse.objects.exists()


def test_a_stored_response_reads_back_for_its_team_only():
    transcripts.set_policy("research", keep=True, actor="admin:alice")
    row = stored_responses.store("research", "resp_1", "tiny", SECRET)
    assert b"merger" not in bytes(row.ciphertext)
    assert stored_responses.load("research", "resp_1") == SECRET
    with pytest.raises(stored_responses.NotStored):
        stored_responses.load("sales", "resp_1")


def test_a_ciphertext_moved_to_another_id_does_not_decrypt():
    transcripts.set_policy("research", keep=True, actor="admin:alice")
    row = stored_responses.store("research", "resp_1", "tiny", SECRET)
    StoredResponse.objects.create(response_id="resp_2", team="research", data_key_id=row.data_key_id,
                                  created_at=row.created_at, model="tiny", nonce=row.nonce, ciphertext=row.ciphertext)
    with pytest.raises(InvalidTag):
        stored_responses.load("research", "resp_2")


def test_shredding_the_team_key_makes_stored_responses_unreadable():
    transcripts.set_policy("research", keep=True, actor="admin:alice")
    stored_responses.store("research", "resp_1", "tiny", SECRET)
    transcripts.shred("research", actor="admin:alice")
    with pytest.raises(stored_responses.NotStored):
        stored_responses.load("research", "resp_1")


def test_responses_past_the_retention_are_purged_and_recorded():
    transcripts.set_policy("research", keep=True, retention_days=7, actor="admin:alice")
    stored_responses.store("research", "resp_old", "tiny", SECRET)
    stored_responses.store("research", "resp_new", "tiny", SECRET)
    StoredResponse.objects.filter(response_id="resp_old").update(
        created_at=datetime.now(timezone.utc) - timedelta(days=8))
    assert stored_responses.purge_expired(actor="system:beat") == 1
    assert list(StoredResponse.objects.values_list("response_id", flat=True)) == ["resp_new"]
    assert AuditEvent.objects.filter(action="response.purged", target="research").count() == 1
