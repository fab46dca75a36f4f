"""Three nodes on one machine act as one appliance: each registers, heartbeats and writes the one ledger."""
import json
import time

import pytest

from tests.livebox import ConsoleSession, start_nodes

pytestmark = pytest.mark.e2e

NODES_SCRIPT = """
import json
from django.utils import timezone
from appliance.models import Node
now = timezone.now()
print(json.dumps({n.name: {"address": n.address, "state": n.state(now), "version": n.version,
                           "memory_bytes": n.memory_bytes, "started_at": n.started_at.isoformat(),
                           "last_heartbeat": n.last_heartbeat.isoformat()} for n in Node.objects.all()}))
"""
REGISTRATIONS_SCRIPT = """
import json
from audit.models import AuditEvent
print(json.dumps([[e.target, e.details["node"]] for e in AuditEvent.objects.filter(action="node.register")]))
"""


@pytest.fixture(scope="module")
def appliance_nodes(tmp_path_factory):
    """Return three nodes sharing one database and KEK, each with its own home, port and processes."""
    yield from start_nodes(tmp_path_factory, 3, APPLIANCE_NODE_HEARTBEAT_S="0.5")


def shell_json(box, script: str):
    return json.loads(box.manage("shell", "--no-imports", "-c", script).stdout.strip().splitlines()[-1])


def test_every_node_registers_itself_with_its_address(appliance_nodes):
    listed = shell_json(appliance_nodes[0], NODES_SCRIPT)
    assert sorted(listed) == ["node-1", "node-2", "node-3"]
    for box, name in zip(appliance_nodes, ["node-1", "node-2", "node-3"]):
        assert listed[name]["address"] == box.url
        assert listed[name]["state"] == "up" and listed[name]["memory_bytes"] > 0 and listed[name]["version"]
    # Each registration was written by the node it registers, into the one ledger.
    assert sorted(map(tuple, shell_json(appliance_nodes[2], REGISTRATIONS_SCRIPT))) == [
        ("node-1", "node-1"), ("node-2", "node-2"), ("node-3", "node-3")]


def test_every_node_keeps_heartbeating(appliance_nodes):
    first = shell_json(appliance_nodes[1], NODES_SCRIPT)
    deadline = time.monotonic() + 60
    while True:
        later = shell_json(appliance_nodes[1], NODES_SCRIPT)
        if all(later[name]["last_heartbeat"] > first[name]["last_heartbeat"] for name in first):
            break
        assert time.monotonic() < deadline, f"no heartbeat from some node: {first} then {later}"
        time.sleep(0.5)
    assert {entry["state"] for entry in later.values()} == {"up"}


def test_any_nodes_console_lists_every_node_up(appliance_nodes):
    page = ConsoleSession(appliance_nodes[2]).http.get("/admin/appliance/node/").text
    rows = page.split("<tbody>")[1].split("<tr")[1:]
    assert [row.split("</a>")[0].rsplit(">", 1)[1] for row in rows] == ["node-1", "node-2", "node-3"]
    for row, box in zip(rows, appliance_nodes):
        assert ">Up<" in row and box.url in row


def test_the_shared_ledger_verifies_from_any_node(appliance_nodes):
    result = appliance_nodes[1].manage("audit_verify")
    assert "intact" in result.stdout, result.stdout + result.stderr
