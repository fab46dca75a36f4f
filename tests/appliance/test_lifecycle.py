"""The registry's lifecycle, run in-process (the e2e tests run the same through a real worker)."""
import pytest

from appliance import actions, importer
from appliance.models import (
    ActualState,
    ApiKey,
    DesiredState,
    InvalidTransition,
    ModelVariant,
    VariantStatus,
    hash_api_key,
)
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db


def import_now(demo_dir, django_capture_on_commit_callbacks, name="demo-dense", kind="dense", source=None):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        variant = actions.do_start_import(name=name, kind=kind, source_path=str(source or demo_dir / "demo-dense"),
                                          actor="test")
    assert len(callbacks) == 1  # the import is enqueued only after the row is committed
    importer.run_import(variant.pk)
    variant.refresh_from_db()
    return variant


def test_import_makes_the_variant_ready_with_a_manifest(demo_dir, django_capture_on_commit_callbacks, settings):
    variant = import_now(demo_dir, django_capture_on_commit_callbacks)
    assert variant.status == VariantStatus.READY
    assert variant.progress == 100
    assert variant.random_weights
    assert variant.architecture == "LlamaForCausalLM"
    assert set(variant.manifest) >= {"config.json", "model.safetensors"}
    assert variant.store_path.startswith(str(settings.MODEL_STORE))
    outcomes = list(AuditEvent.objects.filter(action="variant.import").values_list("outcome", flat=True))
    assert outcomes == ["queued", "ok"]


def test_a_second_import_of_the_same_name_is_refused(demo_dir, django_capture_on_commit_callbacks):
    import_now(demo_dir, django_capture_on_commit_callbacks)
    with pytest.raises(actions.ActionRefused, match="already exists"):
        actions.do_start_import(name="demo-dense", kind="dense", source_path=str(demo_dir / "demo-dense"),
                                actor="test")


def test_a_refused_import_is_failed_and_leaves_nothing_in_the_store(
        tmp_path, demo_dir, django_capture_on_commit_callbacks, settings):
    empty = tmp_path / "empty"
    empty.mkdir()
    variant = import_now(demo_dir, django_capture_on_commit_callbacks, name="empty", source=empty)
    assert variant.status == VariantStatus.FAILED
    assert "no config.json" in variant.status_detail
    assert not (settings.MODEL_STORE / "empty").exists()
    assert not any((settings.MODEL_STORE / ".incoming").glob("empty*"))
    assert AuditEvent.objects.filter(action="variant.import", outcome="refused", target="empty").exists()


def test_a_failed_import_can_be_retried(tmp_path, demo_dir, django_capture_on_commit_callbacks):
    empty = tmp_path / "empty"
    empty.mkdir()
    import_now(demo_dir, django_capture_on_commit_callbacks, name="retry", source=empty)
    variant = import_now(demo_dir, django_capture_on_commit_callbacks, name="retry")
    assert variant.status == VariantStatus.READY


def test_unknown_kind_is_refused(demo_dir):
    with pytest.raises(actions.ActionRefused, match="unknown kind 'huge'"):
        actions.do_start_import(name="x", kind="huge", source_path=str(demo_dir), actor="test")


def test_only_ready_variants_deploy(demo_dir, django_capture_on_commit_callbacks):
    variant = ModelVariant.objects.create(name="busy", kind="dense", source_path="/nowhere")
    with pytest.raises(actions.ActionRefused, match="importing"):
        actions.do_deploy(variant, actor="test")
    ready = import_now(demo_dir, django_capture_on_commit_callbacks)
    deployment = actions.do_deploy(ready, actor="test")
    assert deployment.desired == DesiredState.DEPLOYED
    assert deployment.actual == ActualState.UNDEPLOYED


def test_verify_quarantines_a_tampered_store_and_releases_it_when_repaired(
        demo_dir, django_capture_on_commit_callbacks):
    from pathlib import Path

    variant = import_now(demo_dir, django_capture_on_commit_callbacks)
    config = Path(variant.store_path) / "config.json"
    original = config.read_bytes()
    config.write_bytes(original + b" ")
    importer.run_verify(variant.pk)
    variant.refresh_from_db()
    assert variant.status == VariantStatus.QUARANTINED
    assert "config.json has changed" in variant.status_detail
    config.write_bytes(original)
    importer.run_verify(variant.pk)
    variant.refresh_from_db()
    assert variant.status == VariantStatus.READY


def test_the_state_machine_refuses_skipping_steps():
    variant = ModelVariant(name="x", kind="dense", status=VariantStatus.IMPORTING)
    with pytest.raises(InvalidTransition, match="from importing to deployed"):
        variant.transition(VariantStatus.DEPLOYED)


def test_api_keys_are_stored_only_as_hashes():
    team = actions.do_create_team("research", actor="test")
    key, plaintext = actions.do_issue_api_key(team, actor="test")
    row = ApiKey.objects.get(pk=key.pk)
    assert row.key_hash == hash_api_key(plaintext)
    assert plaintext not in (row.prefix, row.key_hash, row.name)
    assert plaintext.startswith(row.prefix)


def test_delete_removes_the_row_and_the_files(demo_dir, django_capture_on_commit_callbacks):
    from pathlib import Path

    variant = import_now(demo_dir, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        actions.do_delete(variant, actor="test")
    assert not ModelVariant.objects.filter(name="demo-dense").exists()
    assert not Path(variant.store_path).exists()
    assert AuditEvent.objects.filter(action="variant.delete", target="demo-dense").exists()
