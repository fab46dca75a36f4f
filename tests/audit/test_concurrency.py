"""Appenders racing from threads and from processes must still build one chain."""
import multiprocessing
import threading

from django.db import connection

from audit.ledger import append, verify
from audit.models import AuditEvent
from tests.audit.ledger_worker import append_many

WORKERS = 4
APPENDS_EACH = 25


def assert_one_contiguous_chain(expected_events: int) -> None:
    """Check that seq runs 1..expected_events without holes and the chain verifies."""
    seqs = list(AuditEvent.objects.order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, expected_events + 1))
    result = verify()
    assert result.ok, result.reason
    assert result.events_checked == expected_events


def test_threads_appending_at_once_build_one_chain(committed_ledger):
    start = threading.Barrier(WORKERS)
    errors = []

    def work(number: int) -> None:
        try:
            start.wait()
            for index in range(APPENDS_EACH):
                append("test.concurrent", actor=f"test:thread{number}", details={"index": index})
        except Exception as exc:  # collected and asserted on in the main thread
            errors.append(exc)
        finally:
            # Each thread has its own connection; leaving it open would hold the
            # test database when it is flushed and dropped.
            connection.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert_one_contiguous_chain(WORKERS * APPENDS_EACH)


def test_processes_appending_at_once_build_one_chain(committed_ledger):
    # spawn, not fork: a forked child would share the parent's open database connection.
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(WORKERS)
    database_name = str(connection.settings_dict["NAME"])
    processes = [
        context.Process(target=append_many, args=(database_name, APPENDS_EACH, f"test:proc{n}", start))
        for n in range(WORKERS)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * WORKERS
    assert_one_contiguous_chain(WORKERS * APPENDS_EACH)
    actors = set(AuditEvent.objects.values_list("actor", flat=True))
    assert actors == {f"test:proc{n}" for n in range(WORKERS)}
