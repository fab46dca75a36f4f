"""Snapshot the box's sockets and record them as a signed network.attestation event."""
import base64

import psutil

from audit import egress, keys, ledger
from audit.verifier import canonical


def snapshot(policy: egress.Policy | None = None) -> dict:
    """Return established connections outside the allowlist and the listening ports, box-wide."""
    policy = policy or (egress.guard().policy if egress.guard() else egress.policy_from_environment())
    outside, listening, established = [], set(), 0
    # Box-wide, not only this process: psutil reads /proc/net, which lists every socket, so a
    # connection opened by native code or a child process shows up here though the hook missed it.
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr:
            listening.add(f"{conn.laddr.ip}:{conn.laddr.port}")
        elif conn.status == psutil.CONN_ESTABLISHED and conn.raddr:
            established += 1
            if not policy.allows_address(conn.raddr.ip, conn.raddr.port):
                outside.append({"remote": f"{conn.raddr.ip}:{conn.raddr.port}",
                                "local": f"{conn.laddr.ip}:{conn.laddr.port}", "pid": conn.pid})
    return {"established_outside_allowlist": len(outside), "outside": sorted(outside, key=str),
            "established_total": established, "listening": sorted(listening),
            "allowlist": policy.describe(), "guard": egress.startup_report()}


def attest() -> "ledger.AuditEvent":
    """Record a signed network.attestation event (outcome "ok" when nothing is outside, else "alert")."""
    payload = snapshot()
    fingerprint, signature = keys.sign(canonical(payload))
    outcome = "ok" if payload["established_outside_allowlist"] == 0 else "alert"
    return ledger.append("network.attestation", actor="system:beat", outcome=outcome, details={
        "snapshot": payload, "key": fingerprint, "signature": base64.b64encode(signature).decode()})


def signature_valid(details: dict) -> bool:
    """Return whether an attestation event's snapshot carries a valid signature by a box key."""
    from audit.models import SigningKey
    from audit.verifier import ed25519_verify

    key = SigningKey.objects.filter(fingerprint=details.get("key")).first()
    return key is not None and ed25519_verify(bytes(key.public_key), base64.b64decode(details.get("signature", "")),
                                              canonical(details.get("snapshot")))
