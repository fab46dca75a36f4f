"""An import's lease: claimed by one attempt, renewed while it copies, reclaimed as failed when its worker died."""
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from appliance import actions, importer
from appliance.models import ModelVariant, VariantStatus
from appliance.modelfiles import free_bytes
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db
DEAD = "0123456789abcdef:gone-host:4242"  # the lease owner of a worker that was killed


@pytest.fixture(autouse=True)
def own_store(tmp_path, settings):
    settings.MODEL_STORE = tmp_path / "models"


def queue(demo_dir, django_capture_on_commit_callbacks, name="demo-dense"):
    with django_capture_on_commit_callbacks(execute=False):
        return actions.do_start_import(name=name, kind="dense", source_path=str(demo_dir / "demo-dense"), actor="t")


def held_by_a_dead_worker(variant, settings, *, expired: bool) -> Path:
    """Make variant look like an import its worker was killed in, with partial files; return their directory."""
    when = timezone.now() + timedelta(seconds=-1 if expired else settings.IMPORT_LEASE_S)
    ModelVariant.objects.filter(pk=variant.pk).update(lease_owner=DEAD, lease_expires_at=when, progress=37)
    partial = Path(settings.MODEL_STORE) / ".incoming" / variant.name / importer.attempt_of(DEAD)
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 1000)
    return partial


def test_a_finished_import_holds_no_lease(demo_dir, django_capture_on_commit_callbacks, settings):
    variant = queue(demo_dir, django_capture_on_commit_callbacks)
    importer.run_import(variant.pk)
    variant.refresh_from_db()
    assert variant.status == VariantStatus.READY
    assert (variant.lease_owner, variant.lease_expires_at) == ("", None)
    assert not (Path(settings.MODEL_STORE) / ".incoming" / "demo-dense").exists()


def test_an_expired_lease_is_failed_with_the_reason_and_its_partial_files_removed(
        demo_dir, django_capture_on_commit_callbacks, settings):
    variant = queue(demo_dir, django_capture_on_commit_callbacks)
    partial = held_by_a_dead_worker(variant, settings, expired=True)
    assert actions.do_reclaim_stale_imports(actor=importer.ACTOR) == ["demo-dense"]
    variant.refresh_from_db()
    assert variant.status == VariantStatus.FAILED
    assert "the worker importing it (gone-host:4242) stopped: its lease expired" in variant.status_detail
    assert (variant.lease_owner, variant.progress) == ("", 0)
    assert not partial.exists() and not partial.parent.exists()
    event = AuditEvent.objects.filter(action="variant.import", target="demo-dense").order_by("-pk").first()
    assert event.outcome == "failed" and "lease expired" in event.details["reason"]


def test_a_live_lease_is_left_alone(demo_dir, django_capture_on_commit_callbacks, settings):
    variant = queue(demo_dir, django_capture_on_commit_callbacks)
    partial = held_by_a_dead_worker(variant, settings, expired=False)
    assert actions.do_reclaim_stale_imports(actor=importer.ACTOR) == []
    variant.refresh_from_db()
    assert variant.status == VariantStatus.IMPORTING and partial.exists()


def test_importing_again_reclaims_an_expired_lease_and_then_succeeds(
        demo_dir, django_capture_on_commit_callbacks, settings):
    variant = queue(demo_dir, django_capture_on_commit_callbacks)
    held_by_a_dead_worker(variant, settings, expired=True)
    again = queue(demo_dir, django_capture_on_commit_callbacks)
    assert again.pk == variant.pk and again.status == VariantStatus.IMPORTING and again.lease_owner == ""
    importer.run_import(again.pk)
    again.refresh_from_db()
    assert again.status == VariantStatus.READY


def test_an_import_held_by_a_live_attempt_is_refused_and_not_taken_over(
        demo_dir, django_capture_on_commit_callbacks, settings):
    variant = queue(demo_dir, django_capture_on_commit_callbacks)
    held_by_a_dead_worker(variant, settings, expired=False)
    with pytest.raises(actions.ActionRefused, match="already exists"):
        queue(demo_dir, django_capture_on_commit_callbacks)
    importer.run_import(variant.pk)  # a redelivered task: another attempt holds it
    variant.refresh_from_db()
    assert variant.status == VariantStatus.IMPORTING and variant.lease_owner == DEAD


def test_an_attempt_whose_lease_was_taken_away_stops_and_records_nothing(
        demo_dir, django_capture_on_commit_callbacks):
    variant = queue(demo_dir, django_capture_on_commit_callbacks)
    lease = importer.Lease(variant.pk, "aaaa:here:1")
    assert lease.claim()
    assert not importer.Lease(variant.pk, "bbbb:there:2").claim()  # one attempt at a time
    ModelVariant.objects.filter(pk=variant.pk).update(lease_owner="bbbb:there:2")
    with pytest.raises(actions.LeaseLost):
        lease.renew(progress=50)
    assert not actions.do_fail_import(variant.pk, "late", outcome="failed", owner="aaaa:here:1", actor="t")
    assert ModelVariant.objects.get(pk=variant.pk).status == VariantStatus.IMPORTING


def test_a_model_larger_than_the_free_space_is_refused_up_front_saying_both(tmp_path):
    free = free_bytes(tmp_path)
    with pytest.raises(importer.NotEnoughSpace, match=r"needs [\d.]+ GB, [\d.]+ GB free"):
        importer.check_space(free, tmp_path)
    importer.check_space(0, tmp_path)  # an empty model needs only the margin


def test_deleting_a_variant_whose_files_lie_outside_the_store_is_refused(tmp_path, settings):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    variant = ModelVariant.objects.create(name="legacy", kind="dense", source_path="/x", status=VariantStatus.READY,
                                          store_path=str(Path(settings.MODEL_STORE) / ".." / "elsewhere"))
    with pytest.raises(actions.ActionRefused, match="not inside the model store"):
        actions.do_delete(variant, actor="t")
    assert outside.is_dir() and ModelVariant.objects.filter(pk=variant.pk).exists()


def test_deleting_an_import_in_progress_removes_its_partial_files(
        demo_dir, django_capture_on_commit_callbacks, settings):
    variant = queue(demo_dir, django_capture_on_commit_callbacks)
    partial = held_by_a_dead_worker(variant, settings, expired=False)
    with django_capture_on_commit_callbacks(execute=True):
        actions.do_delete(ModelVariant.objects.get(pk=variant.pk), actor="t")
    assert not partial.exists()


def test_a_worker_that_starts_reclaims_expired_leases(demo_dir, django_capture_on_commit_callbacks, settings):
    from celery.signals import worker_ready

    variant = queue(demo_dir, django_capture_on_commit_callbacks)
    partial = held_by_a_dead_worker(variant, settings, expired=True)
    worker_ready.send(sender=None)
    assert ModelVariant.objects.get(pk=variant.pk).status == VariantStatus.FAILED
    assert not partial.exists()
