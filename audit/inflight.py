"""Write-ahead records of chat requests in flight, so a web crash still leaves a ledger event for each.

The chat API inserts a row per admitted request in the transaction that admits its burst and deletes the rows
of a settled burst in one statement. At start, a web process turns the rows of this host whose owning
process is gone into `chat.interrupted` events. Rows of a live process (another web process on this host)
and of other hosts are left alone: only their owner, or a restart on their host, can tell they were cut.
"""
import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

import psutil
from django.db import transaction

from . import ledger
from .models import InFlightRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Process:
    """Who owns a row: a host name, a pid and the pid's start time (a pid alone is reused)."""

    host: str
    pid: int
    started: float

    def alive(self) -> bool:
        """Return whether this process still runs (on this host)."""
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) < 1e-3
        except psutil.Error:  # gone, or a zombie we may not inspect
            return False


@lru_cache(maxsize=1)
def this_process() -> Process:
    """Return this process as the owner of the rows it writes."""
    return Process(socket.gethostname(), os.getpid(), psutil.Process().create_time())


def admit_many(requests: list[tuple[str, str, str, str]]) -> None:
    """Record admitted requests, given as (request id, team, key prefix, model), in one insert."""
    if not requests:
        return
    me, now = this_process(), datetime.now(timezone.utc)
    InFlightRequest.objects.bulk_create([
        InFlightRequest(request_id=request_id, host=me.host, pid=me.pid, process_started=me.started, team=team,
                        key_prefix=key_prefix, model=model, admitted_at=now)
        for request_id, team, key_prefix, model in requests])


def settle_many(request_ids: list[str]) -> None:
    """Forget requests that were settled (answered, failed, cancelled or refused), in one delete."""
    if request_ids:
        InFlightRequest.objects.filter(request_id__in=request_ids).delete()


def recover_interrupted() -> int:
    """Turn the rows of dead processes of this host into chat.interrupted events; return how many.

    Each row is deleted and its event appended in one transaction, and only a row this call deleted gets an
    event, so two web processes starting together never record a request twice.
    """
    me = this_process()
    owners: dict[tuple[int, float], bool] = {}
    dead = []
    for row in InFlightRequest.objects.filter(host=me.host).order_by("admitted_at", "pk"):
        owner = (row.pid, row.process_started)
        if owner not in owners:
            owners[owner] = Process(me.host, row.pid, row.process_started).alive()
        if not owners[owner]:
            dead.append(row)
    recorded = 0
    for row in dead:
        with transaction.atomic():
            if InFlightRequest.objects.filter(pk=row.pk).delete()[0] != 1:
                continue  # another process took it
            ledger.append(**interrupted_event(row))
            recorded += 1
    if recorded:
        log.warning("recorded %d chat requests cut by the end of an earlier web process", recorded)
    return recorded


def interrupted_event(row: InFlightRequest) -> dict:
    """Return the ledger event of a request whose web process ended before it was settled."""
    return dict(action="chat.interrupted", actor=f"team:{row.team}", target=row.model, outcome="interrupted",
                details={"key": row.key_prefix, "request_id": row.request_id, "model": row.model,
                         "admitted_at": row.admitted_at.isoformat(), "host": row.host, "pid": row.pid,
                         "reason": "the web process serving it ended before the request was settled"})
