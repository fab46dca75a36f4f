"""Node-to-node calls: only a call signed with the appliance's key, fresh and not replayed, is taken; the engine
endpoint refuses anything else (and records it), and reaches only engines this node loaded itself."""
import asyncio
import http.server
import json
import threading

import pytest
from django.test import AsyncClient

from appliance import node_link, peer_engine
from audit.models import AuditEvent
from inference.engine import wire
from inference.engine.request import SamplingParams
from tests.audit.tamper import wipe_ledger

PATH = "/node/v1/engines/demo-dense/generate"
BODY = json.dumps({"prompt_ids": [1, 2, 3], "params": wire.params_fields(SamplingParams(max_tokens=2)),
                   "cache_scope": "team-a"}).encode()


def test_a_signed_call_is_taken_once_and_names_its_sender():
    headers = node_link.sign("POST", PATH, BODY, "node-1")
    assert node_link.verify("POST", PATH, headers, BODY) == "node-1"
    with pytest.raises(node_link.LinkRefused, match="replayed"):
        node_link.verify("POST", PATH, headers, BODY)


@pytest.mark.parametrize("method, path, body, sender", [
    ("POST", PATH, BODY + b" ", None),  # the body changed on the way
    ("POST", "/node/v1/engines/other/generate", BODY, None),  # sent to another engine
    ("GET", PATH, BODY, None),
    ("POST", PATH, BODY, "node-9"),  # claims another sender
])
def test_a_call_changed_in_any_signed_part_is_refused(method, path, body, sender):
    headers = node_link.sign("POST", PATH, BODY, "node-1")
    if sender:
        headers["X-Appliance-Node"] = sender
    with pytest.raises(node_link.LinkRefused, match="signature does not match"):
        node_link.verify(method, path, headers, body)


def test_a_call_from_too_long_ago_or_without_the_headers_is_refused(monkeypatch):
    now = node_link.time.time()
    monkeypatch.setattr(node_link.time, "time", lambda: now - node_link.SKEW_S - 5)
    old = node_link.sign("POST", PATH, BODY, "node-1")
    monkeypatch.undo()
    with pytest.raises(node_link.LinkRefused, match="from this node's clock"):
        node_link.verify("POST", PATH, old, BODY)
    with pytest.raises(node_link.LinkRefused, match="headers are missing"):
        node_link.verify("POST", PATH, {}, BODY)


def test_a_signature_made_with_another_key_is_refused(monkeypatch):
    monkeypatch.setattr(node_link, "_key", lambda: b"k" * 32)  # another appliance's KEK
    forged = node_link.sign("POST", PATH, BODY, "node-1")
    monkeypatch.undo()
    with pytest.raises(node_link.LinkRefused, match="signature does not match"):
        node_link.verify("POST", PATH, forged, BODY)


@pytest.fixture
def ledger_db(transactional_db):
    """The refusals' events are written by the API's ledger writer, on its own connection: a transactional test,
    whose ledger is wiped after it (its triggers refuse the flush)."""
    yield
    wipe_ledger()


def call(method: str, path: str, body: bytes = b"", headers: dict | None = None):
    async def go():
        client = AsyncClient()
        if method == "GET":
            return await client.get(path, headers=headers or {})
        return await client.post(path, body, content_type="application/json", headers=headers or {})

    return asyncio.run(go())


def test_the_engine_endpoint_refuses_an_unsigned_or_forged_call_and_records_it(ledger_db):
    forged = {**node_link.sign("POST", PATH, BODY, "node-1"), "X-Appliance-Signature": "0" * 64}
    for headers in ({}, forged):
        response = call("POST", PATH, BODY, headers)
        assert response.status_code == 403
        assert response.json()["error"]["message"].startswith("Refused: ")
    # The view awaits its event's write before it answers.
    refused = list(AuditEvent.objects.filter(action="node.call_refused").order_by("seq"))
    assert [e.details["claimed_node"] for e in refused] == ["", "node-1"]
    assert "signature does not match" in refused[1].details["reason"] and refused[1].outcome == "denied"


def test_a_signed_call_reaches_only_engines_this_node_loaded(ledger_db):
    response = call("POST", PATH, BODY, node_link.sign("POST", PATH, BODY, "node-1"))
    assert response.status_code == 503 and "does not serve 'demo-dense'" in response.json()["error"]["message"]
    facts_path = "/node/v1/engines/demo-dense"
    response = call("GET", facts_path, headers=node_link.sign("GET", facts_path, b"", "node-1"))
    assert response.status_code == 404


def test_a_signed_call_that_is_not_a_generation_request_is_a_400(ledger_db):
    body = b'{"prompt_ids": "x"}'
    response = call("POST", PATH, body, node_link.sign("POST", PATH, body, "node-1"))
    assert response.status_code == 400 and "Not a generation request" in response.json()["error"]["message"]


class FakeNode(http.server.BaseHTTPRequestHandler):
    """Answers the engine-facts call as a node would, signed as `signer` (unsigned for None)."""

    signer: str | None = None

    def do_GET(self):
        body = json.dumps({"engine": "builtin", "exact": False, "vocab_size": 10, "context_length": 64,
                           "max_request_tokens": 64}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if self.signer:
            for name, value in node_link.sign(node_link.ANSWER, self.path, body, self.signer).items():
                self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_node():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeNode)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("signer, refusal", [
    (None, "not a node's of this appliance: not a node-to-node call"),  # a forged Node row's address
    ("node-3", "signed by node node-3, not by node-2"),
])
def test_an_address_that_cannot_prove_it_is_the_node_gets_no_prompt(fake_node, monkeypatch, signer, refusal):
    monkeypatch.setattr(FakeNode, "signer", signer)
    address = f"http://127.0.0.1:{fake_node.server_address[1]}"
    with pytest.raises(peer_engine.PeerUnreachable, match=refusal):
        peer_engine.engine_facts("node-2", address, "demo-dense", "node-1")


def test_the_named_node_signing_its_answer_is_believed(fake_node, monkeypatch):
    monkeypatch.setattr(FakeNode, "signer", "node-2")
    address = f"http://127.0.0.1:{fake_node.server_address[1]}"
    assert peer_engine.engine_facts("node-2", address, "demo-dense", "node-1")["max_request_tokens"] == 64
