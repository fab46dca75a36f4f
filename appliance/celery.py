"""The Celery app shared by the worker and beat."""
import logging
import os

from celery import Celery
from celery.signals import beat_init, worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

app = Celery("appliance")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
log = logging.getLogger(__name__)


@worker_ready.connect
def attest_worker_at_start(**kwargs) -> None:
    """Register the worker (its pool processes are its children) for network attestations, and attest now."""
    attest_at_start("worker")


@beat_init.connect
def attest_beat_at_start(**kwargs) -> None:
    """Register beat for network attestations, and attest now."""
    attest_at_start("beat")


def attest_at_start(name: str) -> None:
    """Record this process's start attestation; a failure is logged, never fatal to the process."""
    # Imported here: beat runs this before Django is set up, and the ledger needs its apps.
    import django
    from django.apps import apps

    try:
        if not apps.ready:  # the worker's Django fixup has set it up; beat has not
            django.setup()
        from audit.attestation import at_process_start

        event = at_process_start(name)
        log.info("network attestation at %s start: %s (event %s)", name, event.outcome, event.seq)
    except Exception:
        log.exception("network attestation at %s start failed", name)
