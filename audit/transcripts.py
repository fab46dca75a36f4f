"""Optional chat transcripts: encrypted per team, read only with permission, purged and shredded on record.

Each team has its own AES-256 data key, wrapped (RFC 3394) by the box's transcript key, which
HKDF derives from the KEK. Deleting a team's data key makes every transcript encrypted under it
unreadable at once (crypto-shredding), however many copies of the database exist.
"""
import json
import secrets
from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap
from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import transaction

from audit import ledger
from audit.canonical import json_bytes
from audit.kek import derived_key
from audit.models import TeamDataKey, Transcript, TranscriptPolicy

READ_PERMISSION = "audit.read_transcript"


class Shredded(Exception):
    """Raised when a transcript's data key has been deleted."""


def set_policy(team: str, *, keep: bool, retention_days: int | None = None, actor: str) -> TranscriptPolicy:
    """Set whether team's transcripts are kept and for how long, recording the change."""
    days = settings.AUDIT_TRANSCRIPT_RETENTION_DAYS if retention_days is None else retention_days
    with transaction.atomic():
        policy, _ = TranscriptPolicy.objects.update_or_create(
            team=team, defaults={"keep_transcripts": keep, "retention_days": days})
        ledger.append("transcript.policy", actor=actor, target=team,
                      details={"keep": keep, "retention_days": days})
    return policy


def store(team: str, model: str, messages: list, completion: str) -> Transcript | None:
    """Encrypt and keep one exchange if team keeps transcripts; return it, or None when not kept."""
    return store_many([(team, model, messages, completion)])[0]


def store_many(exchanges: list[tuple[str, str, list, str]]) -> list[Transcript | None]:
    """Keep each (team, model, messages, completion) whose team keeps transcripts; one policy read for all,
    and each keeping team's data key read (and unwrapped) once."""
    teams = {team for team, *_ in exchanges}
    keeping = TranscriptPolicy.objects.filter(team__in=teams, keep_transcripts=True).values_list("team", flat=True)
    data_keys = {team: _data_key(team) for team in keeping}
    return [_encrypt_and_store(data_keys[exchange[0]], *exchange) if exchange[0] in data_keys else None
            for exchange in exchanges]


def _encrypt_and_store(data_key: tuple[TeamDataKey, bytes], team: str, model: str, messages: list,
                       completion: str) -> Transcript:
    key_row, key = data_key
    nonce = secrets.token_bytes(12)
    now = datetime.now(timezone.utc)
    plaintext = json_bytes({"messages": messages, "completion": completion})
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, _aad(team, key_row.pk))
    return Transcript.objects.create(team=team, data_key_id=key_row.pk, created_at=now, model=model,
                                     nonce=nonce, ciphertext=ciphertext)


def _aad(team: str, key_id: int) -> bytes:
    """Return the data bound to each ciphertext, so it cannot be moved to another team or key."""
    return f"{team}\n{key_id}".encode()


def _data_key(team: str) -> tuple[TeamDataKey, bytes]:
    """Return team's data key row and unwrapped key, creating them on first use."""
    row = TeamDataKey.objects.filter(team=team).first()
    if row is None:
        key = AESGCM.generate_key(bit_length=256)
        wrapped = aes_key_wrap(derived_key("transcripts"), key)
        with transaction.atomic():
            row, created = TeamDataKey.objects.get_or_create(
                team=team, defaults={"created_at": datetime.now(timezone.utc), "wrapped_key": wrapped})
        if created:
            return row, key
    return row, aes_key_unwrap(derived_key("transcripts"), bytes(row.wrapped_key))


def read(transcript: Transcript, user) -> dict:
    """Return the decrypted exchange for a user holding the read permission, recording the read."""
    actor = f"admin:{user.get_username()}" if user.is_authenticated else "anonymous"
    details = {"transcript": transcript.pk, "created_at": transcript.created_at.isoformat()}
    if not user.has_perm(READ_PERMISSION):
        ledger.append("transcript.read", actor=actor, target=transcript.team, outcome="denied", details=details)
        raise PermissionDenied("reading transcripts needs the audit.read_transcript permission")
    row = TeamDataKey.objects.filter(pk=transcript.data_key_id, team=transcript.team).first()
    if row is None:
        ledger.append("transcript.read", actor=actor, target=transcript.team, outcome="shredded", details=details)
        raise Shredded(f"the data key of transcript {transcript.pk} was shredded; it cannot be read")
    key = aes_key_unwrap(derived_key("transcripts"), bytes(row.wrapped_key))
    plaintext = AESGCM(key).decrypt(bytes(transcript.nonce), bytes(transcript.ciphertext),
                                    _aad(transcript.team, row.pk))
    ledger.append("transcript.read", actor=actor, target=transcript.team, details=details)
    return json.loads(plaintext)


def purge_expired(actor: str, now: datetime | None = None) -> int:
    """Delete transcripts older than their team's retention period; record one event per team."""
    return purge_past_retention(Transcript, "transcript.purged", actor, now)


def purge_past_retention(model, action: str, actor: str, now: datetime | None = None) -> int:
    """Delete a team-kept model's rows older than the team's transcript retention; one `action` event per team.

    Transcripts and the stored responses of /v1/responses share the team's retention period.
    """
    now = now or datetime.now(timezone.utc)
    retention = dict(TranscriptPolicy.objects.values_list("team", "retention_days"))
    total = 0
    for team in model.objects.values_list("team", flat=True).distinct():
        days = retention.get(team, settings.AUDIT_TRANSCRIPT_RETENTION_DAYS)
        before = now - timedelta(days=days)
        with transaction.atomic():
            count, _ = model.objects.filter(team=team, created_at__lt=before).delete()
            if count:
                ledger.append(action, actor=actor, target=team,
                              details={"count": count, "older_than": before.isoformat(), "retention_days": days})
        total += count
    return total


def shred(team: str, actor: str) -> int:
    """Delete team's data key, making its transcripts unreadable; return how many were affected."""
    with transaction.atomic():
        rows = list(TeamDataKey.objects.filter(team=team).values_list("pk", flat=True))
        affected = Transcript.objects.filter(team=team, data_key_id__in=rows).count()
        TeamDataKey.objects.filter(pk__in=rows).delete()
        ledger.append("transcript.shredded", actor=actor, target=team,
                      details={"data_keys": rows, "transcripts_unreadable": affected})
    return affected
