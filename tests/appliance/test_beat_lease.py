"""One beat across the appliance: the beat lease is held by one contender at a time, passes on when it expires, and
only its holder's scheduler sends due jobs."""
import threading
import uuid
from datetime import timedelta
from queue import Empty

import pytest
from celery.beat import ScheduleEntry
from django.db import connections
from django.utils import timezone

from appliance import actions
from appliance.beat import BEAT_LEASE, LeaderScheduler
from appliance.celery import app
from appliance.models import Lease
from audit.models import AuditEvent
from tests.audit.tamper import wipe_ledger

TTL_S = 30


@pytest.fixture
def committed(transactional_db):
    """Let the contenders' transactions commit, each on its own connection; empty the ledger before the flush that
    its triggers would refuse."""
    yield
    wipe_ledger()


def expire(name: str = BEAT_LEASE) -> None:
    """Age the lease past its expiry, as a holder that stopped renewing leaves it."""
    Lease.objects.filter(name=name).update(expires_at=timezone.now() - timedelta(seconds=1))


@pytest.mark.django_db
def test_a_second_contender_waits_while_the_first_holds_and_renews():
    assert actions.do_take_lease("beat", holder="node-1:10", ttl_s=TTL_S)
    assert not actions.do_take_lease("beat", holder="node-2:20", ttl_s=TTL_S)
    assert actions.do_take_lease("beat", holder="node-1:10", ttl_s=TTL_S)  # a renewal
    assert not actions.do_take_lease("beat", holder="node-2:20", ttl_s=TTL_S)
    assert Lease.objects.get(name="beat").holder == "node-1:10"
    # Renewals write nothing: only the change of holder is an event.
    assert AuditEvent.objects.filter(action="lease.taken").count() == 1


@pytest.mark.django_db
def test_an_expired_lease_passes_to_the_next_contender_and_says_from_whom():
    actions.do_take_lease("beat", holder="node-1:10", ttl_s=TTL_S)
    expire()
    assert actions.do_take_lease("beat", holder="node-2:20", ttl_s=TTL_S)
    assert not actions.do_take_lease("beat", holder="node-1:10", ttl_s=TTL_S)
    event = AuditEvent.objects.filter(action="lease.taken").last()
    assert (event.target, event.details["holder"], event.details["previous_holder"]) == (
        "beat", "node-2:20", "node-1:10")


def test_of_contenders_racing_for_a_free_lease_exactly_one_wins(committed):
    results: dict[str, bool] = {}
    start = threading.Barrier(6)

    def contend(holder: str) -> None:
        start.wait()
        try:
            results[holder] = actions.do_take_lease("beat", holder=holder, ttl_s=TTL_S)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=contend, args=(f"node-{i}:1",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [holder for holder, won in results.items() if won]
    assert len(results) == 6 and len(winners) == 1
    assert Lease.objects.get(name="beat").holder == winners[0]


@pytest.mark.django_db
def test_a_released_lease_is_taken_at_once_and_only_its_holder_can_release_it():
    actions.do_take_lease("beat", holder="node-1:10", ttl_s=TTL_S)
    assert not actions.do_release_lease("beat", holder="node-2:20")
    assert not actions.do_take_lease("beat", holder="node-2:20", ttl_s=TTL_S)
    assert actions.do_release_lease("beat", holder="node-1:10")
    assert actions.do_take_lease("beat", holder="node-2:20", ttl_s=TTL_S)


def scheduler(tmp_path, holder: str) -> LeaderScheduler:
    made = LeaderScheduler(app=app, schedule_filename=str(tmp_path / f"schedule-{holder}"))
    made.holder = holder
    return made


def test_only_the_lease_holders_scheduler_sends_a_due_job(committed, tmp_path):
    first, second = scheduler(tmp_path, "node-1:10"), scheduler(tmp_path, "node-2:20")
    assert (first.ask_for_lease(), second.ask_for_lease()) == (True, False)
    queue = f"beat-lease-test-{uuid.uuid4().hex[:8]}"
    entry = ScheduleEntry(name="attest", task="audit.tasks.network_attestation", schedule=timedelta(seconds=1),
                          options={"queue": queue}, app=app)
    second.apply_entry(entry, producer=second.producer)
    first.apply_entry(entry, producer=first.producer)
    with app.connection_for_read() as connection:
        received = connection.SimpleQueue(queue)
        message = received.get(timeout=10)
        assert message.headers["task"] == "audit.tasks.network_attestation"
        message.ack()
        with pytest.raises(Empty):
            received.get(timeout=1)  # the second scheduler sent nothing
        received.close()
    first.close()  # a clean shutdown lets the lease go: a beat started now holds it at its first ask
    later = scheduler(tmp_path, "node-3:30")
    assert later.ask_for_lease()
    later.close()
    second.close()
