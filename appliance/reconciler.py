"""Make the engines loaded in this web process match the deployments in the registry.

Runs as one background thread of the web process, the only process that puts
weights on the GPUs. Before loading it re-hashes the files, so a variant
tampered with after import is quarantined instead of served.
"""
import logging
import threading
import time
from pathlib import Path

from django.conf import settings
from django.db import close_old_connections, transaction

from audit import attestation, egress, ledger
from appliance import engine_client
from inference.engine import Engine

from . import actions, fitting
from .importer import check_store, quarantine
from .modelfiles import InvalidModelDir
from .models import ActualState, DesiredState, Deployment, ModelVariant, VariantStatus
from .weightcheck import check_model_dir

log = logging.getLogger(__name__)
ACTOR = "system:web"
_started = threading.Event()


def reconcile_once() -> None:
    """Load what should be deployed and is not, unload what should not be."""
    wanted = {}
    for dep in Deployment.objects.select_related("variant"):
        if dep.desired == DesiredState.DEPLOYED and dep.variant.status in (VariantStatus.READY, VariantStatus.DEPLOYED):
            wanted[dep.variant.name] = dep
    for name in engine_client.names():
        if name not in wanted:
            unload(name)
    for name, dep in wanted.items():
        if engine_client.get(name) is None and dep.actual != ActualState.FAILED:
            load(dep)


def engine_options() -> dict:
    """Return the Engine settings this box's configuration asks for (see the README's table)."""
    return dict(device=settings.ENGINE_DEVICE, queue_limit=settings.ENGINE_QUEUE_LIMIT,
                kv_budget_bytes=settings.ENGINE_KV_BUDGET_BYTES, threads=settings.ENGINE_THREADS,
                exact=settings.ENGINE_EXACT)


def load(dep: Deployment) -> None:
    """Verify, bound and load a deployment's variant; drop the engine if it was undeployed while building."""
    variant = dep.variant
    Deployment.objects.filter(pk=dep.pk).update(actual=ActualState.LOADING, detail="verifying files")
    problems = check_store(variant)
    if problems:
        quarantine(variant.pk, problems, actor=ACTOR)
        Deployment.objects.filter(pk=dep.pk).update(actual=ActualState.FAILED, detail="; ".join(problems))
        ledger.append("deployment.load", actor=ACTOR, target=variant.name, outcome="refused",
                      details={"reason": "files do not match the manifest", "problems": problems[:20]})
        return
    try:
        # A variant imported before the weight checks existed may still lie; a build cannot be stopped.
        check_model_dir(Path(variant.store_path))
    except InvalidModelDir as exc:
        Deployment.objects.filter(pk=dep.pk).update(actual=ActualState.FAILED, detail=f"refused: {exc}")
        ledger.append("deployment.load", actor=ACTOR, target=variant.name, outcome="refused",
                      details={"reason": str(exc)[:500]})
        return
    started = time.monotonic()
    try:
        engine = Engine(Path(variant.store_path), **engine_options())
    except Exception as exc:
        log.exception("loading %s failed", variant.name)
        Deployment.objects.filter(pk=dep.pk).update(actual=ActualState.FAILED, detail=f"load failed: {exc}")
        ledger.append("deployment.load", actor=ACTOR, target=variant.name, outcome="failed",
                      details={"error": str(exc)[:500]})
        return
    if not still_wanted(dep):
        # Undeploy or delete arrived while the build ran (this thread cannot see it until now): drop it at once.
        engine.close()
        Deployment.objects.filter(pk=dep.pk).update(actual=ActualState.UNDEPLOYED, device="", detail="")
        ledger.append("deployment.load", actor=ACTOR, target=variant.name, outcome="cancelled", details={
            "reason": "undeployed or deleted while loading",
            "duration_ms": int((time.monotonic() - started) * 1000)})
        return
    engine_client.register(variant.name, engine)
    with transaction.atomic():
        Deployment.objects.filter(pk=dep.pk).update(actual=ActualState.DEPLOYED, device=engine.device, detail="")
        ModelVariant.objects.filter(pk=variant.pk, status=VariantStatus.READY).update(status=VariantStatus.DEPLOYED)
        ledger.append("deployment.load", actor=ACTOR, target=variant.name, outcome="ok", details={
            "device": engine.device, "duration_ms": int((time.monotonic() - started) * 1000)})
    try:
        fitting.measure_deployment(dep.pk, engine)
    except Exception:
        # A measurement is evidence for the console, never a reason to stop engine_client.
        log.exception("measuring %s failed", variant.name)


def still_wanted(dep: Deployment) -> bool:
    """Return whether the registry still asks for this deployment's variant to be served."""
    return Deployment.objects.filter(pk=dep.pk, desired=DesiredState.DEPLOYED, variant__status__in=(
        VariantStatus.READY, VariantStatus.DEPLOYED)).exists()


def unload(name: str) -> None:
    engine = engine_client.unregister(name)
    if engine is None:
        return
    engine.close()
    with transaction.atomic():
        Deployment.objects.filter(variant__name=name).update(actual=ActualState.UNDEPLOYED, device="")
        ModelVariant.objects.filter(name=name, status=VariantStatus.DEPLOYED).update(status=VariantStatus.READY)
        ledger.append("deployment.unload", actor=ACTOR, target=name, outcome="ok")


def _loop() -> None:
    while True:
        try:
            close_old_connections()
            reconcile_once()
        except Exception:
            log.exception("reconcile failed; retrying")
        time.sleep(settings.RECONCILE_INTERVAL_S)


def start() -> None:
    """Start the reconciler thread once per process."""
    if _started.is_set():
        return
    _started.set()
    actions.forget_loaded_state()
    # Evidence for the auditor: the guard's allowlist and the offline values the
    # Hugging Face libraries (imported by the engine above) actually read.
    ledger.append("process.start", actor=ACTOR, details=egress.startup_report())
    attestation.at_process_start("web")  # registers web (and its engines) for beat's attestations too
    threading.Thread(target=_loop, name="reconciler", daemon=True).start()
