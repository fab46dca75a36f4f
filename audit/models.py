"""The audit ledger's one table: append-only, hash-chained events."""
from django.db import models

from audit.canonical import canonical_time

GENESIS_HASH = "0" * 64


class AppendOnlyError(Exception):
    """Raised when code tries to change or remove a ledger event."""


class AuditEventQuerySet(models.QuerySet):
    """Refuse bulk changes: the ledger only grows, one append() at a time."""

    def update(self, **kwargs):
        """Refuse to update events."""
        raise AppendOnlyError("audit events cannot be updated")

    def delete(self):
        """Refuse to delete events."""
        raise AppendOnlyError("audit events cannot be deleted")

    def bulk_create(self, objs, *args, **kwargs):
        """Refuse inserts that bypass audit.ledger.append and its chaining."""
        raise AppendOnlyError("audit events are added with audit.ledger.append()")

    def bulk_update(self, objs, fields, batch_size=None):
        """Refuse to update events."""
        raise AppendOnlyError("audit events cannot be updated")


class AuditEvent(models.Model):
    """One event of the ledger; `body` holds the exact bytes that `hash` covers."""

    # seq is the primary key: the chain position is the event's identity, and it
    # saves the second index (and SQLite's AUTOINCREMENT bookkeeping) on every append.
    seq = models.PositiveBigIntegerField(primary_key=True)
    created_at = models.DateTimeField()
    # Room for "team:" + a 100-character slug and "admin:" + a 150-character username.
    actor = models.CharField(max_length=200)
    action = models.CharField(max_length=100)
    # Unbounded: targets include request paths a stranger chooses, and a long
    # one must never stop an event (auth.failed, say) from being recorded.
    target = models.TextField(blank=True)
    outcome = models.CharField(max_length=32)
    details = models.JSONField(default=dict)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64)
    # The hash is taken over these stored bytes, never over a re-serialisation of the columns.
    body = models.BinaryField()

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["seq"]
        constraints = [
            models.CheckConstraint(condition=models.Q(seq__gte=1), name="audit_event_seq_from_1"),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} by {self.actor}"

    def body_fields(self) -> dict:
        """Return what the canonical body of this event must contain, built from its columns."""
        return {
            "seq": self.seq,
            "time": canonical_time(self.created_at),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "outcome": self.outcome,
            "details": self.details,
            "prev_hash": self.prev_hash,
        }

    def save(self, *args, **kwargs):
        """Insert a new event; refuse to overwrite one that is already stored."""
        if not self._state.adding or kwargs.get("force_update") or kwargs.get("update_fields"):
            raise AppendOnlyError(f"audit event {self.seq} is already stored and cannot change")
        kwargs["force_insert"] = True
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        """Refuse to delete the event."""
        raise AppendOnlyError(f"audit event {self.seq} cannot be deleted")


class SigningKey(models.Model):
    """An Ed25519 key that signs checkpoints; the newest row is the active one."""

    created_at = models.DateTimeField()
    # Fixed at creation and kept across rotations: checkpoints name it on their first line.
    origin = models.CharField(max_length=200)
    fingerprint = models.CharField(max_length=64, unique=True)
    public_key = models.BinaryField()
    # AES-256-GCM under a key derived from the KEK: nonce (12 bytes) + ciphertext + tag.
    private_key_encrypted = models.BinaryField()

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.fingerprint[:16]}… ({self.origin})"


class CheckpointQuerySet(AuditEventQuerySet):
    """Checkpoints only grow, like the events they sign."""

    def bulk_create(self, objs, *args, **kwargs):
        """Refuse inserts that bypass audit.checkpoints.make_checkpoint."""
        raise AppendOnlyError("checkpoints are added with audit.checkpoints.make_checkpoint()")


class Checkpoint(models.Model):
    """A signed tree head over the first tree_size events, in C2SP signed-note form."""

    KINDS = ["heartbeat", "export", "manual", "rotation"]

    created_at = models.DateTimeField()
    kind = models.CharField(max_length=16)
    tree_size = models.PositiveBigIntegerField()
    root_hash = models.CharField(max_length=64)
    # hash of event tree_size: a later checkpoint extends this one only if that event is unchanged.
    head_hash = models.CharField(max_length=64)
    # The subtree roots of the tree at tree_size (hex), so the next checkpoint hashes only new
    # events; they are unsigned, so make_checkpoint folds them and compares with root_hash first.
    frontier = models.JSONField(default=list)
    key_fingerprint = models.CharField(max_length=64)
    note = models.TextField()

    objects = CheckpointQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["created_at"], name="audit_checkpoint_time")]

    def __str__(self) -> str:
        return f"checkpoint of {self.tree_size} events at {self.created_at:%Y-%m-%d %H:%M:%S}"

    def save(self, *args, **kwargs):
        """Insert a new checkpoint; refuse to overwrite one."""
        if not self._state.adding or kwargs.get("force_update") or kwargs.get("update_fields"):
            raise AppendOnlyError("checkpoints cannot change")
        kwargs["force_insert"] = True
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        """Refuse to delete the checkpoint."""
        raise AppendOnlyError("checkpoints cannot be deleted")


