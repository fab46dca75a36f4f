"""Worker-side lifecycle jobs: import a variant into the store, verify its files."""
import logging
import os
import time
from pathlib import Path

from django.conf import settings
from django.db import transaction

from audit import ledger

from .modelfiles import (
    InvalidModelDir,
    copy_and_hash,
    hash_dir,
    manifest_mismatches,
    remove_tree,
    summarize,
    validate_model_dir,
)
from .models import DesiredState, Deployment, ModelVariant, VariantStatus

log = logging.getLogger(__name__)
ACTOR = "system:worker"
PROGRESS_EVERY_S = 0.5


def run_import(variant_id: int) -> None:
    """Copy, hash and inspect a variant's source directory, then mark it ready (or failed)."""
    variant = ModelVariant.objects.filter(pk=variant_id, status=VariantStatus.IMPORTING).first()
    if variant is None:
        return  # deleted meanwhile, or a redelivered task whose work is done
    started = time.monotonic()
    store = Path(settings.MODEL_STORE)
    incoming = store / ".incoming" / variant.name
    final = store / variant.name
    # A worker killed mid-copy leaves a partial directory; it is never reused.
    remove_tree(incoming)
    try:
        config = validate_model_dir(Path(variant.source_path))
        manifest = copy_and_hash(Path(variant.source_path), incoming, _progress_reporter(variant_id))
        summary = summarize(incoming, config)
        remove_tree(final)
        os.replace(incoming, final)
    except InvalidModelDir as exc:
        _fail(variant_id, str(exc), outcome="refused")
        return
    except Exception as exc:
        log.exception("import of %s failed", variant.name)
        _fail(variant_id, f"import failed: {exc}", outcome="failed")
        return
    finally:
        remove_tree(incoming)
    with transaction.atomic():
        variant = ModelVariant.objects.select_for_update().get(pk=variant_id)
        variant.transition(VariantStatus.READY)
        variant.store_path = str(final)
        variant.manifest = manifest
        variant.size_bytes = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
        variant.architecture = summary.architecture
        variant.model_type = summary.model_type
        variant.dtype = summary.dtype
        variant.params_total = summary.params_total
        variant.params_active = summary.params_active
        variant.context_length = summary.context_length
        variant.metadata = summary.metadata
        variant.random_weights = bool(summary.metadata.get("random_weights"))
        variant.progress = 100
        variant.save()
        ledger.append("variant.import", actor=ACTOR, target=variant.name, outcome="ok", details={
            "files": len(manifest), "size_bytes": variant.size_bytes, "params_total": summary.params_total,
            "duration_ms": int((time.monotonic() - started) * 1000),
        })
        # The advisor's verdict belongs with every ready variant; it needs config.json only.
        from .tasks import analyse_fit  # tasks imports this module

        transaction.on_commit(lambda: analyse_fit.delay(variant_id))


def _progress_reporter(variant_id: int):
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            ModelVariant.objects.filter(pk=variant_id).update(progress=min(99, done * 100 // total))

    return report


def _fail(variant_id: int, message: str, *, outcome: str) -> None:
    with transaction.atomic():
        variant = ModelVariant.objects.select_for_update().get(pk=variant_id)
        variant.transition(VariantStatus.FAILED, message)
        variant.progress = 0
        variant.save()
        ledger.append("variant.import", actor=ACTOR, target=variant.name, outcome=outcome,
                      details={"reason": message})


def check_store(variant: ModelVariant) -> list[str]:
    """Return how the variant's stored files differ from its manifest (empty when intact)."""
    if not variant.store_path or not Path(variant.store_path).is_dir():
        return [f"store directory {variant.store_path or '(none)'} is missing"]
    return manifest_mismatches(variant.manifest, hash_dir(Path(variant.store_path)))


def quarantine(variant_id: int, problems: list[str], *, actor: str) -> None:
    """Mark a variant whose files no longer match its manifest; it will not be loaded."""
    with transaction.atomic():
        variant = ModelVariant.objects.select_for_update().get(pk=variant_id)
        if variant.status != VariantStatus.QUARANTINED:
            variant.transition(VariantStatus.QUARANTINED, "; ".join(problems))
            variant.save()
        Deployment.objects.filter(variant=variant).update(desired=DesiredState.UNDEPLOYED)
        ledger.append("variant.quarantine", actor=actor, target=variant.name, outcome="refused",
                      details={"problems": problems[:20]})


def run_verify(variant_id: int) -> None:
    """Re-hash a variant's store; quarantine it on mismatch, release it from quarantine when intact."""
    variant = ModelVariant.objects.filter(pk=variant_id).first()
    if variant is None or variant.status in (VariantStatus.IMPORTING, VariantStatus.FAILED):
        return
    problems = check_store(variant)
    if problems:
        quarantine(variant_id, problems, actor=ACTOR)
        return
    with transaction.atomic():
        variant = ModelVariant.objects.select_for_update().get(pk=variant_id)
        if variant.status == VariantStatus.QUARANTINED:
            variant.transition(VariantStatus.READY)
            variant.save()
        ledger.append("variant.verify", actor=ACTOR, target=variant.name, outcome="ok",
                      details={"files": len(variant.manifest)})
