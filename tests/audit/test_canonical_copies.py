"""The box's canonical encoding (audit/canonical.py) and the standalone verifier's copy (audit/verifier.py, which
an auditor runs alone) give the same bytes for every event the box writes and refuse the same values."""
import ast
import json
import math
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import appliance
from appliance import actions
from audit import attestation, keys, verifier
from audit.canonical import canonical_bytes
from audit.checkpoints import make_checkpoint
from audit.models import GENESIS_HASH, AuditEvent

REPO = Path(appliance.__file__).resolve().parent.parent
PACKAGES = ("appliance", "audit", "inference")
# Every type and edge the box puts in details: big integers, unicode, nesting, empty containers, null.
DETAILS = {"count": 2**70, "negative": -1, "flag": False, "none": None, "text": "Zoë 東京 \u202e \"q\" \\",
           "list": [1, "two", [], {}], "nested": {"b": {"a": [True, None]}}, "": ""}


def event_kinds() -> set[str]:
    """Return the action of every ledger event written in the box's code: append("kind", actor=...) and
    action="kind" (the events built as keyword dicts)."""
    kinds = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                keywords = {k.arg: k.value for k in node.keywords}
                if name == "append" and "actor" in keywords and node.args and is_text(node.args[0]):
                    kinds.add(node.args[0].value)
                if is_text(keywords.get("action")):
                    kinds.add(keywords["action"].value)
    return kinds


def is_text(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def both(value):
    """Return what each encoding makes of value: its bytes, or "refused"."""
    results = []
    for encode in (canonical_bytes, verifier.canonical):
        try:
            results.append(encode(value))
        except ValueError:
            results.append("refused")
    return results


def test_the_scan_finds_the_kinds_of_events_the_box_writes():
    kinds = event_kinds()
    assert {"variant.import", "variant.quarantine", "chat.completion", "network.attestation",
            "console.sign_in_failed", "deployment.load"} <= kinds
    assert len(kinds) > 30


@pytest.mark.parametrize("kind", sorted(event_kinds()))
def test_every_kind_of_event_encodes_to_the_same_bytes(kind):
    event = AuditEvent(seq=7, created_at=datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=timezone.utc), actor="system:web",
                       action=kind, target="demo-moe", outcome="ok", details=DETAILS, prev_hash="ab" * 32)
    body = event.body_fields()
    encoded = canonical_bytes(body)
    assert verifier.canonical(body) == encoded
    assert verifier.is_canonical(encoded)
    assert json.loads(encoded)["action"] == kind


def test_the_events_a_box_really_writes_read_as_canonical_to_the_verifier(db):
    team = actions.do_create_team("research", actor="admin:root")
    key, _ = actions.do_issue_api_key(team, actor="admin:root", name="ci")
    actions.do_update_api_key(key, actor="admin:root", values={"expires_at": datetime(2030, 1, 1, tzinfo=timezone.utc)})
    actions.do_update_team(team, actor="admin:root", values={"all_variants": not team.all_variants})
    actions.do_record_sign_in_failure("mallory", "127.0.0.1", shown="mallory")
    attestation.attest(actor="system:test")
    new = keys.rotate("admin:root")
    make_checkpoint("heartbeat")
    events = list(AuditEvent.objects.all())
    assert len({e.action for e in events}) >= 8
    for event in events:
        body = bytes(event.body)
        assert verifier.canonical(json.loads(body)) == body == canonical_bytes(event.body_fields())
    # The rotation the box signed over its bytes verifies over the verifier's: the new key vouches for the old.
    assert len(verifier.trusted_keys(keys.keys_document(), new.fingerprint)) == 2


REFUSED = [0.25, 1e3, float("nan"), float("inf"), -math.inf, {"usage": {"latency": 0.5}}, [1, 2.0],
           {1: "one"}, {None: 1}, {(1, 2): "pair"}, {True: "yes"}, "a\x00b", {"a\x00": 1}, ["x", ["\x00"]],
           b"raw", {"blob": bytearray(b"x")}, {1, 2}, Decimal("1.5"), datetime(2026, 1, 1), object()]


@pytest.mark.parametrize("value", REFUSED, ids=repr)
def test_both_refuse_what_the_canonical_form_cannot_hold(value):
    assert both(value) == ["refused", "refused"]


def test_both_share_the_first_hash_of_the_chain():
    assert verifier.GENESIS_HASH == GENESIS_HASH


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=True, allow_infinity=True),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text() | st.integers() | st.none() | st.booleans(), inner, max_size=4),
    max_leaves=20)


# No deadline: the examples' pace depends on the machine, never their outcome.
@settings(max_examples=400, deadline=None, derandomize=True)
@given(json_like)
def test_both_agree_on_any_value_either_accepting_it_with_the_same_bytes_or_refusing_it(value):
    box, auditor = both(value)
    assert box == auditor
