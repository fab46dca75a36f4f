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
