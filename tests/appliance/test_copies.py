"""Each node's copy of a variant's files (appliance.copies): fetched from a node whose copy is ready, hashed against
the one manifest, moved into place only whole; an altered copy is quarantined alone; the file endpoint sends only
the manifest's files of a ready copy, and only to a signed call."""
import asyncio
import http.server
import shutil
import threading
from pathlib import Path

import pytest
from django.test import AsyncClient

from appliance import actions, copies, node_link
from appliance.incoming import INCOMING
from appliance.modelfiles import hash_dir, tree_size
from appliance.models import CopyState, DesiredState, Deployment, ModelVariant, NodeCopy, VariantStatus
from audit.models import AuditEvent
from tests.audit.tamper import wipe_ledger
from tests.livebox import free_port

NAME = "demo-dense"


@pytest.fixture
def store(settings, tmp_path) -> Path:
    settings.MODEL_STORE = tmp_path / "store-b"
    settings.APPLIANCE_NODE = "node-b"
    settings.MODEL_STORE.mkdir()
    return settings.MODEL_STORE


@pytest.fixture
def source_files(demo_dir, tmp_path) -> Path:
    """node-a's copy of the variant: the demo model's files."""
    files = tmp_path / "store-a" / NAME
    shutil.copytree(demo_dir / NAME, files)
    return files


def ready_variant(files: Path, copies_on: dict[str, str]) -> ModelVariant:
    variant = ModelVariant.objects.create(name=NAME, kind="dense", source_path=str(files), status=VariantStatus.READY,
                                          store_path=str(files), manifest=hash_dir(files), size_bytes=tree_size(files))
    for node, state in copies_on.items():
        NodeCopy.objects.create(variant=variant, node=node, state=state)
    return variant


def register(name: str, address: str) -> None:
    actions.do_register_node(name, address=address, version="0.1.0", gpus=[], memory_bytes=2**30, actor="test",
                             queue=f"q-{name}")


