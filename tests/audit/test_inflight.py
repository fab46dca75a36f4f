"""Write-ahead records of chat requests in flight: written at admission, gone at settlement, and turned into
chat.interrupted events when their web process is gone."""
import subprocess
import sys
from datetime import datetime, timezone

import psutil

from audit import inflight, ledger
from audit.models import AuditEvent, InFlightRequest


def dead_process() -> inflight.Process:
    """Return a process of this host that ran and has ended (its pid is free or someone else's now)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(child.pid).create_time()
    child.wait()
    return inflight.Process(inflight.this_process().host, child.pid, started)


def row(request_id: str, owner: inflight.Process) -> InFlightRequest:
    return InFlightRequest.objects.create(
        request_id=request_id, host=owner.host, pid=owner.pid, process_started=owner.started, team="research",
        key_prefix="sk-box-abc123", model="general", admitted_at=datetime.now(timezone.utc))


def test_admitted_requests_are_recorded_and_settled_ones_forgotten(committed_ledger):
    inflight.admit_many([("chatcmpl-1", "research", "sk-box-abc123", "general"),
                         ("chatcmpl-2", "sales", "sk-box-def456", "general")])
    me = inflight.this_process()
    assert {(r.request_id, r.pid, r.host) for r in InFlightRequest.objects.all()} == {
        ("chatcmpl-1", me.pid, me.host), ("chatcmpl-2", me.pid, me.host)}
    inflight.settle_many(["chatcmpl-1"])
    assert list(InFlightRequest.objects.values_list("request_id", flat=True)) == ["chatcmpl-2"]


def test_requests_of_a_dead_process_become_interrupted_events_once(committed_ledger):
    dead = dead_process()
    row("chatcmpl-dead", dead)
    row("chatcmpl-live", inflight.this_process())  # this very process: still serving it
    row("chatcmpl-elsewhere", inflight.Process("another-host", dead.pid, dead.started))  # not ours to judge
    assert inflight.recover_interrupted() == 1
    event = AuditEvent.objects.get(action="chat.interrupted")
    assert (event.actor, event.target, event.outcome) == ("team:research", "general", "interrupted")
    assert event.details["request_id"] == "chatcmpl-dead" and event.details["pid"] == dead.pid
    assert sorted(InFlightRequest.objects.values_list("request_id", flat=True)) == [
        "chatcmpl-elsewhere", "chatcmpl-live"]
    assert inflight.recover_interrupted() == 0  # a second start records nothing twice
    assert ledger.verify().ok


def test_a_reused_pid_is_told_apart_by_its_start_time(committed_ledger):
    me = inflight.this_process()
    row("chatcmpl-old", inflight.Process(me.host, me.pid, me.started - 3600))  # our pid, an hour earlier
    assert inflight.recover_interrupted() == 1
    assert not InFlightRequest.objects.exists()
