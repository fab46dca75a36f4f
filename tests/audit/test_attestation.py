"""Network attestations: a signed snapshot of the box's sockets, judged against the allowlist."""
import socket

import pytest

from audit import attestation, egress
from audit.models import NetworkAttestation

pytestmark = pytest.mark.django_db


def test_an_attestation_lists_listening_ports_and_connections_outside_the_allowlist():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            wide = attestation.snapshot(egress.parse_allowlist(["127.0.0.0/8", "::1/128"], "test"))
            # With an allowlist that excludes loopback, the same loopback connection counts as outside.
            narrow = attestation.snapshot(egress.parse_allowlist(["10.9.9.9/32"], "test"))
        finally:
            client.close()
    assert f"127.0.0.1:{port}" in wide["listening"]
    assert wide["established_outside_allowlist"] == 0
    assert narrow["established_outside_allowlist"] >= 1
    assert any(c["remote"] == f"127.0.0.1:{port}" for c in narrow["outside"])


def test_an_attestation_is_a_signed_ledger_event_shown_on_its_own_page():
    event = attestation.attest()
    assert event.action == "network.attestation"
    assert attestation.signature_valid(event.details)
    assert NetworkAttestation.objects.get().pk == event.pk
    forged = dict(event.details, snapshot=dict(event.details["snapshot"], established_outside_allowlist=0, x=1))
    assert not attestation.signature_valid(forged)
