"""Make the engines of this web process match the deployments placed on this node in the registry.

Runs as one background thread of the web process, the only owner of deployments: each deployment's engine is
a child process of the web process (appliance.engine_client), the only processes that put weights on the GPUs.
Before loading it re-hashes the files, so a variant tampered with after import is quarantined instead of
served. An engine process that dies unasked is recorded and started again, a bounded number of times.
"""
import collections
import json
import logging
import threading
import time

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from audit import attestation, egress, ledger
from inference.engine import EngineConfig

from . import actions, copies, engine_client, engines, fitting, fp8, placement
from .importer import check_store, store_path
from .modelfiles import InvalidModelDir
from .models import ActualState, CopyState, DesiredState, Deployment, ModelVariant, Node, NodeCopy, VariantStatus
from .provenance import verify_manifest
from .weightcheck import check_model_dir

log = logging.getLogger(__name__)
ACTOR = "system:web"
_started = threading.Event()
_wake = threading.Event()  # set when an engine process ends, so its restart does not wait for the next tick
# Crashes of an engine process allowed within the window before its deployment is failed instead of restarted.
RESTARTS_ALLOWED = 3
RESTART_WINDOW_S = 600
_crashes: dict[str, collections.deque] = collections.defaultdict(collections.deque)


def reconcile_once() -> None:
    """Load what should be deployed on this node (as its node or a replica) and is not, unload what should not be."""
    wanted = {}
    # This node's copies found altered: their variant is not served here, whatever other nodes do.
    quarantined = set(NodeCopy.objects.filter(node=settings.APPLIANCE_NODE, state=CopyState.QUARANTINED)
                      .values_list("variant_id", flat=True))
    for dep in Deployment.objects.filter(desired=DesiredState.DEPLOYED).select_related("variant"):
        if (placement.served_by_this_node(dep) and dep.variant.status in (VariantStatus.READY, VariantStatus.DEPLOYED)
                and dep.variant_id not in quarantined):
            wanted[dep.variant.name] = dep
    for name in engine_client.names():
        if name not in wanted:
            unload(name)
        elif wanted[name].parts and _epochs.get(name, 0) < wanted[name].engine_epoch:
            # A part of its engine ended (its event says which): the head starts again, with every part. Ended
            # too by now, or not, it is no crash of its own.
            log.warning("restarting the head of %s: a part of its engine ended", name)
            engine_client.unregister(name).close()
        elif not engine_client.get(name).alive:
            restart_or_fail(wanted[name])
    for name, dep in wanted.items():
        if engine_client.get(name) is None and not failed_here(dep):
            load(dep)
    reconcile_parts(quarantined)


def is_replica(dep: Deployment) -> bool:
    """Return whether this node serves the deployment as a replica (the deployment's row is its own node's)."""
    return dep.node not in ("", settings.APPLIANCE_NODE)


# Replicas whose engine crashed past the restart budget, with the deployment's updated_at then: a new deploy
# (which saves the row) is a new attempt, as for the deployment's own node.
_replica_failed: dict[str, object] = {}


def failed_here(dep: Deployment) -> bool:
    """Return whether the deployment failed on this node and waits for a new deploy."""
    if is_replica(dep):
        return _replica_failed.get(dep.variant.name) == dep.updated_at
    return dep.actual == ActualState.FAILED


def engine_config() -> EngineConfig:
    """Return the engine settings this box's configuration asks for (see the README's table)."""
    return EngineConfig(device=settings.ENGINE_DEVICE, queue_limit=settings.ENGINE_QUEUE_LIMIT,
                        kv_budget_bytes=settings.ENGINE_KV_BUDGET_BYTES, threads=settings.ENGINE_THREADS,
                        exact=settings.ENGINE_EXACT, precision=settings.ENGINE_PRECISION)


def crashes_in_window(key: str) -> int:
    """Count one more crash of an engine process (key: its variant, or its variant's part) and return how many fell
    within the restart window."""
    now = time.monotonic()
    crashes = _crashes[key]
    crashes.append(now)
    while crashes and now - crashes[0] > RESTART_WINDOW_S:
        crashes.popleft()
    return len(crashes)


