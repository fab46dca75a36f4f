"""Snapshot the sockets of the appliance's own processes and record them as a signed network.attestation event.

The scope is the processes that registered themselves (web, worker and beat do at start: `at_process_start`)
and every child of theirs, never the whole host: other software on the machine is not the appliance's to
answer for, and a busy machine must not make an attestation fail. psutil reads each process's sockets
from /proc, so a connection opened by native code or by a child process shows up here though the egress
hook never saw it; what this cannot see is a process that is neither registered nor a child of one (the
systemd units and nftables rules in deploy/ are what confine those).
"""
import base64
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from django.conf import settings

from audit import egress, keys, ledger
from audit.canonical import canonical_bytes
from audit.models import SigningKey
from audit.verifier import ed25519_verify

# Sockets in these states belong to no process's open connections any more.
GONE = {psutil.CONN_TIME_WAIT, psutil.CONN_CLOSE}


@dataclass(frozen=True)
class Member:
    """A registered appliance process: its pid, role, and start time (which tells a reused pid apart)."""

    pid: int
    name: str
    create_time: float


def registry() -> Path:
    """Return the directory under APPLIANCE_HOME where appliance processes register."""
    return Path(settings.APPLIANCE_HOME) / "processes"


def register(name: str, pid: int | None = None) -> Member:
    """Register a process (this one by default) so that attestations cover it and its children."""
    process = psutil.Process(pid)
    member = Member(process.pid, name, process.create_time())
    folder = registry()
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{member.pid}.json.partial"
    partial.write_text(json.dumps(asdict(member)))
    partial.replace(folder / f"{member.pid}.json")  # atomic: a reader never sees half an entry
    return member


def registered() -> list[Member]:
    """Return the registered processes still running, forgetting those that ended or whose pid was reused."""
    members = []
    for path in sorted(registry().glob("*.json")):
        try:
            member = Member(**json.loads(path.read_text()))
            alive = psutil.Process(member.pid).create_time() == member.create_time
        except (OSError, ValueError, TypeError, psutil.NoSuchProcess):
            alive = False
        except psutil.AccessDenied:
            alive = True  # cannot tell: kept, and the snapshot says its sockets were unreadable
        if alive:
            members.append(member)
        else:
            path.unlink(missing_ok=True)
    return members


def snapshot(policy: egress.Policy | None = None, members: list[Member] | None = None) -> dict:
    """Return the members' (default: every registered process's) connections outside the allowlist and ports."""
    members = registered() if members is None else members
    view = egress.guard()
    if policy is None and view is not None:
        allows, described = view.allows_address, view.policy.describe()  # the hook's own judgement
    else:
        policy = policy or egress.policy_from_environment()
        allows, described = policy.allows_address, policy.describe()
    outside, listening, connected, processes, unreadable = [], set(), set(), [], []
    for member in members:
        tree = _tree(member.pid)
        if not tree:
            continue
        processes.append({"name": member.name, "pid": member.pid, "children": [p.pid for p in tree[1:]]})
        for process in tree:
            try:
                connections = process.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            except psutil.AccessDenied:
                unreadable.append(process.pid)
                continue
            for conn in connections:
                if conn.status == psutil.CONN_LISTEN and conn.laddr:
                    listening.add(f"{conn.laddr.ip}:{conn.laddr.port}")
                elif conn.raddr and conn.status not in GONE:
                    pair = (f"{conn.laddr.ip}:{conn.laddr.port}", f"{conn.raddr.ip}:{conn.raddr.port}")
                    if pair in connected:
                        continue  # a socket a child inherited is one connection, not two
                    connected.add(pair)
                    if not allows(conn.raddr.ip, conn.raddr.port):
                        outside.append({"remote": pair[1], "local": pair[0], "pid": process.pid,
                                        "process": member.name, "status": conn.status})
    return {"scope": "the appliance's registered processes and their children", "processes": processes,
            "established_outside_allowlist": len(outside), "outside": sorted(outside, key=str),
            "established_total": len(connected), "listening": sorted(listening), "unreadable": unreadable,
            "allowlist": described, "guard": egress.startup_report()}


def _tree(pid: int) -> list:
    """Return the process and all its descendants, or [] when it has ended."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    except psutil.AccessDenied:
        return [root]  # its sockets are tried (and reported unreadable if they are)


def attest(actor: str = "system:beat", members: list[Member] | None = None,
           policy: egress.Policy | None = None) -> "ledger.AuditEvent":
    """Record a signed network.attestation event: "ok", "alert" (a connection outside) or "incomplete"."""
    payload = snapshot(policy, members)
    fingerprint, signature = keys.sign(canonical_bytes(payload))
    outcome = "alert" if payload["outside"] else "incomplete" if payload["unreadable"] else "ok"
    return ledger.append("network.attestation", actor=actor, outcome=outcome, details={
        "snapshot": payload, "key": fingerprint, "signature": base64.b64encode(signature).decode()})


def at_process_start(name: str) -> "ledger.AuditEvent":
    """Register this process under name and attest its own sockets (and its children's) now."""
    return attest(actor=f"system:{name}", members=[register(name)])


def signature_valid(details: dict) -> bool:
    """Return whether an attestation event's snapshot carries a valid signature by a box key."""
    key = SigningKey.objects.filter(fingerprint=details.get("key")).first()
    return key is not None and ed25519_verify(bytes(key.public_key), base64.b64decode(details.get("signature", "")),
                                              canonical_bytes(details.get("snapshot")))

