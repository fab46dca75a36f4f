"""Edit the ledger behind the application's back, as someone with database access could."""
import hashlib
from contextlib import contextmanager
from datetime import datetime

from django.db import connection

from audit.canonical import canonical_bytes
from audit.models import AuditEvent, Checkpoint

TABLE = connection.ops.quote_name(AuditEvent._meta.db_table)


def run_sql(sql: str, params: list | tuple = ()) -> None:
    """Execute one raw SQL statement on the default connection."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


@contextmanager
def triggers_disabled(model=AuditEvent):
    """Lift the append-only triggers of model's table for the block and put them back afterwards."""
    table = connection.ops.quote_name(model._meta.db_table)
    if connection.vendor == "postgresql":
        # Allowed to the table's owner, which the test user is.
        run_sql(f"ALTER TABLE {table} DISABLE TRIGGER USER")
        try:
            yield
        finally:
            run_sql(f"ALTER TABLE {table} ENABLE TRIGGER USER")
        return
    # SQLite cannot disable a trigger; drop it and recreate it from its stored SQL.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = %s",
            [model._meta.db_table],
        )
        triggers = cursor.fetchall()
    for name, _ in triggers:
        run_sql(f"DROP TRIGGER {name}")
    try:
        yield
    finally:
        for _, statement in triggers:
            run_sql(statement)


def edit(seq: int, **columns) -> None:
    """Overwrite columns of event seq in place, triggers lifted."""
    assignments, params = [], []
    for name, value in columns.items():
        field = AuditEvent._meta.get_field(name)
        assignments.append(f"{connection.ops.quote_name(field.column)} = %s")
        params.append(field.get_db_prep_save(value, connection))
    with triggers_disabled():
        run_sql(f"UPDATE {TABLE} SET {', '.join(assignments)} WHERE seq = %s", [*params, seq])


def delete(seq: int) -> None:
    """Remove event seq, triggers lifted."""
    with triggers_disabled():
        run_sql(f"DELETE FROM {TABLE} WHERE seq = %s", [seq])


def renumber_from(seq: int, shift: int) -> None:
    """Add shift to the seq of every event from seq on, triggers lifted."""
    # Two steps through a far-away range, because the primary key is checked row by row.
    far = 10**9
    with triggers_disabled():
        run_sql(f"UPDATE {TABLE} SET seq = seq + %s WHERE seq >= %s", [far, seq])
        run_sql(f"UPDATE {TABLE} SET seq = seq - %s WHERE seq >= %s", [far - shift, far])


def swap(first: int, second: int) -> None:
    """Exchange the positions of two events, triggers lifted."""
    parked = 10**9
    with triggers_disabled():
        run_sql(f"UPDATE {TABLE} SET seq = %s WHERE seq = %s", [parked, first])
        run_sql(f"UPDATE {TABLE} SET seq = %s WHERE seq = %s", [first, second])
        run_sql(f"UPDATE {TABLE} SET seq = %s WHERE seq = %s", [second, parked])


def forge(seq: int, prev_hash: str, created_at: datetime, **columns) -> AuditEvent:
    """Return an unsaved, self-consistent event with the given position and link."""
    event = AuditEvent(seq=seq, prev_hash=prev_hash, created_at=created_at, **columns)
    event.body = canonical_bytes(event.body_fields())
    event.hash = hashlib.sha256(event.body).hexdigest()
    return event


def insert(event: AuditEvent) -> None:
    """Write event straight into the table, bypassing the ORM's rules."""
    fields = AuditEvent._meta.concrete_fields
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    params = [f.get_db_prep_save(getattr(event, f.attname), connection) for f in fields]
    run_sql(f"INSERT INTO {TABLE} ({columns}) VALUES ({placeholders})", params)


def write_queued_events() -> None:
    """Wait until the chat API's ledger writer has written what finished requests queued.

    A stream records its event and settles its usage without awaiting either (the client must not wait for the
    ledger), so the test that read the stream can end before they are written.
    """
    from appliance.api import settlement

    while True:
        settlement._ledger_writer.submit(lambda: None).result()  # one thread, in order: all before it ran
        if not any(queue.queued() for queue in (settlement._events, settlement._settlements,
                                                settlement._transcripts)):
            return


def wipe_ledger() -> None:
    """Delete every event and checkpoint, so that Django's flush after a transactional test can run.

    Events still queued by the chat API are written first: one written after the wipe makes the flush fail.
    """
    write_queued_events()
    with triggers_disabled():
        run_sql(f"DELETE FROM {TABLE}")
    with triggers_disabled(Checkpoint):
        run_sql(f"DELETE FROM {CHECKPOINTS}")


CHECKPOINTS = connection.ops.quote_name(Checkpoint._meta.db_table)


def delete_checkpoints_from(checkpoint_id: int) -> None:
    """Remove the checkpoint with this id and every later one, triggers lifted."""
    with triggers_disabled(Checkpoint):
        run_sql(f"DELETE FROM {CHECKPOINTS} WHERE id >= %s", [checkpoint_id])


def edit_checkpoint(checkpoint_id: int, **columns) -> None:
    """Overwrite columns of one checkpoint in place, triggers lifted."""
    assignments = ", ".join(f"{connection.ops.quote_name(name)} = %s" for name in columns)
    with triggers_disabled(Checkpoint):
        run_sql(f"UPDATE {CHECKPOINTS} SET {assignments} WHERE id = %s", [*columns.values(), checkpoint_id])


def delete_checkpoint(checkpoint_id: int) -> None:
    """Remove one checkpoint, triggers lifted."""
    with triggers_disabled(Checkpoint):
        run_sql(f"DELETE FROM {CHECKPOINTS} WHERE id = %s", [checkpoint_id])
