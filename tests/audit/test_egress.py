"""The egress guard. Every attempt here aims at loopback only: 127.0.0.1 is allowed, 127.0.0.2 is not."""
import os
import re
import select
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.db import connection

from audit import egress
from audit.models import AuditEvent

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = "127.0.0.2"  # loopback, but outside the allowlist the tests install


@contextmanager
def only_127_0_0_1():
    """Narrow the installed guard to 127.0.0.1/32 for the block (both changes are recorded: use committed_ledger)."""
    saved = egress.guard().policy
    egress.set_policy(egress.parse_allowlist(["127.0.0.1/32"], "test"))
    try:
        yield
    finally:
        egress.set_policy(saved)


@contextmanager
def listener(host: str, kind=socket.SOCK_STREAM):
    """Yield a socket bound to host on a free port (listening, for TCP)."""
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind((host, 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(1)
    try:
        yield sock
    finally:
        sock.close()


def nothing_arrived(sock) -> bool:
    """Return whether no connection or datagram reached sock within a short wait."""
    return select.select([sock], [], [], 0.2)[0] == []


def test_every_appliance_process_has_the_guard_installed():
    assert egress.guard() is not None and egress.guard().installed


def test_the_default_allowlist_is_loopback_plus_the_database_and_broker_hosts():
    policy = egress.policy_from_environment({"DATABASE_URL": "postgres://app@db.internal:5432/app",
                                             "CELERY_BROKER_URL": "redis://10.1.2.3:6379/0"})
    assert policy.describe() == ["127.0.0.0/8", "::1/128", "db.internal:5432", "10.1.2.3:6379"]
    # Judged on the policy alone: nothing is connected to or looked up.
    assert policy.allows_name("db.internal", 5432) and not policy.allows_name("db.internal", 22)
    literal = egress.policy_from_environment({"CELERY_BROKER_URL": "redis://10.1.2.3:6379/0"})
    assert literal.allows_address("127.0.0.2", 80) and literal.allows_address("::1", 5432)
    assert literal.allows_address("10.1.2.3", 6379) and not literal.allows_address("10.1.2.3", 22)


def test_appliance_egress_allow_replaces_the_default():
    policy = egress.policy_from_environment({"APPLIANCE_EGRESS_ALLOW": "127.0.0.1/32, [::1]:8000, db:5432",
                                             "DATABASE_URL": "postgres://elsewhere:5432/app"})
    assert policy.describe() == ["127.0.0.1/32", "[::1]:8000", "db:5432"]
    assert not policy.allows_address("127.0.0.2", 80)
    assert not policy.allows_name("elsewhere", 5432)


def test_name_lookups_are_judged_before_any_resolver_is_asked():
    # Judged on the policy alone: these names are never actually looked up by the tests.
    policy = egress.parse_allowlist(["127.0.0.1/32"], "test")
    assert not policy.allows_name("huggingface.co", 443)
    assert not policy.allows_name("pypi.org", None)
    assert policy.allows_name("localhost", 8000)


def test_a_connect_outside_the_allowlist_is_refused_before_any_packet(committed_ledger):
    with listener(OUTSIDE) as server, only_127_0_0_1():
        port = server.getsockname()[1]
        client = socket.socket()
        with pytest.raises(PermissionError, match=rf"egress refused: socket.connect to {OUTSIDE}:{port}"):
            client.connect((OUTSIDE, port))
        client.close()
        assert nothing_arrived(server)
    assert egress.flush()
    event = AuditEvent.objects.get(action="egress.blocked")
    assert (event.target, event.outcome) == (f"{OUTSIDE}:{port}", "refused")
    assert event.details["caller"].startswith("tests.audit.test_egress:")
    assert event.details["pid"] == os.getpid() and event.details["operation"] == "socket.connect"


def test_a_connect_inside_the_allowlist_goes_through(committed_ledger):
    with listener("127.0.0.1") as server, only_127_0_0_1():
        client = socket.create_connection(server.getsockname(), timeout=5)
        client.close()
        assert not nothing_arrived(server)
    assert egress.flush()


def test_a_datagram_outside_the_allowlist_is_refused(committed_ledger):
    with listener(OUTSIDE, socket.SOCK_DGRAM) as server, only_127_0_0_1():
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with pytest.raises(PermissionError, match="socket.sendto"):
            client.sendto(b"prompt", server.getsockname())
        client.close()
        assert nothing_arrived(server)
    assert egress.flush()


def test_lookups_of_addresses_outside_the_allowlist_are_refused(committed_ledger):
    with only_127_0_0_1():
        with pytest.raises(PermissionError, match="socket.getaddrinfo"):
            socket.getaddrinfo(OUTSIDE, 443)
        with pytest.raises(PermissionError, match="socket.gethostbyname"):
            socket.gethostbyname(OUTSIDE)
        assert socket.getaddrinfo("127.0.0.1", 80)
    assert egress.flush()
    assert AuditEvent.objects.filter(action="egress.blocked").count() == 2


# Imports the appliance package as every process does, then tries 127.0.0.2 and reports.
CHILD = """
import sys, socket
import appliance
import django
django.setup()
from django.db import connections
connections["default"].settings_dict["NAME"] = sys.argv[1]
from audit import egress
try:
    socket.create_connection(("127.0.0.2", int(sys.argv[2])), timeout=2)
except PermissionError as exc:
    print("refused:", exc)
egress.flush()
"""


def test_a_process_importing_the_appliance_refuses_and_records_with_the_env_allowlist(committed_ledger):
    env = {**os.environ, "APPLIANCE_EGRESS_ALLOW": "127.0.0.1/32"}
    with listener(OUTSIDE) as server:
        port = server.getsockname()[1]
        result = subprocess.run([sys.executable, "-c", CHILD, str(connection.settings_dict["NAME"]), str(port)],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert nothing_arrived(server)
    # create_connection looks the address up first, and that lookup is what is refused.
    assert f"refused: egress refused: socket.getaddrinfo to {OUTSIDE}:{port}" in result.stdout, result.stderr
    event = AuditEvent.objects.get(action="egress.blocked")
    assert event.details["allowlist"] == "APPLIANCE_EGRESS_ALLOW" and event.details["pid"] != os.getpid()


def test_the_startup_report_shows_the_offline_values_the_libraries_read():
    import huggingface_hub.constants  # noqa: F401  (the report reads only libraries already loaded)

    report = egress.startup_report()
    assert report["guard_installed"]
    assert report["environment"]["HF_HUB_OFFLINE"] == "1"
    assert report["libraries_read"]["huggingface_hub.HF_HUB_OFFLINE"] is True
    assert report["libraries_read"]["huggingface_hub.HF_HUB_DISABLE_TELEMETRY"] is True


def events(action: str) -> list[AuditEvent]:
    """Return the recorded guard events of one action, once the recorder has written them."""
    assert egress.flush()
    return list(AuditEvent.objects.filter(action=action).order_by("seq"))


def test_a_policy_change_is_recorded_with_where_it_came_from(committed_ledger):
    with only_127_0_0_1():
        assert egress.guard().policy.describe() == ["127.0.0.1/32"]
    narrowed, restored = events("egress.policy_changed")
    assert narrowed.details["to"] == ["127.0.0.1/32"] and narrowed.details["source"] == "test"
    assert narrowed.details["caller"].startswith("tests.audit.test_egress:")
    assert restored.details["from"] == ["127.0.0.1/32"] and restored.details["to"] == narrowed.details["from"]


def test_assigning_to_the_guard_or_its_modules_is_refused_and_recorded(committed_ledger):
    from audit import egress_policy

    before = egress.guard().policy.describe()
    attempts = {"guard().policy": lambda: setattr(egress.guard(), "policy", egress.parse_allowlist(["0.0.0.0/0"], "x")),
                "audit.egress.WATCHED": lambda: setattr(egress, "WATCHED", frozenset()),
                "audit.egress._rules": lambda: delattr(egress, "_rules"),
                "audit.egress_policy.judge_address": lambda: setattr(egress_policy, "judge_address", lambda *a: True),
                "audit.egress.__class__": lambda: setattr(egress, "__class__", type(os))}
    for name, attempt in attempts.items():
        with pytest.raises(PermissionError, match=re.escape(name) + ".* refused"):
            attempt()
    assert egress.guard().policy.describe() == before and type(egress) is not type(os)
    recorded = [e.details["what"] for e in events("egress.tamper")]
    assert len(recorded) == len(attempts) and all(name in what for name, what in zip(attempts, recorded))
    assert all(e.outcome == "refused" for e in AuditEvent.objects.filter(action="egress.tamper"))


def test_replacing_the_code_of_a_guard_function_is_refused_and_recorded(committed_ledger):
    from audit import egress_policy

    allow_all = (lambda rules, host, port: True).__code__
    for function in (egress_policy.judge_address, egress._judge_socket):
        with pytest.raises(PermissionError, match="setting __code__ of audit.egress"):
            function.__code__ = allow_all
    with pytest.raises(PermissionError, match="setting __defaults__"):
        egress.install_guard.__defaults__ = ({"APPLIANCE_EGRESS_ALLOW": "0.0.0.0/0"},)
    assert [e.details["what"].split(" of ")[0] for e in events("egress.tamper")] == [
        "setting __code__", "setting __code__", "setting __defaults__"]


def test_changes_the_hook_cannot_see_do_not_reach_it_either(committed_ledger):
    """Rebinding the modules' dicts or the Policy class leaves the hook's private copies in force."""
    from audit import egress_policy

    saved = {"egress": dict(vars(egress)), "policy": dict(vars(egress_policy)), "method": egress.Policy.allows_address}
    try:
        vars(egress)["WATCHED"] = frozenset()
        vars(egress)["_judge_socket"] = lambda event, args: None
        vars(egress_policy)["judge_address"] = lambda rules, host, port: True
        egress.Policy.allows_address = lambda self, host, port: True
        with listener(OUTSIDE) as server, only_127_0_0_1():
            with socket.socket() as client, pytest.raises(PermissionError, match=f"socket.connect to {OUTSIDE}"):
                client.connect(server.getsockname())
            assert nothing_arrived(server)
            assert not egress.guard().allows_address(OUTSIDE, 80)  # the hook's own judgement
    finally:
        vars(egress).update(saved["egress"])
        vars(egress_policy).update(saved["policy"])
        egress.Policy.allows_address = saved["method"]
    assert [e.outcome for e in events("egress.blocked")] == ["refused"]


def test_a_policy_whose_rules_are_not_plain_numbers_and_strings_is_refused():
    class Everything(int):
        def __le__(self, other):
            return True

    class Sneaky(egress.Policy):
        def rules(self):
            return ((4, Everything(0), Everything(0)),), (), "sneaky", ("0.0.0.0/0",)

    with pytest.raises(TypeError, match="expected int, got Everything"):
        egress.set_policy(Sneaky())
    assert egress.guard().policy.source != "sneaky"


def test_gc_searches_that_can_reach_the_hook_are_recorded_once_per_place(committed_ledger):
    import gc

    for _ in range(3):
        gc.get_referrers(egress)
    gc.get_objects(generation=2)
    recorded = events("egress.introspection")
    assert [e.target for e in recorded] == ["gc.get_referrers", "gc.get_objects"]
    assert recorded[0].details["caller"].startswith("tests.audit.test_egress:")


def test_a_malformed_allowlist_entry_is_named():
    with pytest.raises(ValueError, match="'db:fivefour': the port is not a number"):
        egress.parse_allowlist(["127.0.0.1/32", "db:fivefour"], "APPLIANCE_EGRESS_ALLOW")


def test_no_audit_hook_can_be_added_after_the_guard_and_the_attempt_is_recorded(committed_ledger):
    seen = []
    sys.addaudithook(lambda event, args: seen.append(event))  # CPython drops it: the guard refused
    sys.audit("tests.egress.probe")
    assert seen == []
    assert [(e.details["what"], e.outcome) for e in events("egress.tamper")] == [("adding another audit hook",
                                                                                   "refused")]


def test_reading_the_guards_frames_from_a_refusals_traceback_or_setting_a_tracer_is_recorded(committed_ledger):
    with listener(OUTSIDE) as server, only_127_0_0_1(), socket.socket() as client:
        with pytest.raises(PermissionError) as refused:
            client.connect(server.getsockname())
    entry, modules = refused.value.__traceback__, []
    while entry is not None:
        modules.append(entry.tb_frame.f_globals["__name__"])
        entry = entry.tb_next
    assert "audit.egress" in modules  # the hook's own frame, whose globals are its private namespace
    sys.settrace(sys.gettrace())
    assert [e.target for e in events("egress.introspection")] == ["traceback.tb_frame", "sys.settrace"]
