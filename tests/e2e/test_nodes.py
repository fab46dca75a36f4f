"""Three nodes on one machine act as one appliance: each registers, heartbeats and writes the one ledger."""
import json
import signal
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.livebox import ConsoleSession, read_stream, start, start_nodes

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
SERVING_SCRIPT = """
import json
from appliance.models import Node
print(json.dumps({n.name: n.serving for n in Node.objects.all()}))
"""
BEAT_SCRIPT = """
import json
from django.db.models import Q
from audit.models import AuditEvent
events = AuditEvent.objects.filter(Q(action="lease.taken") | Q(action="network.attestation", actor="system:beat"))
print(json.dumps([[e.action, e.details.get("holder", ""), e.details["node"]] for e in events.order_by("seq")]))
"""


@pytest.fixture(scope="module")
def appliance_nodes(tmp_path_factory):
    """Return three nodes sharing one database and KEK, each with its own home, port and processes."""
    yield from start_nodes(tmp_path_factory, 3, APPLIANCE_NODE_HEARTBEAT_S="1")


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


def console_rows(console: ConsoleSession) -> dict[str, str]:
    """Return the Nodes page's rows by node name."""
    rows = console.http.get("/admin/appliance/node/").text.split("<tbody>")[1].split("<tr")[1:]
    return {row.split("</a>")[0].rsplit(">", 1)[1]: row for row in rows}


def test_any_nodes_console_lists_every_node_up(appliance_nodes):
    rows = console_rows(ConsoleSession(appliance_nodes[2]))
    assert list(rows) == ["node-1", "node-2", "node-3"]
    for row, box in zip(rows.values(), appliance_nodes):
        assert ">Up<" in row and box.url in row


def test_the_shared_ledger_verifies_from_any_node(appliance_nodes):
    result = appliance_nodes[1].manage("audit_verify")
    assert "intact" in result.stdout, result.stdout + result.stderr


def wait_for(box, script: str, done, what: str, timeout: float = 120):
    """Run script on box until done(its JSON) holds; return that JSON."""
    deadline = time.monotonic() + timeout
    while True:
        found = shell_json(box, script)
        if done(found):
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s; last saw {found}"
        time.sleep(1)


def attestations_by(node: str, events) -> int:
    return sum(1 for action, _, written_on in events if action == "network.attestation" and written_on == node)


def test_only_the_lease_holders_beat_acts_and_another_takes_over_when_it_dies(appliance_nodes):
    # Attestations each second: beat sends each to its own node's queue, so the node of the event says whose beat
    # sent it. Each beat also attests once at its own start.
    beats = {}
    for box in appliance_nodes[:2]:
        env = {**box.env, "APPLIANCE_AUDIT_ATTESTATION": "1", "APPLIANCE_BEAT_LEASE_S": "3"}
        beats[box.env["APPLIANCE_NODE"]] = start([sys.executable, "-m", "celery", "-A", "appliance", "beat", "-l",
                                                  "INFO"], env, box.home / "logs" / "beat.log")
    try:
        taken = wait_for(appliance_nodes[0], BEAT_SCRIPT, lambda events: any(e[0] == "lease.taken" for e in events),
                         "a beat taking the lease")
        holder = next(e[1] for e in taken if e[0] == "lease.taken")
        leader = holder.split(":")[0]
        (follower,) = set(beats) - {leader}
        events = wait_for(appliance_nodes[0], BEAT_SCRIPT, lambda events: attestations_by(leader, events) >= 3,
                          "the leader's periodic attestations")
        assert attestations_by(follower, events) <= 1  # its start attestation only: its schedule sent nothing
        assert [e[1] for e in events if e[0] == "lease.taken"] == [holder]
        beats[leader].send_signal(signal.SIGKILL)
        beats[leader].wait(timeout=20)
        events = wait_for(appliance_nodes[0], BEAT_SCRIPT, lambda events: len(
            [e for e in events if e[0] == "lease.taken"]) == 2, "the other beat taking the expired lease")
        assert [e[1].split(":")[0] for e in events if e[0] == "lease.taken"] == [leader, follower]
        before = attestations_by(follower, events)
        wait_for(appliance_nodes[0], BEAT_SCRIPT, lambda events: attestations_by(follower, events) >= before + 1,
                 "the new leader's periodic attestations")
    finally:
        for beat in beats.values():
            beat.terminate()
            beat.wait(timeout=20)


