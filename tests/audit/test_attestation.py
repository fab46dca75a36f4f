"""Network attestations: a signed snapshot of the appliance's own processes' sockets, judged against the allowlist.

Every snapshot here is scoped to this test's processes, so what else runs on the machine cannot change the answer.
"""
import os
import socket
import subprocess
import sys
from contextlib import contextmanager

import psutil
import pytest
from django.conf import settings as django_settings
from django.urls import reverse

from audit import attestation, egress
from audit.models import NetworkAttestation

pytestmark = pytest.mark.django_db
LOOPBACK_ONLY = egress.parse_allowlist(["127.0.0.0/8", "::1/128"], "test")
NOT_127_0_0_1 = egress.parse_allowlist(["127.0.0.2/32"], "test")  # narrower than loopback: nothing leaves


@pytest.fixture(autouse=True)
def own_registry(settings, tmp_path):
    """Give each test its own APPLIANCE_HOME, so its registry holds only what the test registers."""
    settings.APPLIANCE_HOME = tmp_path


@contextmanager
def held_connection():
    """Yield (listening port, client socket) of a loopback connection this process holds open."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client, server.accept()[0]:
            yield port, client


@contextmanager
def child_holding_a_connection(port: int):
    """Yield a child process that holds a loopback connection to port open until the block ends."""
    code = ("import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5); "
            "print('held', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield child
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def me() -> attestation.Member:
    return attestation.Member(os.getpid(), "test", psutil.Process().create_time())


def test_an_attestation_lists_the_listening_ports_and_connections_outside_the_allowlist():
    with held_connection() as (port, client):
        local = "%s:%d" % client.getsockname()
        wide = attestation.snapshot(LOOPBACK_ONLY, members=[me()])
        narrow = attestation.snapshot(NOT_127_0_0_1, members=[me()])
    assert f"127.0.0.1:{port}" in wide["listening"]
    assert wide["established_outside_allowlist"] == 0 and wide["established_total"] >= 2  # both ends
    mine = [c for c in narrow["outside"] if c["remote"] == f"127.0.0.1:{port}"]
    assert mine == [{"remote": f"127.0.0.1:{port}", "local": local, "pid": os.getpid(),
                     "process": "test", "status": psutil.CONN_ESTABLISHED}]
    assert narrow["processes"][0]["pid"] == os.getpid()


def test_a_connection_held_by_a_child_of_an_appliance_process_is_caught():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with child_holding_a_connection(port) as child:
            tree = attestation.snapshot(NOT_127_0_0_1, members=[me()])
            only_the_child = attestation.snapshot(NOT_127_0_0_1, members=[
                attestation.Member(child.pid, "child", psutil.Process(child.pid).create_time())])
    assert child.pid in tree["processes"][0]["children"]
    assert {"pid": child.pid, "remote": f"127.0.0.1:{port}"}.items() <= next(
        c for c in tree["outside"] if c["pid"] == child.pid).items()
    # Scoped to the child alone, this process's listening socket is none of the attestation's business.
    assert f"127.0.0.1:{port}" not in only_the_child["listening"]
    assert [c["pid"] for c in only_the_child["outside"]] == [child.pid]


def test_processes_register_themselves_and_ended_ones_are_forgotten():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    attestation.register("worker", pid=child.pid)
    mine = attestation.register("web")
    # An entry whose pid now belongs to another process (a different start time) is stale too.
    (attestation.registry() / "1.json").write_text('{"pid": 1, "name": "beat", "create_time": 1.0}')
    assert {m.name for m in attestation.registered()} == {"worker", "web"}
    child.stdin.close()
    child.wait(timeout=30)
    assert attestation.registered() == [mine]
    assert sorted(p.name for p in attestation.registry().iterdir()) == [f"{os.getpid()}.json"]


def test_an_attestation_is_a_signed_ledger_event_shown_on_its_own_page():
    event = attestation.at_process_start("test")
    assert (event.action, event.actor, event.outcome) == ("network.attestation", "system:test", "ok")
    assert [p["pid"] for p in event.details["snapshot"]["processes"]] == [os.getpid()]
    assert attestation.signature_valid(event.details)
    assert NetworkAttestation.objects.get().pk == event.pk
    forged = dict(event.details, snapshot=dict(event.details["snapshot"], established_outside_allowlist=0, x=1))
    assert not attestation.signature_valid(forged)


def test_a_connection_outside_the_allowlist_makes_the_attestation_an_alert():
    attestation.register("test")
    with held_connection() as (port, _):
        event = attestation.attest(policy=NOT_127_0_0_1)
    assert event.outcome == "alert" and event.actor == "system:beat"
    assert any(c["remote"] == f"127.0.0.1:{port}" for c in event.details["snapshot"]["outside"])


def test_beat_attests_every_minute():
    assert django_settings.CELERY_BEAT_SCHEDULE["audit-network-attestation"]["schedule"] <= 60


def test_the_console_lists_the_processes_each_attestation_covered(admin_client):
    attestation.at_process_start("web")
    page = admin_client.get(reverse("admin:audit_networkattestation_changelist")).content.decode()
    assert f"web ({os.getpid()})" in page and "system:web" in page and "icon-yes" in page