def restart_or_fail(dep: Deployment) -> None:
    """Record an engine process that ended unasked; the next load starts it again unless it crashes too often."""
    name = dep.variant.name
    client = engine_client.unregister(name)
    restart = actions.do_record_engine_exit(dep.pk, name, reason=client.exit_reason, pid=client.pid,
                                            crashes=crashes_in_window(name), restarts_allowed=RESTARTS_ALLOWED,
                                            window_s=RESTART_WINDOW_S, actor=ACTOR, replica=is_replica(dep))
    dep.refresh_from_db()
    if not restart:
        _crashes[name].clear()  # a new deploy is a new attempt with a fresh budget
        if is_replica(dep):
            _replica_failed[name] = dep.updated_at


def load(dep: Deployment) -> None:
    """Verify, bound and load a deployment's variant; drop the engine if it was undeployed while building."""
    variant = dep.variant
    if not files_here(dep, record_load):
        return
    if not is_replica(dep):  # the row's state is its own node's
        actions.do_record_loading(dep.pk, "verifying files")
    if not files_intact(dep, record_load):
        return
    try:
        # A variant imported before the weight checks existed may still lie; a build cannot be stopped.
        check_model_dir(store_path(variant.name))
        refusal = refuse_before_build(variant)
    except InvalidModelDir as exc:
        refusal = str(exc)
    if refusal:
        record_load(dep, "refused", detail=f"refused: {refusal}", details={"reason": refusal[:500]})
        return
    started = time.monotonic()
    try:
        engine = engines.start(dep, engine_config())
    except Exception as exc:
        log.exception("loading %s failed", variant.name)
        record_load(dep, "failed", detail=f"load failed: {exc}", details={"error": str(exc)[:500]})
        return
    duration_ms = int((time.monotonic() - started) * 1000)
    if not still_wanted(dep):
        # Undeploy or delete arrived while the build ran (this thread cannot see it until now): drop it at once.
        engine.close()
        record_load(dep, "cancelled", details={"reason": "undeployed or deleted while loading",
                                               "duration_ms": duration_ms})
        return
    engine_client.register(variant.name, engine)
    _epochs[variant.name] = dep.engine_epoch
    record_load(dep, "ok", device=engine.device, engine_process=engine.process_report,
                details={"device": engine.device, "pid": engine.pid, "duration_ms": duration_ms,
                         "engine": engine.engine})
    if is_replica(dep):
        _replicas.add(variant.name)
    else:
        fitting.record_measurement(dep.pk, engine.measured)


def files_intact(dep: Deployment, record) -> bool:
    """Re-hash this node's copy of the deployment's variant; on a mismatch quarantine it here, record the load as
    refused with `record` (record_load or record_part) and return False."""
    variant = dep.variant
    problems = check_store(variant)
    if problems:
        actions.do_quarantine(variant.pk, problems, node=settings.APPLIANCE_NODE, actor=ACTOR)
        record(dep, "refused", detail="; ".join(problems),
               details={"reason": "files do not match the manifest", "problems": problems[:20]})
        return False
    if not variant.has_ready_copy(settings.APPLIANCE_NODE):
        # Files this node holds without a record (a shared store, or a store from before copies were recorded):
        # the hash above proved them, so they are this node's ready copy.
        actions.do_record_verified(variant.pk, node=settings.APPLIANCE_NODE, actor=ACTOR)
    return True