CHAT_LEDGER_SCRIPT = """
import json
from audit.models import AuditEvent
print(json.dumps([[e.details["request_id"], e.details["node"], e.outcome, e.details.get("served_by")]
                  for e in AuditEvent.objects.filter(action="chat.completion", actor="team:%s").order_by("seq")]))
"""
USAGE_SCRIPT = """
import json
from appliance.models import UsageRecord
print(json.dumps([[u.outcome, u.completion_tokens] for u in UsageRecord.objects.filter(team="%s")]))
"""
POLICY_SCRIPT = """
import json
from audit.models import AuditEvent
print(json.dumps([[e.details["node"], e.details["to"]] for e in AuditEvent.objects.filter(
    action="egress.policy_changed").order_by("seq")]))
"""
OUTSTANDING_SCRIPT = """
import json
from appliance.models import Node
print(json.dumps({n.name: n.outstanding for n in Node.objects.all()}))
"""
HELLO = [{"role": "user", "content": "Hello"}]


def sdk(box, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def placed(appliance_nodes):
    """placed-dense, imported through node-1 and placed on node-2, once node-1 sees node-2 serving it."""
    first = appliance_nodes[0]
    first.manage("import_model", str(first.demo_dir / "demo-dense"), "--name", "placed-dense", "--kind", "dense",
                 "--wait")
    # Asked on node-1, loaded by node-2's web process: its reconciler serves what is placed on node-2.
    result = first.manage("deploy", "placed-dense", "--node", "node-2", "--wait")
    assert "placed-dense deployed on node-2's cpu" in result.stdout
    wait_for(first, SERVING_SCRIPT, lambda nodes: "placed-dense" in nodes["node-2"],
             "node-2's heartbeat naming what it serves")
    return "placed-dense"


def test_a_deployment_placed_on_one_node_is_served_there_and_stays_there(appliance_nodes, placed):
    first, second = appliance_nodes[:2]
    key = first.new_key("placement")
    text, usage, finish = read_stream(sdk(second, key).chat.completions.create(
        model=placed, messages=HELLO, max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert usage.completion_tokens == 4 and finish == "length"
    assert placed not in shell_json(first, SERVING_SCRIPT)["node-1"]
    refusal = first.manage("deploy", placed, "--node", "node-1", check=False)
    assert refusal.returncode != 0 and "is deployed on node node-2; undeploy it" in refusal.stderr


def test_a_request_to_another_node_is_forwarded_and_answered_as_the_serving_node_answers(appliance_nodes, placed):
    first, second, third = appliance_nodes
    key = first.new_key("forwarded")
    ask = dict(model=placed, messages=HELLO, max_tokens=6, temperature=0)
    direct = sdk(second, key).chat.completions.create(**ask)
    # node-1 and node-3 list it among the appliance's models, and answer it through node-2's engine.
    assert placed in [m.id for m in sdk(first, key).models.list().data]
    forwarded = sdk(first, key).chat.completions.create(**ask)
    assert forwarded.choices[0].message.content == direct.choices[0].message.content
    assert forwarded.usage.completion_tokens == direct.usage.completion_tokens == 6
    text, usage, finish = read_stream(sdk(third, key).chat.completions.create(
        **ask, stream=True, stream_options={"include_usage": True}))
    assert text == direct.choices[0].message.content and usage.completion_tokens == 6 and finish == "length"
    completion = sdk(first, key).completions.create(model=placed, prompt="Once upon", max_tokens=3, temperature=0)
    assert completion.usage.completion_tokens == 3 and completion.choices[0].finish_reason == "length"
    # Each request is recorded once, by the node that took it, and charged once, to the caller's team.
    events = shell_json(first, CHAT_LEDGER_SCRIPT % "forwarded")
    assert [(node, served_by) for _, node, _, served_by in events] == [
        ("node-2", None), ("node-1", "node-2"), ("node-3", "node-2"), ("node-1", "node-2")]
    assert len({request_id for request_id, *_ in events}) == len(events)
    assert sorted(map(tuple, shell_json(first, USAGE_SCRIPT % "forwarded"))) == [
        ("ok", 3), ("ok", 6), ("ok", 6), ("ok", 6)]
    # node-1 let node-2's address through its egress guard explicitly, and nothing else.
    added = [to for node, to in shell_json(first, POLICY_SCRIPT) if node == "node-1"]
    assert added and set(added[-1]) == {"127.0.0.1/32", second.url.removeprefix("http://")}


def test_a_forged_node_to_node_call_is_refused(appliance_nodes, placed):
    second = appliance_nodes[1]
    path = f"/node/v1/engines/{placed}/generate"
    body = json.dumps({"prompt_ids": [1, 2], "params": {"max_tokens": 2}}).encode()
    forged = {"X-Appliance-Node": "node-1", "X-Appliance-Time": str(int(time.time())), "X-Appliance-Nonce": "ab",
              "X-Appliance-Signature": "0" * 64, "Content-Type": "application/json"}
    for headers in ({"Content-Type": "application/json"}, forged):
        response = httpx.post(f"{second.url}{path}", content=body, headers=headers, timeout=30)
        assert response.status_code == 403, response.text
    refused = wait_for(second, REFUSED_SCRIPT, lambda events: len(events) >= 2, "the refusals in the ledger")
    assert [node for node, _ in refused] == ["node-2", "node-2"]
    assert "signature does not match" in refused[1][1]


REFUSED_SCRIPT = """
import json
from audit.models import AuditEvent
print(json.dumps([[e.details["node"], e.details["reason"]] for e in AuditEvent.objects.filter(
    action="node.call_refused").order_by("seq")]))
"""


def answer_or_error(client: openai.OpenAI, ask: dict):
    try:
        return client.chat.completions.create(**ask)
    except openai.APIError as exc:
        return exc


def test_a_node_killed_mid_answer_fails_only_its_requests_and_shows_down(appliance_nodes, placed):
    first, second, third = appliance_nodes
    console = ConsoleSession(first)
    key = first.new_key("failover")
    third.manage("import_model", str(first.demo_dir / "demo-dense"), "--name", "doomed-dense", "--kind", "dense",
                 "--wait")
    third.manage("deploy", "doomed-dense", "--node", "node-3", "--wait")
    # twin-dense runs on node-2 and on node-3, a replica: a request reaching node-1 goes to the less busy one.
    first.manage("import_model", str(first.demo_dir / "demo-dense"), "--name", "twin-dense", "--kind", "dense",
                 "--wait")
    deployed = first.manage("deploy", "twin-dense", "--node", "node-2", "--replica", "node-3", "--wait").stdout
    assert "twin-dense served by replica node-3 too" in deployed
    wait_for(first, SERVING_SCRIPT, lambda nodes: "doomed-dense" in nodes["node-3"] and all(
        "twin-dense" in nodes[name] for name in ("node-2", "node-3")), "node-2 and node-3 serving what they run")
    # node-1 reaches doomed-dense once first, so that what follows the twins' start (the doomed requests, then
    # the kill) is quick: a first request to a node's variant waits for its tokenizer to load here.
    warm_key = first.new_key("warm-up")
    assert sdk(first, warm_key).chat.completions.create(model="doomed-dense", messages=HELLO, max_tokens=1).usage
    # Two streams of twin-dense, one after the other: the second goes to the replica the first did not take
    # (once both replicas' heartbeats say they are idle, so that the choice counts only these two).
    wait_for(first, OUTSTANDING_SCRIPT, lambda nodes: nodes["node-2"] == nodes["node-3"] == 0, "idle replicas")
    twin_key = first.new_key("twin")
    twins = []
    for _ in range(2):  # the stream's headers come once node-1 has sent it on, so the second choice counts it
        twins.append(sdk(first, twin_key).chat.completions.create(
            model="twin-dense", messages=HELLO, max_tokens=1800, extra_body={"ignore_eos": True}, stream=True,
            stream_options={"include_usage": True}))
    twin_chunks = [[next(iter(twin))] for twin in twins]
    long_answer = dict(model="doomed-dense", messages=HELLO, max_tokens=1500, extra_body={"ignore_eos": True})
    # A whole (not streamed) answer in flight too, under a team of its own.
    whole_key, whole = first.new_key("failover-whole"), {}
    waiting = threading.Thread(target=lambda: whole.update(outcome=answer_or_error(sdk(first, whole_key),
                                                                                    long_answer)))
    waiting.start()
    stream = sdk(first, key).chat.completions.create(**long_answer, stream=True)
    first_chunk = next(iter(stream))
    assert first_chunk.choices[0].delta.role == "assistant"
    third.procs["web"].send_signal(signal.SIGKILL)  # its engine process dies with it
    third.procs["web"].wait(timeout=20)
    killed = time.monotonic()
    with pytest.raises(openai.APIError) as failed:
        for _ in stream:
            pass
    assert "node node-3, which served this request, stopped answering" in str(failed.value)
    waiting.join(timeout=120)
    # Whether node-3 had taken it or not when it died, the whole answer's caller gets a 503 naming the node.
    assert isinstance(whole["outcome"], openai.APIStatusError) and whole["outcome"].status_code == 503
    assert "node node-3" in whole["outcome"].message
    # Of the twin streams, the one on node-3 failed naming it; the one on node-2 answered in full.
    outcomes = []
    for twin, chunks in zip(twins, twin_chunks):
        try:
            chunks.extend(twin)
            outcomes.append(("ok", chunks[-1].usage.completion_tokens))
        except openai.APIError as exc:
            outcomes.append(("failed", "node node-3, which served this request, stopped answering" in str(exc)))
    assert sorted(outcomes) == [("failed", True), ("ok", 1800)]
    # Requests that follow go to the replica left: answered, not refused.
    again = sdk(first, twin_key).chat.completions.create(model="twin-dense", messages=HELLO, max_tokens=3)
    assert again.usage.completion_tokens == 3
    twin_events = shell_json(first, CHAT_LEDGER_SCRIPT % "twin")
    # Recorded by node-1, which took them, each naming the replica whose engine ran it.
    assert sorted((node, outcome, served_by) for _, node, outcome, served_by in twin_events) == [
        ("node-1", "failed", "node-3"), ("node-1", "ok", "node-2"), ("node-1", "ok", "node-2")]
    twin_usage = sorted(map(tuple, shell_json(first, USAGE_SCRIPT % "twin")))
    assert [outcome for outcome, _ in twin_usage] == ["failed", "ok", "ok"] and twin_usage[1:] == [("ok", 3),
                                                                                               ("ok", 1800)]
    # The next request is refused at once, naming the node; the other node's model is still answered.
    with pytest.raises(openai.APIStatusError) as refused:
        sdk(first, key).chat.completions.create(model="doomed-dense", messages=HELLO, max_tokens=2)
    assert refused.value.status_code == 503 and "placed on node node-3" in refused.value.message
    assert sdk(first, key).chat.completions.create(model=placed, messages=HELLO, max_tokens=2).usage
    deadline = killed + 120
    while ">Down<" not in console_rows(console)["node-3"]:
        assert time.monotonic() < deadline, "node-3 still not down"
        time.sleep(0.2)
    # A figure for the record, not a bound: how long the console took to call it down (5 heartbeats of 1 s).
    print(f"node-3 shown down {time.monotonic() - killed:.1f}s after its web process was killed")
    rows = console_rows(console)
    assert ">Up<" in rows["node-1"] and ">Up<" in rows["node-2"]
    # The failed request is recorded once, as failed, by node-1, which took it; charged once; the ledger verifies.
    assert [(node, outcome, served_by) for _, node, outcome, served_by in shell_json(
        first, CHAT_LEDGER_SCRIPT % "failover")] == [("node-1", "failed", "node-3"), ("node-1", "ok", "node-2")]
    usage = sorted(map(tuple, shell_json(first, USAGE_SCRIPT % "failover")))
    assert [outcome for outcome, _ in usage] == ["failed", "failed", "ok"]
    assert [outcome for outcome, _ in shell_json(first, USAGE_SCRIPT % "failover-whole")] == ["failed"]
    assert "intact" in first.manage("audit_verify").stdout
