"""Beat's evidence jobs: heartbeat checkpoints, network attestations, transcript retention, exports."""
import logging
import time
from datetime import datetime

from celery import shared_task
from django.conf import settings

from audit import stored_responses
from audit.attestation import attest
from audit.checkpoints import make_checkpoint
from audit.export import export
from audit.transcripts import purge_expired

log = logging.getLogger(__name__)


@shared_task(name="audit.tasks.heartbeat_checkpoint")
def heartbeat_checkpoint() -> int:
    """Sign a checkpoint even when nothing happened, so a cut-off tail shows as a missing heartbeat."""
    checkpoint = make_checkpoint("heartbeat")
    return checkpoint.tree_size


@shared_task(name="audit.tasks.network_attestation")
def network_attestation() -> str:
    """Record the sockets of the appliance's registered processes as a signed network.attestation event."""
    event = attest()
    if event.outcome != "ok":
        log.warning("network attestation found connections outside the allowlist: %s", event.details)
    return event.outcome


@shared_task(name="audit.tasks.purge_expired_transcripts")
def purge_expired_transcripts() -> int:
    """Delete transcripts, and stored /v1/responses answers, past their team's retention period."""
    return purge_expired(actor="system:beat") + stored_responses.purge_expired(actor="system:beat")


@shared_task(name="audit.tasks.export_bundle")
def export_bundle(since: str, until: str | None, requested_by: str) -> str:
    """Write a compliance export for the period into the export directory and return its path."""
    started = time.monotonic()
    out = settings.AUDIT_EXPORT_DIR / f"audit-export-{datetime.now():%Y%m%d-%H%M%S}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    export(out, datetime.fromisoformat(since), datetime.fromisoformat(until) if until else None,
           actor=requested_by)
    log.info("export %s written in %.1f s", out, time.monotonic() - started)
    return str(out)
