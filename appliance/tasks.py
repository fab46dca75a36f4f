"""Celery tasks: thin wrappers that pass ids and reload rows in the worker."""
from celery import shared_task

from . import importer


@shared_task(acks_late=True)
def import_variant(variant_id: int) -> None:
    importer.run_import(variant_id)


@shared_task(acks_late=True)
def verify_variant(variant_id: int) -> None:
    importer.run_verify(variant_id)


@shared_task
def verify_all_variants() -> None:
    """Queue a re-hash of every stored variant (beat runs this daily)."""
    from .models import ModelVariant, VariantStatus

    for pk in ModelVariant.objects.filter(
            status__in=[VariantStatus.READY, VariantStatus.DEPLOYED, VariantStatus.QUARANTINED]
    ).values_list("pk", flat=True):
        verify_variant.delay(pk)
