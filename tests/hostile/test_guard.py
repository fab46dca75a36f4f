"""The egress guard inside real appliance processes of a live box: switching it off from Python is refused or
recorded, and a connection an appliance process holds outside the allowlist is caught by the attestation.

Every address here is loopback: the allowlists are narrowed to 127.0.0.1/32 (plus the box's database and broker,
wherever CI puts them) so that 127.0.0.2 is "outside".
"""
import json
import os
import select
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

from audit import egress
from tests.livebox import ROOT

OUTSIDE = "127.0.0.2"


def narrow(box) -> dict:
    """Return the environment of a process allowed 127.0.0.1/32 and the box's database and broker (not 127.0.0.2)."""
    services = [entry for entry in egress.policy_from_environment(
        {k: v for k, v in box.env.items() if k != "APPLIANCE_EGRESS_ALLOW"}).describe() if entry not in egress.LOOPBACK]
    return {"APPLIANCE_EGRESS_ALLOW": ",".join(["127.0.0.1/32", *services])}

# Run by `manage.py shell` in the box's environment: each way of turning the guard off, then a connect.
TRICKS = r"""
import gc, json, os, socket, sys, types
from audit import egress, egress_policy

results = {"pid": os.getpid()}

def attempt(name, action):
    try:
        action()
        results[name] = "done"
    except PermissionError:
        results[name] = "refused"

attempt("guard().policy", lambda: setattr(egress.guard(), "policy", egress.parse_allowlist(["0.0.0.0/0"], "x")))
attempt("audit.egress.WATCHED", lambda: setattr(egress, "WATCHED", frozenset()))
attempt("audit.egress._hook", lambda: delattr(egress, "_hook"))
attempt("audit.egress_policy.judge_name", lambda: setattr(egress_policy, "judge_name", lambda *a: True))
attempt("judge_address.__code__",
        lambda: setattr(egress_policy.judge_address, "__code__", (lambda rules, host, port: True).__code__))

def unseen():
    # Changes the hook cannot see; none reaches the private copies it runs.
    vars(egress)["WATCHED"] = frozenset()
    vars(egress_policy)["judge_address"] = lambda rules, host, port: True
    egress.Policy.allows_address = lambda self, host, port: True
    object.__setattr__(egress, "__class__", types.ModuleType)
    egress._rules = ((), (), "attacker", ())

attempt("unseen", unseen)
# Another audit hook could watch the guard's frames: CPython drops it silently when the guard refuses it.
watched = []
sys.addaudithook(lambda event, args: watched.append(event))
sys.audit("tests.hostile.probe")
results["extra hook ran"] = bool(watched)
with socket.socket() as client:
    try:
        client.connect(("127.0.0.2", int(os.environ["GUARD_TEST_PORT"])))
        results["connect"] = "connected"
    except PermissionError as exc:
        results["connect"] = str(exc)
gc.get_referrers(egress)
egress.set_policy(egress.parse_allowlist(["0.0.0.0/0"], "attacker"))  # allowed, and recorded
results["flushed"] = egress.flush(60)
print(json.dumps(results))
"""

EVENTS = r"""
import json, os
from audit.models import AuditEvent
rows = AuditEvent.objects.filter(action__startswith="egress.", details__pid=int(os.environ["GUARD_TEST_PID"]))
print(json.dumps([[e.action, e.target, e.outcome, e.details] for e in rows.order_by("seq")]))
"""

ATTEST = r"""
import json
from audit.attestation import attest
event = attest()
print(json.dumps({"outcome": event.outcome, "snapshot": event.details["snapshot"]}))
"""

HOLD = r"""
import os, socket, sys
from audit.attestation import register
register("holder")
held = socket.create_connection(("127.0.0.2", int(os.environ["GUARD_TEST_PORT"])), timeout=10)
print("held", flush=True)
sys.stdin.read()
"""


