"""Responses kept for `previous_response_id`: encrypted with the team's transcript data key, kept as long as
its transcripts, and unreadable once that key is shredded.

A team whose policy keeps no transcripts has nothing stored, so the API refuses `store: true` and
`previous_response_id` for it rather than pretending to keep what it may not.
"""
import json
import secrets
from datetime import datetime, timezone

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

from audit.canonical import json_bytes
from audit.kek import derived_key
from audit.models import StoredResponse, TeamDataKey, TranscriptPolicy
from audit.transcripts import _data_key, purge_past_retention


class NotStored(LookupError):
    """No readable stored response of this id for this team (never stored, another team's, purged or shredded)."""


def team_keeps(team: str) -> bool:
    """Return whether team's policy keeps transcripts, and so stored responses."""
    return TranscriptPolicy.objects.filter(team=team, keep_transcripts=True).exists()


def _aad(team: str, key_id: int, response_id: str) -> bytes:
    """Bind the ciphertext to its team, key and id, so it cannot be moved to another team or answer."""
    return f"response\n{team}\n{key_id}\n{response_id}".encode()


def store(team: str, response_id: str, model: str, conversation: dict) -> StoredResponse | None:
    """Encrypt and keep one response's conversation (its input messages and its output) if team keeps
    transcripts; return the row, or None when the policy keeps nothing."""
    if not team_keeps(team):
        return None
    key_row, key = _data_key(team)
    nonce = secrets.token_bytes(12)
    ciphertext = AESGCM(key).encrypt(nonce, json_bytes(conversation), _aad(team, key_row.pk, response_id))
    return StoredResponse.objects.create(response_id=response_id, team=team, data_key_id=key_row.pk,
                                         created_at=datetime.now(timezone.utc), model=model, nonce=nonce,
                                         ciphertext=ciphertext)


def load(team: str, response_id: str) -> dict:
    """Return the stored conversation of team's response_id, or raise NotStored (another team's id included)."""
    row = StoredResponse.objects.filter(team=team, response_id=response_id).first()
    if row is None:
        raise NotStored(response_id)
    key_row = TeamDataKey.objects.filter(pk=row.data_key_id, team=team).first()
    if key_row is None:  # shredded: unreadable, as the team's transcripts are
        raise NotStored(response_id)
    key = aes_key_unwrap(derived_key("transcripts"), bytes(key_row.wrapped_key))
    plaintext = AESGCM(key).decrypt(bytes(row.nonce), bytes(row.ciphertext), _aad(team, key_row.pk, response_id))
    return json.loads(plaintext)


def purge_expired(actor: str, now: datetime | None = None) -> int:
    """Delete stored responses older than their team's transcript retention; record one event per team."""
    return purge_past_retention(StoredResponse, "response.purged", actor, now)
