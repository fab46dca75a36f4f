"""Nodes: the name and address rules, registration, heartbeats, state from the heartbeat's age, the console page,
and the node that every ledger event records."""
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from appliance import actions, nodes
from appliance.models import Node, NodeState
from appliance.names import InvalidName, check_node_address, default_node_name
from audit import ledger
from audit.export import export
from audit.models import AuditEvent, SigningKey
from audit.verifier import Problem, verify_bundle
from tests.audit.evidence import change_lines, history, rewrite

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INVENTORY = {"gpus": [{"name": "NVIDIA H200", "memory_bytes": 141 * 10**9}], "memory_bytes": 2 * 10**12}


def settings_value(name: str, **env: str) -> subprocess.CompletedProcess:
    """Import the settings in a fresh interpreter with `env` and print one of them."""
    code = f"from appliance import settings; print(repr(settings.{name}))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def register(name: str = "box-a", **facts) -> Node:
    return actions.do_register_node(name, address="http://127.0.0.2:8000", version="0.1.0", actor="system:web",
                                    **{**INVENTORY, **facts})


def test_a_host_name_becomes_its_short_lower_case_name():
    assert default_node_name("GPU-Box-07.dc1.example.com") == "gpu-box-07"


@pytest.mark.parametrize("value", ["Box 1", "../box", "box.example.com", ""])
def test_a_node_name_that_is_not_a_slug_stops_the_process_naming_the_variable(value):
    result = settings_value("APPLIANCE_NODE", APPLIANCE_NODE=value or "-")
    assert result.returncode != 0
    assert "APPLIANCE_NODE" in result.stderr and "is refused" in result.stderr


def test_the_node_name_and_address_are_read_from_the_environment():
    result = settings_value("APPLIANCE_NODE", APPLIANCE_NODE="box-b")
    assert (result.returncode, result.stdout.strip()) == (0, "'box-b'"), result.stderr
    result = settings_value("APPLIANCE_NODE_ADDRESS", APPLIANCE_NODE_ADDRESS="http://10.0.0.2:8000")
    assert (result.returncode, result.stdout.strip()) == (0, "'http://10.0.0.2:8000'"), result.stderr


def test_nodes_may_share_a_model_store_outside_their_homes(tmp_path):
    result = settings_value("MODEL_STORE", APPLIANCE_MODEL_STORE=str(tmp_path / "shared" / ".." / "store"))
    assert (result.returncode, result.stdout.strip()) == (0, repr(tmp_path / "store")), result.stderr


@pytest.mark.parametrize("value", ["http://127.0.0.2:8001", "http://gpu-box-07.dc1:8000", "http://[::1]:8000"])
def test_it_accepts_a_node_address(value):
    assert check_node_address(value, field="APPLIANCE_NODE_ADDRESS") == value


@pytest.mark.parametrize("value", ["127.0.0.2:8001", "http://127.0.0.2", "http://127.0.0.2:8001/v1",
                                   "http://127.0.0.2:0", "http://127.0.0.2:70000", "ftp://127.0.0.2:21",
                                   "http://user@127.0.0.2:8001", "http://Box:8000", 8000])
def test_it_refuses_an_address_that_is_not_http_host_port(value):
    with pytest.raises(InvalidName, match="APPLIANCE_NODE_ADDRESS"):
        check_node_address(value, field="APPLIANCE_NODE_ADDRESS")


@pytest.mark.django_db
def test_registering_records_the_node_and_a_node_register_event():
    node = register()
    assert (node.address, node.gpus, node.memory_bytes, node.version) == (
        "http://127.0.0.2:8000", INVENTORY["gpus"], INVENTORY["memory_bytes"], "0.1.0")
    event = AuditEvent.objects.get(action="node.register")
    assert (event.target, event.outcome, event.details["address"]) == ("box-a", "created", "http://127.0.0.2:8000")


@pytest.mark.django_db
def test_a_restarted_node_keeps_its_row_and_says_so():
    first = register()
    again = register(memory_bytes=10**12)
    assert again.pk == first.pk and Node.objects.get().memory_bytes == 10**12
    assert list(AuditEvent.objects.filter(action="node.register").values_list("outcome", flat=True)) == [
        "created", "restarted"]


