import pytest
from django.core.management.color import no_style
from django.db import IntegrityError, connection, transaction

from audit.ledger import append
from audit.models import AppendOnlyError, AuditEvent
from tests.audit.tamper import TABLE, run_sql

pytestmark = pytest.mark.django_db


@pytest.fixture
def event():
    """Append one event and return it as stored."""
    append("auth.failed", actor="key:ab12cd", outcome="denied")
    return AuditEvent.objects.get(seq=1)


def test_saving_a_stored_event_is_refused(event):
    event.outcome = "ok"
    with pytest.raises(AppendOnlyError, match="event 1 is already stored"):
        event.save()
    assert AuditEvent.objects.get(seq=1).outcome == "denied"


def test_deleting_an_event_is_refused(event):
    with pytest.raises(AppendOnlyError, match="cannot be deleted"):
        event.delete()


def test_queryset_update_is_refused(event):
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.filter(seq=1).update(outcome="ok")


def test_queryset_delete_is_refused(event):
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.all().delete()


def test_bulk_create_is_refused():
    with pytest.raises(AppendOnlyError, match="append"):
        AuditEvent.objects.bulk_create([AuditEvent(seq=1)])


def test_a_second_event_with_a_stored_seq_is_refused(event):
    copy = AuditEvent(**{f.attname: getattr(event, f.attname) for f in AuditEvent._meta.fields})
    with pytest.raises(IntegrityError), transaction.atomic():
        copy.save()


def test_the_database_refuses_a_raw_update(event):
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        run_sql(f"UPDATE {TABLE} SET outcome = 'ok' WHERE seq = 1")
    assert AuditEvent.objects.get(seq=1).outcome == "denied"


def test_the_database_refuses_a_raw_delete(event):
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        run_sql(f"DELETE FROM {TABLE}")
    assert AuditEvent.objects.count() == 1


def flush_statements() -> list[str]:
    """Return the SQL Django's flush empties the ledger with (PostgreSQL TRUNCATE, SQLite DELETE)."""
    return connection.ops.sql_flush(no_style(), [AuditEvent._meta.db_table])


def test_the_database_refuses_to_flush_a_nonempty_ledger(event):
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        for statement in flush_statements():
            run_sql(statement)
    assert AuditEvent.objects.count() == 1


def test_the_database_lets_an_empty_ledger_be_flushed():
    # Django's flush after every transactional test, in any app, empties all tables.
    with transaction.atomic():
        for statement in flush_statements():
            run_sql(statement)