class NetworkAttestationManager(models.Manager):
    """Only the network.attestation events of the ledger."""

    def get_queryset(self):
        """Return the attestation events, newest first."""
        return super().get_queryset().filter(action="network.attestation").order_by("-seq")


class NetworkAttestation(AuditEvent):
    """The ledger's network.attestation events, for their own console page."""

    objects = NetworkAttestationManager()

    class Meta:
        proxy = True
        ordering = ["-seq"]


class TranscriptPolicy(models.Model):
    """Whether a team's chat transcripts are kept, and for how long."""

    # A team's name: audit imports nothing from the registry app, so teams are keyed by name.
    team = models.CharField(max_length=100, unique=True)
    keep_transcripts = models.BooleanField(default=False)
    retention_days = models.PositiveIntegerField(default=30)

    class Meta:
        verbose_name_plural = "transcript policies"

    def __str__(self) -> str:
        state = f"kept {self.retention_days} days" if self.keep_transcripts else "not kept"
        return f"{self.team}: {state}"


class TeamDataKey(models.Model):
    """A team's AES-256 data key, wrapped by the box key; deleting it shreds the team's transcripts."""

    team = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField()
    wrapped_key = models.BinaryField()  # RFC 3394 AES key wrap under the box's transcript key

    def __str__(self) -> str:
        return f"data key #{self.pk} of {self.team}"


class Transcript(models.Model):
    """One chat exchange, encrypted with its team's data key."""

    team = models.CharField(max_length=100, db_index=True)
    # Not a foreign key: the key row is deleted to shred, and the ciphertext must stay behind
    # (until purged) as evidence that it is unreadable, not silently vanish with it.
    data_key_id = models.BigIntegerField()
    created_at = models.DateTimeField(db_index=True)
    model = models.CharField(max_length=200, blank=True)
    nonce = models.BinaryField()
    ciphertext = models.BinaryField()

    class Meta:
        ordering = ["-created_at"]
        permissions = [("read_transcript", "Can read decrypted chat transcripts")]

    def __str__(self) -> str:
        return f"transcript #{self.pk} of {self.team}"


class InFlightRequest(models.Model):
    """A chat request admitted and not yet settled: the write-ahead record that a web crash leaves behind.

    Written in the same transaction that admits a burst, deleted when the burst's requests are settled; rows
    whose web process is gone become `chat.interrupted` events (audit.inflight.recover_interrupted).
    """

    request_id = models.CharField(max_length=64, unique=True)  # the chatcmpl-… id the client sees
    # Which process owns the row: a pid is reused, so its start time (psutil's create_time) tells them apart.
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    process_started = models.FloatField()
    # Teams and variants by name: audit imports nothing from the registry app.
    team = models.CharField(max_length=100)
    key_prefix = models.CharField(max_length=32)
    model = models.CharField(max_length=200)
    admitted_at = models.DateTimeField()

    class Meta:
        # Recovery at web start reads the rows of its own host.
        indexes = [models.Index(fields=["host"], name="audit_inflight_host")]

    def __str__(self) -> str:
        return f"{self.request_id} of {self.team} on {self.model} (pid {self.pid} on {self.host})"


class StoredResponse(models.Model):
    """One /v1/responses answer kept for `previous_response_id`, encrypted like a transcript with its team's key.

    Kept only for a team whose transcript policy keeps transcripts, for as long as that policy's retention; a
    shredded data key makes it unreadable, as it does the team's transcripts.
    """

    response_id = models.CharField(max_length=64, unique=True)  # the resp_… id the client sees
    team = models.CharField(max_length=100, db_index=True)
    data_key_id = models.BigIntegerField()  # not a foreign key, for the reason Transcript gives
    created_at = models.DateTimeField(db_index=True)
    model = models.CharField(max_length=200, blank=True)
    nonce = models.BinaryField()
    ciphertext = models.BinaryField()

    def __str__(self) -> str:
        return f"{self.response_id} of {self.team}"