@pytest.mark.django_db
def test_a_heartbeat_refreshes_the_row_without_a_ledger_event():
    register()
    Node.objects.update(last_heartbeat=timezone.now() - timedelta(minutes=5))
    events = AuditEvent.objects.count()
    actions.do_record_heartbeat("box-a", serving=["demo-dense"], outstanding=3)
    node = Node.objects.get()
    assert (node.serving, node.outstanding, node.state()) == (["demo-dense"], 3, NodeState.UP)
    assert AuditEvent.objects.count() == events


@pytest.mark.django_db
def test_a_node_without_engines_reports_nothing_served_and_no_load():
    assert nodes.load() == {"serving": [], "outstanding": 0}


@pytest.mark.parametrize("silent_s, state", [(0, NodeState.UP), (5.9, NodeState.UP), (6, NodeState.STALE),
                                             (9.9, NodeState.STALE), (10, NodeState.DOWN), (3600, NodeState.DOWN)])
def test_the_state_follows_the_heartbeat_age(settings, silent_s, state):
    settings.NODE_HEARTBEAT_S = 2.0  # stale after 3 heartbeats (6 s), down after 5 (10 s)
    beat = datetime(2026, 1, 1, tzinfo=dt_timezone.utc)
    node = Node(name="box-a", last_heartbeat=beat)
    assert node.state(beat + timedelta(seconds=silent_s)) == state


@pytest.mark.django_db
def test_the_console_lists_nodes_with_state_serving_and_load(client, settings):
    register("box-a")
    register("box-b")
    actions.do_record_heartbeat("box-a", serving=["demo-moe", "demo-dense"], outstanding=7)
    Node.objects.filter(name="box-b").update(last_heartbeat=timezone.now() - timedelta(hours=1))
    client.force_login(get_user_model().objects.create_superuser("root", password="a-long-password"))
    page = client.get("/admin/appliance/node/").content.decode()
    row_a, row_b = page.split("<tbody>")[1].split("<tr")[1:3]
    assert "box-a" in row_a and "Up" in row_a and "demo-moe, demo-dense" in row_a and ">7<" in row_a
    assert "NVIDIA H200 (131.3\xa0GB)" in row_a
    assert "box-b" in row_b and "Down" in row_b


@pytest.mark.django_db
def test_the_console_refuses_to_edit_a_node(client):
    node = register()
    client.force_login(get_user_model().objects.create_superuser("root", password="a-long-password"))
    response = client.post(f"/admin/appliance/node/{node.pk}/change/", {"name": "forged", "address": "http://x:1"})
    assert response.status_code in (302, 403) and Node.objects.get().name == "box-a"
    assert client.get("/admin/appliance/node/add/").status_code == 403


@pytest.mark.parametrize("who", ["member", "stranger"])
@pytest.mark.django_db
def test_only_staff_see_the_nodes_page(client, who):
    register()
    if who == "member":
        client.force_login(get_user_model().objects.create_user("carol", password="a-long-password"))
    response = client.get("/admin/appliance/node/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


@pytest.mark.django_db
def test_every_ledger_event_records_the_node_that_wrote_it(settings):
    settings.AUDIT_NODE = "box-c"
    event = ledger.append("test.event", actor="test", details={"n": 1})
    assert event.details == {"n": 1, "node": "box-c"}
    assert json.loads(bytes(AuditEvent.objects.get(seq=event.seq).body))["details"]["node"] == "box-c"
    assert ledger.verify().ok


@pytest.mark.django_db
def test_an_event_cannot_claim_another_node():
    with pytest.raises(ValueError, match="node"):
        ledger.append("test.event", actor="test", details={"node": "box-z"})
    assert not AuditEvent.objects.exists()


@pytest.mark.django_db
def test_the_standalone_verifier_catches_an_event_moved_to_another_node(settings, tmp_path):
    settings.AUDIT_NODE = "box-a"
    history(settings)
    bundle = tmp_path / "bundle.zip"
    export(bundle, datetime(2020, 1, 1, tzinfo=dt_timezone.utc), actor="test:auditor")
    fingerprint = SigningKey.objects.get().fingerprint
    assert verify_bundle(str(bundle), fingerprint).startswith("OK")
    forged = rewrite(bundle, "events.jsonl", change_lines(
        lambda ls: ls[:4] + [ls[4].replace(b'"node":"box-a"', b'"node":"box-b"')] + ls[5:]))
    with pytest.raises(Problem) as found:
        verify_bundle(str(forged), fingerprint)
    assert found.value.seq == 5
