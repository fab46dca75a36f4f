"""The chat API's bookkeeping off the event loop: admission, ledger events, usage and transcripts, in bursts.

Each goes through a thread that keeps its database connection; whatever queued up while that thread was busy
is handled in one call (Batched), so a burst of N requests costs about one read and one insert, not N.
"""
import asyncio
import logging
import queue
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from django.db import DatabaseError, connection, transaction

from audit import inflight, ledger, transcripts

from .gatekeeper import Admission, Caller, UsageReport, gatekeeper

log = logging.getLogger(__name__)
# Ledger writes go through one thread, so a cancelled stream can still record
# its event without blocking the event loop, and events keep their order.
_ledger_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")
# Authentication and admission run on a thread of their own too, rather than on the thread Django makes for
# each request, so its database connection is opened once, not per request. One admission takes a few ms.
_gate = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gatekeeper")
DATABASE_THREADS = (_ledger_writer, _gate)


async def on_gate(fn, *args):
    """Run a gatekeeper call (database reads, the quota charge) on the gatekeeper thread and await it."""
    return await asyncio.wrap_future(_gate.submit(_with_kept_connection, fn, *args))


class Batched:
    """Items queued from any thread and handed to `call_many` in one call on an executor's one thread.

    Whatever queued up while that thread was busy goes in the next call: in a burst, N requests cost one
    read of their key and one insert of N usage rows, instead of N of each in a row. `call_many` returns one
    result per item (an exception for an item that failed alone), or None; an item whose waiter gave up before
    the call is left out.
    """

    def __init__(self, executor: ThreadPoolExecutor, call_many) -> None:
        self._executor = executor
        self._call_many = call_many
        self._waiting: queue.SimpleQueue = queue.SimpleQueue()

    def queued(self) -> int:
        """Return how many items wait for the next call."""
        return self._waiting.qsize()

    def submit(self, item) -> Future:
        answer: Future = Future()
        self._waiting.put((item, answer))
        self._executor.submit(self._run_waiting)
        return answer

    def _run_waiting(self) -> None:
        waiting = []
        while True:
            try:
                item, answer = self._waiting.get_nowait()
            except queue.Empty:
                break
            if answer.set_running_or_notify_cancel():
                waiting.append((item, answer))
        if not waiting:
            return  # an earlier call took them
        try:
            results = _with_kept_connection(self._call_many, [item for item, _ in waiting])
        except Exception as exc:
            log.exception("%s failed for %d items", self._call_many.__name__, len(waiting))
            for _, answer in waiting:
                answer.set_exception(exc)
            return
        for (_, answer), result in zip(waiting, results or [None] * len(waiting)):
            if isinstance(result, Exception):  # that item alone failed
                answer.set_exception(result)
            else:
                answer.set_result(result)


def _authenticate_and_admit(requests: list[tuple[str, str, str]]) -> list:
    """Answer a burst of (token, model, request id) and write the in-flight record of each admitted one, in one
    transaction: a request the box admitted is one a crash of this process leaves a trace of."""
    with transaction.atomic():
        answers = gatekeeper().authenticate_and_admit([(token, model) for token, model, _ in requests])
        inflight.admit_many([(request_id, caller.team, caller.key_prefix, model)
                             for (_, model, request_id), (caller, admission) in zip(requests, answers)
                             if admission is not None and admission.allowed])
    return answers


def _settle_many(reports: list[tuple]) -> None:
    gatekeeper().settle_many([(caller, admission, report) for caller, admission, report, _ in reports])
    inflight.settle_many([request_id for *_, request_id in reports])


def _append_events(events: list[dict]) -> list:
    """Append events in one transaction; when one is refused (a malformed field), each alone, so only it fails."""
    try:
        return ledger.append_many(events)
    except DatabaseError:
        raise  # nothing was written: the kept-connection wrapper reconnects and retries the whole burst
    except Exception:
        if len(events) == 1:
            raise
    return [_append_alone(event) for event in events]


def _append_alone(event: dict):
    try:
        return ledger.append(**event)
    except Exception as exc:
        return exc


# Admission on the gatekeeper thread (a request whose client left while waiting is neither checked nor counted);
# ledger events, usage and transcripts on the writer thread, events in the order they were recorded.
_admissions = Batched(_gate, _authenticate_and_admit)
_events = Batched(_ledger_writer, _append_events)
_settlements = Batched(_ledger_writer, _settle_many)
_transcripts = Batched(_ledger_writer, transcripts.store_many)


async def admit_on_gate(token: str, model: str, request_id: str = "") -> tuple[Caller | None, Admission | None]:
    """Authenticate a chat request and admit it to model, together with whatever else is waiting."""
    return await asyncio.wrap_future(_admissions.submit((token, model, request_id or new_request_id())))


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _with_kept_connection(fn, *args, **kwargs):
    # These threads keep one connection for their life: opening one per job (what close_old_connections does with
    # CONN_MAX_AGE=0) cost more than the queries themselves. A connection that failed is replaced.
    if connection.errors_occurred:
        connection.close_if_unusable_or_obsolete()
    try:
        return fn(*args, **kwargs)
    except DatabaseError:
        if _connection_works():
            raise
        # The kept connection died under us (a database restart): nothing was written; once more, on a new one.
        connection.close()
        return fn(*args, **kwargs)


def _connection_works() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except DatabaseError:
        return False


def recover_interrupted_soon() -> Future:
    """Record, on the writer thread, the requests that a dead web process of this host left in flight."""
    return _ledger_writer.submit(_with_kept_connection, inflight.recover_interrupted)


async def record(**event) -> None:
    """Append a ledger event from async code without blocking the event loop."""
    await asyncio.wrap_future(_events.submit(event))


def record_soon(**event) -> None:
    """Queue a ledger event without waiting (for paths that are being cancelled)."""
    _events.submit(event)


def settle_soon(caller: Caller, admission: Admission, report: UsageReport, request_id: str = "") -> None:
    """Queue the usage report of an admitted request on the writer thread, settled with whatever else ended."""
    _settlements.submit((caller, admission, report, request_id))


@dataclass
class InFlight:
    """An admitted request until it is settled: its usage is reported once, whichever path ends it."""

    caller: Caller
    admission: Admission
    model: str
    request_id: str
    started: float = field(default_factory=time.monotonic)
    settled: bool = False
    served_by: str = ""  # the node whose engine ran it, when that is another node than the one that took it

    def noted(self, details: dict) -> dict:
        """Return a ledger event's details with where the request ran, when another node's engine ran it."""
        return {**details, "served_by": self.served_by} if self.served_by else details

    def settle(self, outcome: str, prompt_tokens: int = 0, completion_tokens: int = 0,
               ttft_ms: int | None = None) -> None:
        """Report the request's outcome and usage, unless it was reported already."""
        if self.settled:
            return
        self.settled = True
        settle_soon(self.caller, self.admission, UsageReport(
            self.model, prompt_tokens, completion_tokens, _ms_since(self.started), ttft_ms, outcome), self.request_id)


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