def files_here(dep: Deployment, record) -> bool:
    """Return whether this node's store holds the variant's files; if not, see that its worker fetches a copy from
    a node that has one (appliance.copies), and record why the deployment waits or cannot load here (with
    `record`: record_load, or record_part for a part)."""
    variant = dep.variant
    copy = variant.copies.filter(node=settings.APPLIANCE_NODE).first()
    if copy is not None and copy.state == CopyState.COPYING and not stalled(copy):
        return False  # this node's worker is fetching it (or replacing the copy there), or will once free
    if store_path(variant.name).is_dir():  # a copy moves into place whole, so a directory there is complete
        return True
    if copy is not None and copy.state == CopyState.FAILED and copy.updated_at >= dep.updated_at:
        record(dep, "refused", detail=f"no copy of the files on this node: {copy.detail}",
               details={"reason": "copying the files to this node failed", "problem": copy.detail[:500]})
        return False
    node = Node.objects.filter(name=settings.APPLIANCE_NODE).first()
    if node is None:
        return False  # not registered yet: its worker's queue is not known
    actions.do_request_copy(variant, node, actor=ACTOR)
    if not is_replica(dep):
        actions.do_record_loading(dep.pk, "copying the files to this node")
    return False


def stalled(copy: NodeCopy) -> bool:
    """Return whether a started copy stopped reporting progress: its worker was killed mid-copy. (One still queued
    waits for the worker, which takes it when free or, restarted, from the broker.)"""
    age_s = (timezone.now() - copy.updated_at).total_seconds()
    return copy.detail != "queued" and age_s > copies.STALLED_AFTER_S


# The variants this node loaded as a replica, so that their unload, too, leaves the deployment's row alone.
_replicas: set[str] = set()
# The engine_epoch each engine here was started in: a deployment over several nodes restarts as a whole.
_epochs: dict[str, int] = {}


def record_load(dep: Deployment, outcome: str, **record) -> None:
    """Record a load attempt's end (actions.do_record_load); a replica that could not load waits for a new deploy
    instead of trying again every tick (its failure is not in the row, which is its deployment's own node's)."""
    replica = is_replica(dep)
    actions.do_record_load(dep.pk, dep.variant.name, outcome=outcome, actor=ACTOR, replica=replica, **record)
    if replica and outcome in ("refused", "failed"):
        _replica_failed[dep.variant.name] = dep.updated_at


def refuse_before_build(variant: ModelVariant) -> str | None:
    """Return why the variant must not be built here: a signed manifest that does not verify, FP8 on a box that
    cannot run it; None when nothing stands in the way."""
    if variant.provenance:  # variants imported before manifests were signed carry no provenance
        problem = verify_manifest(variant.name, variant.manifest, variant.provenance, variant.parents)
        if problem:
            return problem
    config = json.loads((store_path(variant.name) / "config.json").read_text(encoding="utf-8"))
    if fp8.fp8_scheme(config) is None:
        return None
    return fp8.deploy_refusal(config, fp8.serving_device(settings.ENGINE_DEVICE))


def still_wanted(dep: Deployment) -> bool:
    """Return whether the registry still asks for this deployment's variant to be served here."""
    now = Deployment.objects.filter(pk=dep.pk, desired=DesiredState.DEPLOYED, variant__status__in=(
        VariantStatus.READY, VariantStatus.DEPLOYED)).first()
    return now is not None and placement.served_by_this_node(now)


def unload(name: str) -> None:
    engine = engine_client.unregister(name)
    if engine is None:
        return
    engine.close()
    actions.do_record_unload(name, actor=ACTOR, replica=name in _replicas)
    _replicas.discard(name)


# This node's parts of deployments over several boxes (vLLM's headless data-parallel ranks), by variant name, with
# the node's place among the deployment's nodes: they serve no API, so they are not among engine_client's engines
# (which the heartbeat reports as what this node serves, and the API routes to).
_parts: dict[str, tuple[object, int, int]] = {}  # name -> (the part, its place, the engine_epoch it started in)
# Parts that could not start or crashed past the restart budget, with the deployment's updated_at then.
_part_failed: dict[str, object] = {}


def part_place(dep: Deployment) -> int:
    """Return this node's place among the nodes of a deployment over several boxes (the head is 0)."""
    return 1 + dep.parts.index(settings.APPLIANCE_NODE)