class Source(http.server.BaseHTTPRequestHandler):
    """node-a's file endpoint, as a node answers it (signed), sending its files, altered ones or endless bytes."""

    root = Path("/nonexistent")
    mode = "honest"

    def do_GET(self):
        from urllib.parse import unquote

        path = unquote(self.path)
        rel = path.split("/files/", 1)[1]
        body = (self.root / rel).read_bytes()
        if self.mode == "altered" and rel == "config.json":
            body = body.replace(b"}", b', "hidden": 1}', 1)
        self.send_response(200)
        for name, value in node_link.sign(node_link.ANSWER, path, b"", "node-a").items():
            self.send_header(name, value)
        if self.mode == "endless":
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                return  # the copier hung up
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def source(source_files, monkeypatch):
    monkeypatch.setattr(Source, "root", source_files)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Source)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    register("node-a", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.shutdown()
    server.server_close()


def watch_progress(monkeypatch, then=lambda: None) -> list[str]:
    """Return the list of the copy details the copier reports as progress (as stored), calling then() after each."""
    reported, record = [], actions.do_record_copy_progress

    def recorded(variant_id, *, node, detail):
        record(variant_id, node=node, detail=detail)
        reported.append(NodeCopy.objects.get(variant_id=variant_id, node=node).detail)
        then()

    monkeypatch.setattr(actions, "do_record_copy_progress", recorded)
    return reported


def nothing_partial(store: Path) -> bool:
    return not (store / NAME).exists() and not list((store / INCOMING).glob(f"{NAME}/*"))


@pytest.mark.django_db
def test_a_copy_from_a_ready_node_is_hashed_and_moved_into_place(store, source, source_files, monkeypatch):
    variant = ready_variant(source_files, {"node-a": CopyState.READY})
    NodeCopy.objects.create(variant=variant, node="node-b", state=CopyState.COPYING, detail="queued")
    monkeypatch.setattr(copies, "PROGRESS_EVERY_S", 0.0)
    reported = watch_progress(monkeypatch)
    copies.run_copy(variant.pk)
    assert reported and reported[-1].startswith("copying from node-a: ") and reported[-1].endswith("(100%)")
    assert hash_dir(store / NAME) == variant.manifest
    assert NodeCopy.objects.get(variant=variant, node="node-b").state == CopyState.READY
    event = AuditEvent.objects.filter(action="variant.copy").latest("seq")
    assert (event.outcome, event.details["copy_on"], event.details["source"]) == ("ok", "node-b", "node-a")
    assert event.details["size_bytes"] == variant.size_bytes


@pytest.mark.django_db
@pytest.mark.parametrize("mode, problem", [
    ("altered", "config.json from node node-a has sha256"),
    ("endless", "sent more than the variant's demo-dense size in all"),
])
def test_a_source_that_lies_leaves_nothing_in_the_store(store, source, source_files, monkeypatch, mode, problem):
    monkeypatch.setattr(Source, "mode", mode)
    variant = ready_variant(source_files, {"node-a": CopyState.READY})
    copies.run_copy(variant.pk)
    copy = NodeCopy.objects.get(variant=variant, node="node-b")
    assert copy.state == CopyState.FAILED and problem in copy.detail, copy.detail
    assert nothing_partial(store)
    assert AuditEvent.objects.filter(action="variant.copy").latest("seq").outcome == "failed"


@pytest.mark.django_db
def test_without_a_ready_copy_elsewhere_the_copy_fails_saying_so(store, source, source_files):
    variant = ready_variant(source_files, {"node-a": CopyState.QUARANTINED})
    copies.run_copy(variant.pk)
    copy = NodeCopy.objects.get(variant=variant, node="node-b")
    assert copy.state == CopyState.FAILED and "no other node of the appliance holds a ready copy" in copy.detail
    assert nothing_partial(store)


@pytest.mark.django_db
def test_files_already_in_a_shared_store_are_checked_instead_of_fetched(store, source_files):
    shutil.copytree(source_files, store / NAME)
    variant = ready_variant(source_files, {"node-a": CopyState.READY})
    copies.run_copy(variant.pk)
    assert NodeCopy.objects.get(variant=variant, node="node-b").state == CopyState.READY
    (store / NAME / "config.json").write_text("{}")
    copies.run_copy(variant.pk)
    assert NodeCopy.objects.get(variant=variant, node="node-b").state == CopyState.QUARANTINED


@pytest.mark.django_db
def test_an_altered_copy_is_quarantined_alone_until_no_ready_copy_is_left(store, source_files):
    variant = ready_variant(source_files, {"node-a": CopyState.READY, "node-b": CopyState.READY})
    Deployment.objects.create(variant=variant, desired=DesiredState.DEPLOYED, node="node-a", replicas=["node-b"])
    actions.do_quarantine(variant.pk, ["config.json has changed"], node="node-b", actor="test")
    variant.refresh_from_db()
    assert variant.status == VariantStatus.READY
    assert Deployment.objects.get(variant=variant).desired == DesiredState.DEPLOYED
    states = dict(variant.copies.values_list("node", "state"))
    assert states == {"node-a": CopyState.READY, "node-b": CopyState.QUARANTINED}
    event = AuditEvent.objects.filter(action="variant.quarantine").latest("seq")
    assert event.details["copy_on"] == "node-b" and event.details["variant_quarantined"] is False

    actions.do_quarantine(variant.pk, ["model.safetensors has changed"], node="node-a", actor="test")
    variant.refresh_from_db()
    assert variant.status == VariantStatus.QUARANTINED
    assert Deployment.objects.get(variant=variant).desired == DesiredState.UNDEPLOYED
    assert AuditEvent.objects.filter(action="variant.quarantine").latest("seq").details["variant_quarantined"]

    actions.do_record_verified(variant.pk, node="node-a", actor="test")
    variant.refresh_from_db()
    assert variant.status == VariantStatus.READY
    assert dict(variant.copies.values_list("node", "state"))["node-b"] == CopyState.QUARANTINED  # still altered


@pytest.mark.django_db
def test_a_deleted_variants_copy_goes_unless_a_variant_of_that_name_exists_again(store, source_files):
    shutil.copytree(source_files, store / NAME)
    copies.remove_copy(NAME)
    assert not (store / NAME).exists()
    shutil.copytree(source_files, store / NAME)
    ready_variant(source_files, {"node-a": CopyState.READY})  # imported again under the same name, on node-a
    copies.remove_copy(NAME)
    assert (store / NAME).is_dir()


@pytest.fixture
def ledger_db(transactional_db):
    """The endpoint's refusals are written by the API's ledger writer, on its own connection."""
    yield
    wipe_ledger()


def get(path: str, headers: dict):
    return asyncio.run(AsyncClient().get(path, headers=headers))


def signed_get(rel: str):
    path = copies.file_path(NAME, rel)
    return get(path, node_link.sign("GET", path, b"", "node-a"))


def test_the_file_endpoint_sends_a_ready_copys_manifest_files_to_signed_calls_only(ledger_db, settings, tmp_path,
                                                                                  source_files):
    settings.MODEL_STORE = source_files.parent
    settings.APPLIANCE_NODE = "node-b"
    (source_files.parent / "secret.txt").write_text("not a model file")
    variant = ready_variant(source_files, {"node-b": CopyState.READY})
    answer = signed_get("config.json")
    assert answer.status_code == 200
    assert b"".join(answer.streaming_content) == (source_files / "config.json").read_bytes()
    path = copies.file_path(NAME, "config.json")
    assert node_link.verify(node_link.ANSWER, path, answer.headers, b"") == "node-b"

    assert get(path, {}).status_code == 403  # unsigned
    for rel in ("../secret.txt", "config.json.bak", "/etc/passwd"):
        refused = signed_get(rel)
        assert refused.status_code == 404 and "is not a file of 'demo-dense'" in refused.json()["error"]["message"]
    NodeCopy.objects.filter(variant=variant).update(state=CopyState.QUARANTINED)
    refused = signed_get("config.json")
    assert refused.status_code == 404 and "no ready copy" in refused.json()["error"]["message"]


@pytest.mark.django_db
def test_a_node_without_the_files_asks_its_worker_for_a_copy_once_and_reports_a_failed_one(store, source_files):
    from appliance import reconciler

    register("node-b", "http://127.0.0.2:8000")
    variant = ready_variant(source_files, {"node-a": CopyState.READY})
    deployment = Deployment.objects.create(variant=variant, desired=DesiredState.DEPLOYED, node="node-b")
    reconciler.reconcile_once()
    reconciler.reconcile_once()  # the worker is at it: not asked again
    assert NodeCopy.objects.get(variant=variant, node="node-b").state == CopyState.COPYING
    queued = AuditEvent.objects.filter(action="variant.copy", outcome="queued")
    assert [e.details["copy_on"] for e in queued] == ["node-b"]
    deployment.refresh_from_db()
    assert deployment.detail == "copying the files to this node"

    actions.do_record_copy(variant.pk, node="node-b", source="node-a", problem="config.json from node node-a has "
                           "sha256 0123…", actor="test")
    reconciler.reconcile_once()
    deployment.refresh_from_db()
    assert deployment.actual == "failed" and "config.json from node node-a" in deployment.detail
    assert AuditEvent.objects.filter(action="variant.copy", outcome="queued").count() == 1


@pytest.mark.django_db
def test_an_altered_copy_is_replaced_by_a_fresh_one_when_the_administrator_asks(store, source, source_files):
    shutil.copytree(source_files, store / NAME)
    (store / NAME / "config.json").write_text("{}")
    variant = ready_variant(source_files, {"node-a": CopyState.READY})
    register("node-b", "http://127.0.0.2:8000")
    actions.do_quarantine(variant.pk, ["config.json has changed"], node="node-b", actor="test")
    deployment = Deployment.objects.create(variant=variant, desired=DesiredState.DEPLOYED, node="node-b",
                                           actual="failed", detail="config.json has changed")
    actions.do_replace_bad_copies(variant, actor="admin:root")
    assert NodeCopy.objects.get(variant=variant, node="node-b").state == CopyState.COPYING
    deployment.refresh_from_db()
    assert deployment.actual == "undeployed"  # tried again once the copy is in
    copies.run_copy(variant.pk, replace=True)  # what node-b's worker runs
    assert hash_dir(store / NAME) == variant.manifest
    assert NodeCopy.objects.get(variant=variant, node="node-b").state == CopyState.READY
    with pytest.raises(actions.ActionRefused, match="no node's copy is quarantined or failed"):
        actions.do_replace_bad_copies(variant, actor="admin:root")
    NodeCopy.objects.filter(variant=variant).update(state=CopyState.QUARANTINED)
    with pytest.raises(actions.ActionRefused, match="no node holds a ready copy to fetch from"):
        actions.do_replace_bad_copies(variant, actor="admin:root")


@pytest.mark.django_db
def test_a_replacement_comes_from_a_node_whose_heartbeat_is_late_and_the_old_copy_goes_only_once_it_is_in(
        store, source, source_files, settings, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    from appliance.models import Node, NodeState

    shutil.copytree(source_files, store / NAME)
    (store / NAME / "config.json").write_text("{}")
    variant = ready_variant(source_files, {"node-a": CopyState.READY, "node-b": CopyState.QUARANTINED})
    late = timezone.now() - timedelta(seconds=settings.NODE_STALE_AFTER * settings.NODE_HEARTBEAT_S + 1)
    Node.objects.filter(name="node-a").update(last_heartbeat=late)
    assert Node.objects.get(name="node-a").state() == NodeState.STALE  # late under load, not down

    monkeypatch.setattr(Source, "mode", "altered")  # the fetch fails: the copy it would replace stays as it was
    copies.run_copy(variant.pk, replace=True)
    copy = NodeCopy.objects.get(variant=variant, node="node-b")
    assert copy.state == CopyState.FAILED and "config.json from node node-a" in copy.detail
    assert (store / NAME / "config.json").read_text() == "{}"
    assert not list((store / INCOMING).glob(f"{NAME}/*"))

    monkeypatch.setattr(Source, "mode", "honest")
    copies.run_copy(variant.pk, replace=True)
    assert hash_dir(store / NAME) == variant.manifest
    assert NodeCopy.objects.get(variant=variant, node="node-b").state == CopyState.READY
    assert not list((store / INCOMING).glob(f"{NAME}/*"))  # the replaced copy went with its move aside


@pytest.mark.django_db
def test_a_source_whose_heartbeat_says_down_is_still_tried(store, source, source_files, settings):
    # Under load a node can miss enough beats to be counted down while it still answers (clean-clone CI: node-2's
    # replacement found no source, and the fresh copy never came).
    from datetime import timedelta

    from django.utils import timezone

    from appliance.models import Node, NodeState

    variant = ready_variant(source_files, {"node-a": CopyState.READY})
    silent = timezone.now() - timedelta(seconds=settings.NODE_DOWN_AFTER * settings.NODE_HEARTBEAT_S + 1)
    Node.objects.filter(name="node-a").update(last_heartbeat=silent)
    assert Node.objects.get(name="node-a").state() == NodeState.DOWN
    copies.run_copy(variant.pk)
    assert NodeCopy.objects.get(variant=variant, node="node-b").state == CopyState.READY
    assert hash_dir(store / NAME) == variant.manifest


@pytest.mark.django_db
def test_a_copy_waits_for_a_source_that_refuses_connections_and_takes_it_once_it_answers(
        store, source, source_files, monkeypatch):
    live = f"http://127.0.0.1:{source.server_address[1]}"
    register("node-a", f"http://127.0.0.1:{free_port()}")  # restarting: nothing listens there yet
    variant = ready_variant(source_files, {"node-a": CopyState.READY})
    NodeCopy.objects.create(variant=variant, node="node-b", state=CopyState.COPYING, detail="queued")
    monkeypatch.setattr(copies, "SOURCE_RETRY_S", 0.01)
    reported = watch_progress(monkeypatch, then=lambda: register("node-a", live))  # back up for the next round
    copies.run_copy(variant.pk)
    waits = [detail for detail in reported if detail.startswith("waiting")]
    assert len(waits) == 1 and "from node-a: " in waits[0] and "ConnectError" in waits[0], waits
    assert NodeCopy.objects.get(variant=variant, node="node-b").state == CopyState.READY
    assert hash_dir(store / NAME) == variant.manifest


@pytest.mark.django_db
def test_a_copy_whose_only_source_never_answers_fails_after_the_wait_naming_it(store, source_files, monkeypatch):
    register("node-a", f"http://127.0.0.1:{free_port()}")
    variant = ready_variant(source_files, {"node-a": CopyState.READY})
    monkeypatch.setattr(copies, "SOURCE_WAIT_S", 0.3)
    monkeypatch.setattr(copies, "SOURCE_RETRY_S", 0.05)
    copies.run_copy(variant.pk)
    copy = NodeCopy.objects.get(variant=variant, node="node-b")
    assert copy.state == CopyState.FAILED and "from node-a: " in copy.detail and "ConnectError" in copy.detail
    assert nothing_partial(store)


@pytest.mark.django_db
def test_a_copy_whose_worker_stopped_reporting_is_asked_for_again_but_a_queued_one_waits(store, source_files):
    from datetime import timedelta

    from django.utils import timezone

    from appliance import reconciler

    register("node-b", "http://127.0.0.2:8000")
    variant = ready_variant(source_files, {"node-a": CopyState.READY})
    Deployment.objects.create(variant=variant, desired=DesiredState.DEPLOYED, node="node-b")
    long_ago = timezone.now() - timedelta(seconds=copies.STALLED_AFTER_S + 1)
    NodeCopy.objects.create(variant=variant, node="node-b", state=CopyState.COPYING, detail="queued")
    NodeCopy.objects.filter(node="node-b").update(updated_at=long_ago)
    reconciler.reconcile_once()  # queued an age ago: the worker is busy, or restarted and takes it from the broker
    assert not AuditEvent.objects.filter(action="variant.copy", outcome="queued").exists()
    NodeCopy.objects.filter(node="node-b").update(detail="copying from node-a: 0.01 of 0.02 GB (50%)",
                                                  updated_at=long_ago)
    reconciler.reconcile_once()  # started, then silent: its worker died mid-copy
    assert [e.details["copy_on"] for e in AuditEvent.objects.filter(action="variant.copy", outcome="queued")] == [
        "node-b"]
    assert NodeCopy.objects.get(node="node-b").detail == "queued"


@pytest.mark.django_db
def test_a_variant_imported_on_another_node_is_deleted_from_this_one_with_its_copy_here(
        store, source_files, django_capture_on_commit_callbacks):
    shutil.copytree(source_files, store / NAME)
    variant = ready_variant(source_files, {"node-a": CopyState.READY, "node-b": CopyState.READY})
    assert not variant.store_path.startswith(str(store))  # the importing node's path, outside this node's store
    with django_capture_on_commit_callbacks(execute=True):
        actions.do_delete(variant, actor="admin:root")
    assert not ModelVariant.objects.filter(name=NAME).exists()
    assert not (store / NAME).exists() and (source_files / "config.json").is_file()  # node-a's own worker's job


@pytest.fixture
def sent_imports(monkeypatch):
    """The import tasks sent, with the queue each went to (the broker is not what these tests are about)."""
    from appliance import tasks

    sent = []
    monkeypatch.setattr(tasks.import_variant, "apply_async", lambda args, queue=None: sent.append((args, queue)))
    return sent


@pytest.mark.django_db
def test_an_import_asked_for_another_node_goes_to_that_nodes_worker(store, sent_imports,
                                                                     django_capture_on_commit_callbacks):
    register("node-a", "http://127.0.0.2:8000")
    with django_capture_on_commit_callbacks(execute=True):
        variant = actions.do_start_import(name=NAME, kind="dense", source_path="/media/usb/../usb/model",
                                          actor="admin:root", node="node-a")
    assert sent_imports == [((variant.pk,), "q-node-a")]
    assert variant.source_path == "/media/usb/model"  # as typed, normalised: node-a's worker resolves it
    event = AuditEvent.objects.filter(action="variant.import", outcome="queued").latest("seq")
    assert event.details["on_node"] == "node-a"
    with pytest.raises(actions.ActionRefused, match="as an absolute path"):
        actions.do_start_import(name="other", kind="dense", source_path="model", actor="t", node="node-a")
    with pytest.raises(actions.ActionRefused, match=r"node node-z is not a node of this appliance \(nodes: node-a\)"):
        actions.do_start_import(name="other", kind="dense", source_path="/m", actor="t", node="node-z")
    from datetime import timedelta

    from django.utils import timezone

    from appliance.models import Node
    Node.objects.filter(name="node-a").update(last_heartbeat=timezone.now() - timedelta(hours=1))
    with pytest.raises(actions.ActionRefused, match="node node-a cannot import now: it is down"):
        actions.do_start_import(name="other", kind="dense", source_path="/m", actor="t", node="node-a")


@pytest.mark.django_db
def test_the_console_imports_through_the_node_that_can_read_the_path(store, sent_imports, client,
                                                                     django_user_model,
                                                                     django_capture_on_commit_callbacks):
    from django.urls import reverse

    client.force_login(django_user_model.objects.create_superuser("root", password="a-long-password"))
    register("node-a", "http://127.0.0.2:8000")
    url = reverse("admin:appliance_modelvariant_add")
    form = client.get(url).content.decode()
    assert '<option value="node-a">node-a</option>' in form and "node-b (this node)" in form
    with django_capture_on_commit_callbacks(execute=True):
        client.post(url, {"name": NAME, "kind": "dense", "source_path": "/mnt/only-on-node-a/model",
                          "node": "node-a"})
    variant = ModelVariant.objects.get(name=NAME)
    assert sent_imports == [((variant.pk,), "q-node-a")]
    refused = client.post(url, {"name": "other", "kind": "dense", "source_path": "/mnt/not-here", "node": "node-b"})
    assert b"is not a directory or a GGUF file on this box" in refused.content
