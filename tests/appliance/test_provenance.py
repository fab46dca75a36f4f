"""Provenance and lineage in the registry and the console: what an import records, parents with relations, the
signed manifest checked before a deploy, the lineage tree and the fit page's side-by-side family, and the
import form's GGUF and Ollama sources. Imports run in this process through the importer (the worker's code)."""
import hashlib
import json
from pathlib import Path

import pytest
from django.urls import reverse

from appliance import fitting, importer, reconciler
from appliance.actions import ActionRefused, do_start_import
from appliance.models import ModelVariant, VariantStatus
from appliance.provenance import verify_manifest
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db


def imported(name, source, *, kind="dense", capture, **extra) -> ModelVariant:
    with capture(execute=False):
        variant = do_start_import(name=name, kind=kind, source_path=str(source), actor="admin:alice", **extra)
    with capture(execute=False):
        importer.run_import(variant.pk)
    variant.refresh_from_db()
    assert variant.status == VariantStatus.READY, variant.status_detail
    return variant


@pytest.fixture
def family(demo_dir, django_capture_on_commit_callbacks):
    """demo-moe as the original, demo-distilled distilled from it, both imported."""
    parent = imported("orig-moe", demo_dir / "demo-moe", kind="moe", capture=django_capture_on_commit_callbacks)
    child = imported("small-distilled", demo_dir / "demo-distilled", kind="distilled",
                     capture=django_capture_on_commit_callbacks,
                     parents=[{"name": "orig-moe", "relation": "distilled_from"}],
                     provenance={"license": "mit", "upstream": {"repository": "acme/small", "revision": "abc123"}})
    return parent, child


@pytest.fixture
def console(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("alice", password="a-long-password"))
    return client


def test_an_import_records_its_source_the_admin_the_hash_of_its_files_and_its_parents(family):
    parent, child = family
    assert child.parents == [{"name": "orig-moe", "relation": "distilled_from"}]
    assert child.provenance["source_path"].endswith("demo-distilled")
    assert child.provenance["imported_by"] == "admin:alice"
    assert child.provenance["format"] == "safetensors"
    assert child.provenance["license"] == "mit"
    assert child.provenance["upstream"] == {"repository": "acme/small", "revision": "abc123"}


def test_each_import_signs_a_manifest_that_a_change_of_files_provenance_or_parents_breaks(family):
    _, child = family
    event = AuditEvent.objects.filter(action="variant.manifest", target=child.name).get()
    assert event.details["document"]["files"] == child.manifest
    assert verify_manifest(child.name, child.manifest, child.provenance, child.parents) is None
    changed = {**child.manifest, "config.json": "0" * 64}
    assert "differ from its signed manifest" in verify_manifest(child.name, changed, child.provenance, child.parents)
    assert "differ from its signed manifest" in verify_manifest(child.name, child.manifest, child.provenance, [])


def test_a_variant_whose_row_no_longer_matches_its_signed_manifest_is_not_built(family):
    _, child = family
    ModelVariant.objects.filter(pk=child.pk).update(provenance={**child.provenance, "license": "proprietary"})
    child.refresh_from_db()
    assert "differ from its signed manifest" in reconciler.refuse_before_build(child)


def test_a_parent_must_be_registered_and_a_variant_cannot_be_its_own(demo_dir):
    with pytest.raises(ActionRefused, match="parent deepseek-r1 \\(distilled_from\\) is not a registered variant"):
        do_start_import(name="x", kind="dense", source_path=str(demo_dir / "demo-dense"), actor="test",
                        parents=[{"name": "deepseek-r1", "relation": "distilled_from"}])
    with pytest.raises(ActionRefused, match="cannot be its own parent"):
        do_start_import(name="x", kind="dense", source_path=str(demo_dir / "demo-dense"), actor="test",
                        parents=[{"name": "x", "relation": "finetuned_from"}])


def test_the_console_shows_the_lineage_tree_and_the_provenance(family, console):
    parent, child = family
    page = console.get(reverse("admin:appliance_modelvariant_change", args=[child.pk])).content.decode()
    assert "orig-moe</a> — this is distilled from it" in page
    assert "upstream acme/small@abc123" in page and "imported by admin:alice" in page
    page = console.get(reverse("admin:appliance_modelvariant_change", args=[parent.pk])).content.decode()
    assert "small-distilled</a> — distilled from this" in page


def test_the_fit_page_shows_parent_and_child_side_by_side(family, console):
    parent, child = family
    for variant in (parent, child):
        fitting.run_fit(variant.pk)  # the worker's analysis for this box, run here
    page = console.get(reverse("admin:appliance_modelvariant_fit", args=[child.pk])).content.decode()
    assert "Lineage, side by side" in page
    table = page.split('<table class="lineage">', 1)[1].split("</table>", 1)[0]
    assert "this variant" in table and "parent (distilled from)" in table
    for variant in (parent, child):
        variant.refresh_from_db()
        assert f">{variant.name}</a>" in table and variant.fit.verdict in table


