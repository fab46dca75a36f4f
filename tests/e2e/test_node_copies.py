"""Nodes that share no model store: each node that serves a variant gets its own copy, fetched from the node that
imported it and hashed there against the one manifest (a node that only forwards requests for it fetches its
tokenizer alone); a node whose copy is altered quarantines its copy alone and stops serving it, while the other
nodes serve on, until a fresh copy replaces it; a deleted variant's copies go from every node."""
import json
import time

import openai
import pytest

from appliance.modelfiles import hash_dir
from tests.livebox import start_nodes

pytestmark = pytest.mark.e2e
NAME = "copied-dense"
STATE_SCRIPT = """
import json
from appliance.models import ModelVariant, Node
from audit.models import AuditEvent
variant = ModelVariant.objects.filter(name=%r).first()
events = AuditEvent.objects.filter(action__in=["variant.copy", "variant.quarantine"]).order_by("seq")
print(json.dumps({
    "status": variant.status if variant else None,
    "manifest": variant.manifest if variant else None,
    "copies": dict(variant.copies.values_list("node", "state")) if variant else {},
    "serving": {node.name: node.serving for node in Node.objects.all()},
    "events": [[e.action, e.outcome, e.details["node"], e.details.get("copy_on"), e.details.get("source"),
                e.details.get("variant_quarantined")] for e in events],
}))
""" % NAME
VERIFY_SCRIPT = """
from appliance import actions
from appliance.models import ModelVariant
actions.do_verify(ModelVariant.objects.get(name=%r), actor="admin:e2e")
print("{}")
""" % NAME
REPLACE_SCRIPT = """
from appliance import actions
from appliance.models import ModelVariant
actions.do_replace_bad_copies(ModelVariant.objects.get(name=%r), actor="admin:e2e")
print("{}")
""" % NAME
DELETE_SCRIPT = """
from appliance import actions
from appliance.models import ModelVariant
actions.do_delete(ModelVariant.objects.get(name=%r), actor="admin:e2e")
print("{}")
""" % NAME
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """Three nodes of one appliance, each with a model store of its own (under its home)."""
    yield from start_nodes(tmp_path_factory, 3, shared_store=False, APPLIANCE_NODE_HEARTBEAT_S="1")


def state(box) -> dict:
    return json.loads(box.manage("shell", "--no-imports", "-c", STATE_SCRIPT).stdout.strip().splitlines()[-1])


def wait_for(box, done, what: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = state(box)
        if done(found):
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s; last saw {found}"
        time.sleep(1)


def sdk(box, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_a_replica_gets_its_own_copy_and_an_altered_copy_is_quarantined_alone(three_nodes):
    first, second, third = three_nodes
    first.manage("import_model", str(first.demo_dir / "demo-dense"), "--name", NAME, "--kind", "dense", "--wait")
    first.manage("deploy", NAME, "--node", "node-1", "--wait")
    wait_for(first, lambda s: NAME in s["serving"]["node-1"], "node-1's heartbeat naming what it serves")
    key = first.new_key("copies")
    # node-3 forwards to node-1 without a copy of the weights: it fetched the tokenizer and configs alone.
    forwarded = sdk(third, key).chat.completions.create(model=NAME, messages=HELLO, max_tokens=3, temperature=0)
    direct = sdk(first, key).chat.completions.create(model=NAME, messages=HELLO, max_tokens=3, temperature=0)
    assert forwarded.choices[0].message.content == direct.choices[0].message.content
    assert not (third.home / "models" / NAME).exists()
    [fetched] = (third.home / "models" / ".tokenizers").iterdir()
    names = sorted(path.name for path in fetched.iterdir())
    assert "tokenizer.json" in names and "config.json" in names and not any(n.endswith(".safetensors") for n in names)

    first.manage("deploy", NAME, "--node", "node-1", "--replica", "node-2", "--wait")
    seen = wait_for(first, lambda s: all(NAME in s["serving"][node] for node in ("node-1", "node-2")),
                    "both nodes serving the variant")
    # node-2's worker fetched its copy from node-1 and checked it against the one manifest.
    assert seen["copies"] == {"node-1": "ready", "node-2": "ready"}  # node-3 serves nothing: no copy
    assert hash_dir(second.home / "models" / NAME) == seen["manifest"]
    copied = [e for e in seen["events"] if e[0] == "variant.copy" and e[1] == "ok"]
    assert copied == [["variant.copy", "ok", "node-2", "node-2", "node-1", None]]  # written on node-2
    for box in three_nodes:
        assert sdk(box, key).chat.completions.create(model=NAME, messages=HELLO, max_tokens=3).usage.completion_tokens

    # Someone alters node-2's copy; the next verification (every node re-hashes its own) quarantines it there only.
    weights = next((second.home / "models" / NAME).glob("*.safetensors"))
    with weights.open("r+b") as out:
        out.seek(-4, 2)
        out.write(b"\xff\xff\xff\xff")
    first.manage("shell", "--no-imports", "-c", VERIFY_SCRIPT)
    seen = wait_for(first, lambda s: s["copies"].get("node-2") == "quarantined" and NAME not in s["serving"]["node-2"],
                    "node-2 quarantining its copy and no longer serving it")
    assert seen["copies"]["node-1"] == "ready" and seen["status"] == "deployed"
    quarantines = [e for e in seen["events"] if e[0] == "variant.quarantine"]
    assert [(e[2], e[3], e[5]) for e in quarantines] == [("node-2", "node-2", False)]
    assert NAME in seen["serving"]["node-1"]
    assert sdk(first, key).chat.completions.create(model=NAME, messages=HELLO, max_tokens=3).usage.completion_tokens

    # The administrator has node-2 fetch a fresh copy; node-2 serves the variant again.
    first.manage("shell", "--no-imports", "-c", REPLACE_SCRIPT)
    seen = wait_for(first, lambda s: s["copies"].get("node-2") == "ready" and NAME in s["serving"]["node-2"],
                    "node-2 serving again from a fresh copy")
    assert hash_dir(second.home / "models" / NAME) == seen["manifest"]

    # Deleting the variant removes its copy from every node, not only from the node that ran the delete.
    first.manage("undeploy", NAME)
    wait_for(first, lambda s: not any(NAME in serving for serving in s["serving"].values()), "both engines unloaded")
    first.manage("shell", "--no-imports", "-c", DELETE_SCRIPT)
    deadline = time.monotonic() + 60
    while any((box.home / "models" / NAME).exists() for box in three_nodes) or any(
            (third.home / "models" / ".tokenizers").iterdir()):
        assert time.monotonic() < deadline, "a deleted variant's copy is still in a node's store"
        time.sleep(0.5)


def test_an_import_asked_on_one_node_runs_on_the_node_that_can_read_the_path(three_nodes):
    first, _, third = three_nodes
    script = ("import json; from appliance.models import ModelVariant; v = ModelVariant.objects.get(name='far-dense');"
              " print(json.dumps([v.status, dict(v.copies.values_list('node', 'state')), v.manifest]))")
    # Asked through node-1's CLI; node-3's worker copies and hashes it into node-3's store.
    first.manage("import_model", str(third.demo_dir / "demo-dense"), "--name", "far-dense", "--kind", "dense",
                 "--node", "node-3", "--wait")
    answer = first.manage("shell", "--no-imports", "-c", script).stdout.strip().splitlines()[-1]
    status, copies_on, manifest = json.loads(answer)
    assert (status, copies_on) == ("ready", {"node-3": "ready"})
    assert hash_dir(third.home / "models" / "far-dense") == manifest
    assert not (first.home / "models" / "far-dense").exists()