def reconcile_parts(quarantined: set[int]) -> None:
    """Start this node's parts of deployments over several boxes, stop those no longer asked for, and record and
    restart (within the budget) those that ended unasked."""
    wanted = {dep.variant.name: dep for dep in Deployment.objects.filter(desired=DesiredState.DEPLOYED)
              .exclude(actual=ActualState.FAILED).select_related("variant")  # failed as a whole: parts stop too
              if settings.APPLIANCE_NODE in dep.parts and dep.variant_id not in quarantined
              and dep.variant.status in (VariantStatus.READY, VariantStatus.DEPLOYED)}
    for name, (part, place, epoch) in list(_parts.items()):
        if name not in wanted:
            unload_part(name)
        elif epoch < wanted[name].engine_epoch:
            # The head or another part ended (its event says which): this part starts again with them. Ended too
            # by now, or not, it is no crash of its own.
            log.warning("restarting the part of %s: its engine restarts", name)
            del _parts[name]
            part.close()
        elif not part.alive:
            del _parts[name]
            dep = wanted[name]
            restart = actions.do_record_engine_exit(
                dep.pk, name, reason=part.exit_reason, pid=part.pid, crashes=crashes_in_window(f"{name} part"),
                restarts_allowed=RESTARTS_ALLOWED, window_s=RESTART_WINDOW_S, actor=ACTOR, part=place)
            dep.refresh_from_db()  # its engine_epoch moved on: what the part starts again in
            if not restart:
                _crashes[f"{name} part"].clear()
                _part_failed[name] = dep.updated_at
    for name, dep in wanted.items():
        if name not in _parts and _part_failed.get(name) != dep.updated_at:
            load_part(dep)


def load_part(dep: Deployment) -> None:
    """Verify this node's copy of the files and start its part of the deployment's engine."""
    name = dep.variant.name
    if not files_here(dep, record_part) or not files_intact(dep, record_part):
        return
    dep.refresh_from_db()  # the engine_epoch it starts in: a restart of the engine meanwhile is then seen
    refusal = refuse_before_build(dep.variant)  # a part loads the weights as its head does: the same checks
    if refusal:
        record_part(dep, "refused", details={"reason": refusal[:500]})
        return
    started = time.monotonic()
    try:
        part = engines.start_part(dep)
    except Exception as exc:
        log.exception("starting the part of %s failed", name)
        record_part(dep, "failed", details={"error": str(exc)[:500]})
        return
    now = Deployment.objects.filter(pk=dep.pk, desired=DesiredState.DEPLOYED).first()
    if now is None or settings.APPLIANCE_NODE not in now.parts:
        part.close()
        record_part(dep, "cancelled", details={"reason": "undeployed or deleted while starting"})
        return
    _parts[name] = (part, part_place(dep), dep.engine_epoch)
    record_part(dep, "ok", engine_process=part.process_report,
                details={"device": part.device, "pid": part.pid, "engine": part.engine, "head": dep.node,
                         "duration_ms": int((time.monotonic() - started) * 1000)})


def record_part(dep: Deployment, outcome: str, detail: str = "", **record) -> None:
    """Record how starting this node's part ended; one that could not start waits for a new deploy."""
    actions.do_record_load(dep.pk, dep.variant.name, outcome=outcome, actor=ACTOR, part=part_place(dep), **record)
    if outcome in ("refused", "failed"):
        _part_failed[dep.variant.name] = dep.updated_at


def unload_part(name: str) -> None:
    part, place, _ = _parts.pop(name)
    part.close()
    actions.do_record_unload(name, actor=ACTOR, part=place)


def _loop() -> None:
    while True:
        try:
            close_old_connections()
            reconcile_once()
        except Exception:
            log.exception("reconcile failed; retrying")
        _wake.wait(settings.RECONCILE_INTERVAL_S)
        _wake.clear()


def start() -> None:
    """Start the reconciler thread once per process."""
    if _started.is_set():
        return
    _started.set()
    engine_client.on_engine_gone(lambda client: _wake.set())
    actions.forget_loaded_state()
    # Evidence for the auditor: the guard's allowlist and the offline values the
    # Hugging Face libraries (imported by the engine above) actually read.
    ledger.append("process.start", actor=ACTOR, details=egress.startup_report())
    attestation.at_process_start("web")  # registers web (and its engines) for beat's attestations too
    threading.Thread(target=_loop, name="reconciler", daemon=True).start()
