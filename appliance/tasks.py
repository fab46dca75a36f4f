"""Celery tasks: thin wrappers that pass ids and reload rows in the worker."""
import logging
from datetime import timedelta

from celery import shared_task
from celery.signals import worker_ready
from django.conf import settings
from django.utils import timezone

from . import actions, copies, fitting, importer, quotas, usage
from .models import LoginFailure, ModelVariant, VariantStatus

log = logging.getLogger(__name__)


@shared_task(acks_late=True)
def import_variant(variant_id: int) -> None:
    importer.run_import(variant_id)


@shared_task(acks_late=True)
def verify_variant(variant_id: int) -> None:
    importer.run_verify(variant_id)


@shared_task(acks_late=True)
def copy_variant(variant_id: int, replace: bool = False) -> None:
    copies.run_copy(variant_id, replace=replace)


@shared_task(acks_late=True)
def remove_copy(name: str) -> None:
    copies.remove_copy(name)


@shared_task(acks_late=True)
def analyse_fit(variant_id: int) -> None:
    fitting.run_fit(variant_id)


@shared_task
def reclaim_stale_imports() -> list[str]:
    """Fail the imports whose worker died (lease expired), removing their partial files (beat runs this)."""
    return actions.do_reclaim_stale_imports(actor=importer.ACTOR)


@worker_ready.connect
def reclaim_at_worker_start(**kwargs) -> None:
    """Reclaim stale imports when a worker starts, so a box restarted after a crash does not wait for beat."""
    try:
        actions.do_reclaim_stale_imports(actor=importer.ACTOR)
    except Exception:  # a worker that cannot reclaim still works; beat retries
        log.exception("reclaiming stale imports at worker start failed")


@shared_task
def verify_all_variants() -> None:
    """Queue a re-hash of every stored variant on every node that holds a copy (beat runs this daily)."""
    for variant in ModelVariant.objects.filter(
            status__in=[VariantStatus.READY, VariantStatus.DEPLOYED, VariantStatus.QUARANTINED]):
        actions.queue_verification(variant)


@shared_task
def roll_up_usage() -> dict:
    """Roll raw usage records up per hour and day, prune finished ones, and old counters and sign-in failures."""
    result = usage.roll_up()
    result["counters_pruned"] = quotas.prune_counters()
    cutoff = timezone.now() - timedelta(seconds=settings.CONSOLE_LOGIN_WINDOW_S)
    result["login_failures_pruned"] = LoginFailure.objects.filter(created_at__lt=cutoff).delete()[0]
    return result