def shell(box, code: str, **env: str) -> str:
    """Run code in `manage.py shell` with the box's environment (plus env) and return its last line of output."""
    result = subprocess.run([sys.executable, "manage.py", "shell", "--no-imports", "-c", code], cwd=ROOT,
                            env={**box.env, **env}, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


@contextmanager
def listener_outside():
    """Yield a TCP socket listening on 127.0.0.2 (loopback, but outside the narrowed allowlists)."""
    with socket.socket() as server:
        server.bind((OUTSIDE, 0))
        server.listen(4)
        yield server


def box_is_sound(box) -> None:
    """Assert that the box's processes are alive and its ledger verifies."""
    assert all(proc.poll() is None for proc in box.procs.values())
    box.manage("audit_verify")


def test_switching_the_guard_off_from_inside_a_process_is_refused_or_recorded(box):
    with listener_outside() as server:
        port = server.getsockname()[1]
        results = json.loads(shell(box, TRICKS, GUARD_TEST_PORT=str(port), **narrow(box)))
        assert select.select([server], [], [], 0.5)[0] == []  # nothing reached 127.0.0.2
    refused = {"guard().policy": "assignment to guard().policy",
               "audit.egress.WATCHED": "assignment to audit.egress.WATCHED",
               "audit.egress._hook": "deletion of audit.egress._hook",
               "audit.egress_policy.judge_name": "assignment to audit.egress_policy.judge_name",
               "judge_address.__code__": "setting __code__ of audit.egress_policy.judge_address"}
    assert {name: results[name] for name in refused} == dict.fromkeys(refused, "refused")
    assert results["unseen"] == "done" and results["extra hook ran"] is False and results["flushed"] is True
    assert results["connect"].startswith(f"egress refused: socket.connect to {OUTSIDE}:{port}")
    events = json.loads(shell(box, EVENTS, GUARD_TEST_PID=str(results["pid"])))
    tampering = [(details["what"], outcome) for action, _, outcome, details in events if action == "egress.tamper"]
    assert tampering == [(what, "refused") for what in [*refused.values(), "adding another audit hook"]]
    assert [(a, t, o) for a, t, o, _ in events if a == "egress.blocked"] == [
        ("egress.blocked", f"{OUTSIDE}:{port}", "refused")]
    assert [t for a, t, _, _ in events if a == "egress.introspection"] == ["gc.get_referrers"]
    changed = [d for a, _, _, d in events if a == "egress.policy_changed"]
    narrowed = narrow(box)["APPLIANCE_EGRESS_ALLOW"].split(",")
    assert [(d["from"], d["to"], d["source"]) for d in changed] == [(narrowed, ["0.0.0.0/0"], "attacker")]
    box_is_sound(box)


def registered_names(box) -> set[str]:
    """Return the roles registered in the box's process registry."""
    return {json.loads(p.read_text())["name"] for p in (box.home / "processes").glob("*.json")}


def wait_until_registered(box) -> None:
    """Wait until web and worker have registered (the worker does once it is ready, after the web answers)."""
    deadline = time.monotonic() + 90
    while not {"web", "worker"} <= registered_names(box):
        assert time.monotonic() < deadline, registered_names(box)
        time.sleep(0.3)


def test_a_connection_held_open_outside_the_allowlist_by_an_appliance_process_is_caught(box):
    wait_until_registered(box)
    with listener_outside() as server:
        port = server.getsockname()[1]
        # The holder's own guard allows all of loopback; the attesting process judges by 127.0.0.1/32.
        holder = subprocess.Popen([sys.executable, "manage.py", "shell", "--no-imports", "-c", HOLD], cwd=ROOT,
                                  env={**box.env, "GUARD_TEST_PORT": str(port)}, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            caught = json.loads(shell(box, ATTEST, **narrow(box)))
        finally:
            holder.stdin.close()
            holder.wait(timeout=60)
    assert caught["outcome"] == "alert"
    assert [(c["process"], c["pid"], c["remote"]) for c in caught["snapshot"]["outside"]] == [
        ("holder", holder.pid, f"{OUTSIDE}:{port}")]
    names = {p["name"]: p["pid"] for p in caught["snapshot"]["processes"]}
    assert names.keys() == {"web", "worker", "holder"} and names["web"] == box.procs["web"].pid
    assert f"127.0.0.1:{box.url.rsplit(':', 1)[1]}" in caught["snapshot"]["listening"]
    # Once the holder is gone, it is forgotten, and the box's own processes are within the allowlist.
    after = json.loads(shell(box, ATTEST, **narrow(box)))
    assert after["outcome"] == "ok" and {p["name"] for p in after["snapshot"]["processes"]} == {"web", "worker"}
    box_is_sound(box)


def test_each_appliance_process_attests_its_own_sockets_at_start(box):
    wait_until_registered(box)
    starts = json.loads(shell(box, "import json\nfrom audit.models import NetworkAttestation\n"
                                   "print(json.dumps([[e.actor, e.outcome, e.details['snapshot']['processes']]"
                                   " for e in NetworkAttestation.objects.filter(actor__in=['system:web', "
                                   "'system:worker'])]))"))
    by_actor = {actor: (outcome, processes) for actor, outcome, processes in starts}
    assert by_actor["system:web"][0] == "ok"
    assert [p["pid"] for p in by_actor["system:web"][1]] == [box.procs["web"].pid]
    assert [p["pid"] for p in by_actor["system:worker"][1]] == [box.procs["worker"].pid]
    assert os.getpid() not in {p["pid"] for _, processes in by_actor.values() for p in processes}
    # Serving as usual trips none of the guard's tamper or introspection wires: each event there means something.
    quiet = shell(box, "from audit.models import AuditEvent\n"
                       "print(list(AuditEvent.objects.filter(action__in=['egress.tamper', 'egress.introspection'], "
                       f"details__pid__in=[{box.procs['web'].pid}, {box.procs['worker'].pid}])"
                       ".values_list('action', 'target', 'details__caller')))")
    assert quiet == "[]"
    box_is_sound(box)