def test_the_import_form_takes_a_gguf_file_and_refuses_a_file_that_is_not_one(console, bundled_gguf, tmp_path,
                                                                               django_capture_on_commit_callbacks):
    url = reverse("admin:appliance_modelvariant_add")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf")
    response = console.post(url, {"name": "fake", "kind": "dense", "source_path": str(fake)})
    assert "is not a GGUF file (it does not start with the GGUF magic)" in response.content.decode()
    with django_capture_on_commit_callbacks(execute=False) as queued:
        response = console.post(url, {"name": "smol", "kind": "dense", "source_path": str(bundled_gguf),
                                      "license": "Apache-2.0"})
    assert response.status_code == 302 and len(queued) == 1
    variant = ModelVariant.objects.get(name="smol")
    assert variant.provenance["license"] == "Apache-2.0" and variant.provenance["imported_by"] == "admin:alice"


def test_the_import_form_resolves_an_ollama_model_to_its_blob(console, tmp_path, settings,
                                                              django_capture_on_commit_callbacks):
    from appliance.modelfiles import GGUF_MAGIC

    blob = GGUF_MAGIC + b"\x03\x00\x00\x00"  # resolution checks the magic; the worker (not run here) reads the rest
    digest = hashlib.sha256(blob).hexdigest()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / f"sha256-{digest}").write_bytes(blob)
    manifest = tmp_path / "manifests" / "registry.ollama.ai" / "library" / "tiny"
    manifest.mkdir(parents=True)
    (manifest / "latest").write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(blob)}]}))
    settings.OLLAMA_MODELS = str(tmp_path)
    url = reverse("admin:appliance_modelvariant_add")
    response = console.post(url, {"name": "t", "kind": "dense", "ollama_ref": "nope:1b"})
    assert "Ollama has no model nope:1b" in response.content.decode()
    with django_capture_on_commit_callbacks(execute=False):
        response = console.post(url, {"name": "tiny", "kind": "dense", "ollama_ref": "tiny"})
    assert response.status_code == 302
    variant = ModelVariant.objects.get(name="tiny")
    assert Path(variant.source_path) == (tmp_path / "blobs" / f"sha256-{digest}").resolve()
    assert variant.provenance["expected_sha256"] == digest and variant.provenance["ollama"]["ref"] == "library/tiny:latest"


def test_import_progress_says_the_phase_bytes_and_rate(demo_dir, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        variant = do_start_import(name="p", kind="dense", source_path=str(demo_dir / "demo-dense"), actor="test")
    lease = importer.Lease(variant.pk, "attempt1:host:1")
    assert lease.claim()
    lease.last = 0.0  # as if the last report were long ago
    lease.phase("copying and hashing", 0, 98)(1_500_000, 3_000_000)
    variant.refresh_from_db()
    assert variant.progress == 49
    assert variant.progress_detail.startswith("copying and hashing: 1.5 of 3.0 MB, ")
    assert variant.progress_detail.endswith(" MB/s")


def test_an_audit_export_carries_the_signed_manifests_and_verify_py_checks_them(family, tmp_path):
    from datetime import datetime, timezone

    from audit.export import export
    from audit.keys import active_key
    from audit.verifier import verify_bundle

    bundle = tmp_path / "bundle.zip"
    export(bundle, datetime(2020, 1, 1, tzinfo=timezone.utc), actor="test:auditor")
    assert verify_bundle(str(bundle), active_key().fingerprint).endswith("; 2 signed variant manifests verified")


def test_verify_py_refuses_a_manifest_event_signed_by_a_key_that_is_not_the_boxs(family, tmp_path):
    import base64
    from datetime import datetime, timezone

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from audit import ledger
    from audit.export import export
    from audit.keys import active_key
    from audit.verifier import Problem, canonical, verify_bundle
    from appliance.provenance import document_digest, manifest_document

    _, child = family
    # Someone with write access to the database appends a well-chained event claiming other files, signed
    # with a key of their own under the box's key fingerprint.
    document = manifest_document(child.name, {"model.safetensors": "0" * 64}, child.provenance, child.parents)
    forged = Ed25519PrivateKey.generate().sign(canonical(document))
    ledger.append("variant.manifest", actor="system:worker", target=child.name, details={
        "manifest_sha256": document_digest(document), "key": active_key().fingerprint,
        "signature": base64.b64encode(forged).decode(), "document": document})
    bundle = tmp_path / "bundle.zip"
    export(bundle, datetime(2020, 1, 1, tzinfo=timezone.utc), actor="test:auditor")
    with pytest.raises(Problem, match="variant manifest of small-distilled: the signature is invalid"):
        verify_bundle(str(bundle), active_key().fingerprint)
