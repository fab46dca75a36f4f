"""The chat API's writer thread: one kept database connection, replaced when it dies, no event lost."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from audit.models import AuditEvent
from appliance.api import settlement
from tests.audit.tamper import wipe_ledger


@pytest.fixture
def ledger_db(transactional_db):
    """A committed database the writer thread sees; the ledger is wiped after, since its triggers refuse a flush."""
    yield
    wipe_ledger()


def _writer_connection():
    return settlement._ledger_writer.submit(lambda: connection.connection).result()


def on_writer(fn, *args, **kwargs):
    """Run fn on the writer thread as its batched jobs run: with the kept connection."""
    return settlement._ledger_writer.submit(settlement._with_kept_connection, fn, *args, **kwargs)


def test_the_writer_keeps_its_connection_between_jobs(ledger_db) -> None:
    on_writer(AuditEvent.objects.count).result()  # opens the writer's connection
    first = _writer_connection()
    settlement.record_soon(action="test.writer", actor="tests", target="kept", outcome="ok")
    on_writer(AuditEvent.objects.count).result()
    assert first is not None
    assert _writer_connection() is first


def test_an_event_queued_after_the_connection_died_is_still_written(ledger_db) -> None:
    on_writer(AuditEvent.objects.count).result()
    # Close the DB-API connection under Django's feet, as a database restart would.
    settlement._ledger_writer.submit(lambda: connection.connection.close()).result()
    settlement._events.submit(dict(action="test.writer", actor="tests", target="after-restart", outcome="ok")).result()
    assert AuditEvent.objects.filter(target="after-restart").count() == 1
    assert _writer_connection() is not None


def test_an_error_on_a_working_connection_is_not_retried(ledger_db) -> None:
    calls = []

    def failing() -> None:
        calls.append(1)
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table")

    future = on_writer(failing)
    assert isinstance(future.exception(), Exception)
    assert len(calls) == 1


def test_a_malformed_event_in_a_burst_fails_alone(ledger_db) -> None:
    release = threading.Event()
    settlement._ledger_writer.submit(release.wait, 30)  # busy, so that the three events go in one call
    good = dict(action="test.writer", actor="tests", target="burst", outcome="ok")
    futures = [settlement._events.submit(good), settlement._events.submit({**good, "details": {"x": 0.5}}),
               settlement._events.submit(good)]
    assert settlement._events.queued() == 3
    release.set()
    assert isinstance(futures[1].exception(), ValueError)  # floats are refused, naming the key
    assert all(f.exception() is None for f in (futures[0], futures[2]))
    assert AuditEvent.objects.filter(target="burst").count() == 2
    assert settlement.ledger.verify().ok
