"""Every state change of the registry, each atomic and each recorded in the ledger.

Views, admin actions and management commands validate their input and then
call one of these; nothing else writes registry rows.

Rows are locked FOR NO KEY UPDATE (select_for_update(no_key=True)): no action changes a key, and on PostgreSQL
a plain FOR UPDATE also blocks the foreign-key check of any row that points at the locked one. Those checks
are deferred to COMMIT, where the other transaction already holds the ledger's append lock, so a deploy
locking its variant and a fit analysis committing its report for that variant deadlocked (seen in CI).
"""
import logging
import os
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.text import slugify

from audit import ledger

from . import placement
from .incoming import discard_attempt
from .modelfiles import OutsideStore, in_store, remove_in_store, tree_size

from .models import (
    ActualState,
    ApiKey,
    ConsolePassword,
    DesiredState,
    Deployment,
    Engine,
    FitAnalysis,
    Lease,
    CopyState,
    LoginFailure,
    ModelVariant,
    Node,
    NodeCopy,
    NodeState,
    Team,
    VariantKind,
    VariantStatus,
)
from .names import NAME_MAX, check_engine_name, check_name
from .provenance import manifest_document, sign_manifest

log = logging.getLogger(__name__)
WORKER = "system:worker"  # who fails an import whose worker died: the worker's side of the lifecycle


class ActionRefused(Exception):
    """The request cannot be carried out in the registry's current state; the message says why."""


class LeaseLost(ActionRefused):
    """An import attempt no longer holds its variant: its lease expired and was reclaimed, or the variant is gone."""


def do_start_import(*, name: str, kind: str, source_path: str, actor: str, provenance: dict | None = None,
                    parents: list[dict] | None = None, node: str | None = None) -> ModelVariant:
    """Register a variant as importing and enqueue its import once the row is committed.

    provenance: what the caller knows of the origin (a license, an upstream repository, the digest a registry
    promised); what the files state is added by the worker. parents: [{"name", "relation"}] of registered
    variants (appliance.provenance.parse_parent validates each). node: the node whose worker imports it, the one
    that can read the path (default: this node); its copy is the variant's first.
    """
    check_name(name, field="variant name")
    if kind not in VariantKind.values:
        raise ActionRefused(f"unknown kind {kind!r}; expected one of {', '.join(VariantKind.values)}")
    parents = list(parents or [])
    for parent in parents:
        if parent["name"] == name:
            raise ActionRefused(f"variant {name} cannot be its own parent")
        if not ModelVariant.objects.filter(name=parent["name"]).exists():
            raise ActionRefused(f"parent {parent['name']} ({parent['relation']}) is not a registered variant; "
                                "import it first")
    remote = importing_node(node)
    if remote is None:
        # The source itself may be a link to a directory (a mount's alias): it is resolved once, here, and
        # recorded; nothing inside it may be a link (appliance.modelfiles refuses them).
        source = str(Path(source_path).expanduser().resolve())
    elif not Path(source_path).is_absolute():
        raise ActionRefused(f"give the path on node {remote.name} as an absolute path, not {source_path!r}")
    else:  # a path on another box: that node's worker resolves and checks it
        source = os.path.normpath(source_path)
    requested = {**(provenance or {}), "source_path": source, "imported_by": actor}
    do_reclaim_stale_imports(name, actor=WORKER)  # an import whose worker died is failed now, so it may be retried
    with transaction.atomic():
        variant = ModelVariant.objects.select_for_update(no_key=True).filter(name=name).first()
        if variant is None:
            variant = ModelVariant.objects.create(name=name, kind=kind, source_path=source, provenance=requested,
                                                  parents=parents)
        elif variant.status == VariantStatus.FAILED:
            variant.transition(VariantStatus.IMPORTING)
            variant.kind, variant.source_path, variant.progress = kind, source, 0
            variant.provenance, variant.parents, variant.progress_detail = requested, parents, ""
            variant.lease_owner, variant.lease_expires_at = "", None
            variant.save()
        else:
            raise ActionRefused(f"variant {name} already exists (status {variant.status})")
        ledger.append("variant.import", actor=actor, target=name, outcome="queued",
                      details={"source": source, "kind": kind, "parents": parents,
                               "on_node": remote.name if remote else settings.APPLIANCE_NODE})
        _queue_after_commit("import_variant", variant.pk, queue=remote.queue if remote else None)
    return variant


def importing_node(name: str | None) -> Node | None:
    """Return the other node that is to import a variant (registered, up, its queue known); None for this node."""
    if name in (None, "", settings.APPLIANCE_NODE):
        return None
    node = Node.objects.filter(name=name).first()
    if node is None:
        known = ", ".join(Node.objects.values_list("name", flat=True)) or "none"
        raise ActionRefused(f"node {name} is not a node of this appliance (nodes: {known})")
    if node.state() != NodeState.UP or not node.queue:
        raise ActionRefused(f"node {name} cannot import now: it is {node.state()}"
                            + ("" if node.queue else ", and has not said which queue its worker takes"))
    return node


def _queue_after_commit(task: str, variant_id: int, queue: str | None = None) -> None:
    """Queue the worker's task (a name in appliance.tasks) for variant_id once the transaction commits, on
    `queue` (another node's worker) or on this node's own."""
    # Imported here, the one deferred import of this module: tasks runs the importer and the fit advisor,
    # which record their outcomes through these actions (a real cycle).
    from . import tasks

    transaction.on_commit(lambda: getattr(tasks, task).apply_async((variant_id,), queue=queue))


def do_reclaim_stale_imports(name: str | None = None, *, actor: str) -> list[str]:
    """Fail each import whose lease expired (its worker died), removing its partial files first; return the names."""
    stale = ModelVariant.objects.filter(status=VariantStatus.IMPORTING, lease_expires_at__lt=timezone.now())
    if name is not None:
        stale = stale.filter(name=name)
    reclaimed = []
    for variant in stale:
        discard_attempt(variant.name, variant.lease_owner)
        if do_reclaim_import(variant, owner=variant.lease_owner, actor=actor):
            reclaimed.append(variant.name)
    return reclaimed


def _held(variant_id: int, owner: str) -> ModelVariant:
    """Return the variant locked for update, or raise LeaseLost unless import attempt owner still holds it."""
    variant = ModelVariant.objects.select_for_update(no_key=True).filter(pk=variant_id).first()
    if variant is None or variant.status != VariantStatus.IMPORTING or variant.lease_owner != owner:
        raise LeaseLost(f"import attempt {owner} no longer holds variant {variant_id}")
    return variant


def _end_lease(variant: ModelVariant) -> None:
    variant.lease_owner, variant.lease_expires_at = "", None


def do_finish_import(variant_id: int, *, owner: str, work: Path, final: Path, manifest: dict, summary,
                     provenance: dict, duration_ms: int, actor: str) -> None:
    """Move an import attempt's copy into place and mark the variant ready, if the attempt still holds it.

    The box signs the variant's manifest (file hashes, provenance, parents) in the same transaction: the
    signature is a ledger event, which the loader checks again before every deploy.
    """
    with transaction.atomic():
        variant = _held(variant_id, owner)
        remove_in_store(Path(settings.MODEL_STORE), str(final))  # a failed earlier attempt's leftovers
        work.replace(final)
        variant.transition(VariantStatus.READY)
        _end_lease(variant)
        variant.store_path = str(final)
        variant.manifest = manifest
        variant.size_bytes = tree_size(final)
        for field in ("architecture", "model_type", "dtype", "params_total", "params_active", "context_length",
                      "metadata"):
            setattr(variant, field, getattr(summary, field))
        variant.random_weights = bool(summary.metadata.get("random_weights"))
        variant.provenance = provenance
        variant.progress, variant.progress_detail = 100, ""
        variant.save()
        _set_copy(variant, settings.APPLIANCE_NODE, CopyState.READY, "imported here")  # this worker's node
        ledger.append("variant.import", actor=actor, target=variant.name, outcome="ok", details={
            "files": len(manifest), "size_bytes": variant.size_bytes, "params_total": summary.params_total,
            "duration_ms": duration_ms, "format": provenance.get("format", ""),
            "source_sha256": provenance.get("sha256", ""), "license": provenance.get("license", ""),
        })
        document = manifest_document(variant.name, manifest, provenance, variant.parents)
        ledger.append("variant.manifest", actor=actor, target=variant.name, outcome="ok",
                      details=sign_manifest(document))
        # The advisor's verdict belongs with every ready variant; it needs config.json only.
        _queue_after_commit("analyse_fit", variant_id)


def do_fail_import(variant_id: int, reason: str, *, outcome: str, owner: str, actor: str) -> bool:
    """Mark the import failed with reason, if attempt owner still holds it; return whether it did."""
    with transaction.atomic():
        try:
            variant = _held(variant_id, owner)
        except LeaseLost:
            return False
        _record_failure(variant, reason, outcome=outcome, actor=actor)
    return True


def do_reclaim_import(variant: ModelVariant, *, owner: str, actor: str) -> bool:
    """Mark an import failed whose worker stopped renewing its lease; return whether it was still stale."""
    with transaction.atomic():
        try:
            variant = _held(variant.pk, owner)
        except LeaseLost:
            return False
        if variant.lease_expires_at is None or variant.lease_expires_at >= timezone.now():
            return False  # renewed meanwhile: its worker is alive
        worker = owner.partition(":")[2] or "unknown"
        reason = (f"the worker importing it ({worker}) stopped: its lease expired at "
                  f"{variant.lease_expires_at.isoformat(timespec='seconds')}; partial files removed; import it "
                  "again to retry")
        _record_failure(variant, reason, outcome="failed", actor=actor)
    return True


def _record_failure(variant: ModelVariant, reason: str, *, outcome: str, actor: str) -> None:
    variant.transition(VariantStatus.FAILED, reason)
    _end_lease(variant)
    variant.progress, variant.progress_detail = 0, ""
    variant.save()
    ledger.append("variant.import", actor=actor, target=variant.name, outcome=outcome, details={"reason": reason})


def _set_copy(variant: ModelVariant, node: str, state: str, detail: str = "") -> NodeCopy:
    copy, _ = NodeCopy.objects.update_or_create(variant=variant, node=node,
                                                defaults={"state": state, "detail": detail[:2000]})
    return copy


def do_quarantine(variant_id: int, problems: list[str], *, node: str, actor: str) -> None:
    """Quarantine `node`'s copy of a variant whose files there no longer match its manifest: that node stops
    serving it. When no node has a ready copy left, the variant itself is quarantined and undeployed."""
    with transaction.atomic(durable=True):
        variant = ModelVariant.objects.select_for_update(no_key=True).get(pk=variant_id)
        _set_copy(variant, node, CopyState.QUARANTINED, "; ".join(problems))
        whole = not variant.has_ready_copy()
        if whole:
            if variant.status != VariantStatus.QUARANTINED:
                variant.transition(VariantStatus.QUARANTINED, "; ".join(problems))
                variant.save()
            Deployment.objects.filter(variant=variant).update(desired=DesiredState.UNDEPLOYED)
        ledger.append("variant.quarantine", actor=actor, target=variant.name, outcome="refused",
                      details={"copy_on": node, "variant_quarantined": whole, "problems": problems[:20]})


def do_record_verified(variant_id: int, *, node: str, actor: str) -> None:
    """Record that `node`'s copy of a variant matches its manifest; a quarantined variant is ready again."""
    with transaction.atomic(durable=True):
        variant = ModelVariant.objects.select_for_update(no_key=True).get(pk=variant_id)
        _set_copy(variant, node, CopyState.READY, "verified")
        if variant.status == VariantStatus.QUARANTINED:
            variant.transition(VariantStatus.READY)
            variant.save()
        ledger.append("variant.verify", actor=actor, target=variant.name, outcome="ok",
                      details={"copy_on": node, "files": len(variant.manifest)})


def do_request_copy(variant: ModelVariant, node: Node, *, actor: str, replace: bool = False) -> None:
    """Ask `node`'s worker to fetch a copy of the variant's files from a node whose copy is ready; with replace,
    its worker first removes the copy it holds (one quarantined as altered, or a failed one)."""
    # Imported here, as in _queue_after_commit: tasks runs the copier, which records through these actions.
    from . import tasks

    with transaction.atomic():
        _set_copy(variant, node.name, CopyState.COPYING, "queued")
        ledger.append("variant.copy", actor=actor, target=variant.name, outcome="queued",
                      details={"copy_on": node.name, "replace": replace})
        transaction.on_commit(lambda: tasks.copy_variant.apply_async((variant.pk, replace), queue=node.queue or None))


def do_replace_bad_copies(variant: ModelVariant, *, actor: str) -> None:
    """Fetch anew every node's copy of the variant that is quarantined or failed, from a node whose copy is ready
    (the quarantine's event keeps what was found altered)."""
    bad = list(variant.copies.filter(state__in=[CopyState.QUARANTINED, CopyState.FAILED])
               .values_list("node", flat=True))
    if not bad:
        raise ActionRefused(f"{variant.name}: no node's copy is quarantined or failed")
    if not variant.has_ready_copy():
        raise ActionRefused(f"{variant.name}: no node holds a ready copy to fetch from; import it again")
    with transaction.atomic():
        for node in Node.objects.filter(name__in=bad):
            do_request_copy(variant, node, actor=actor, replace=True)
        # A deployment whose load those copies refused is tried again once they are in (a replica's refusal is
        # remembered against the row's updated_at, its own node's as the row's failed state).
        for dep in Deployment.objects.filter(variant=variant, desired=DesiredState.DEPLOYED):
            if dep.node in bad and dep.actual == ActualState.FAILED:
                dep.actual, dep.detail = ActualState.UNDEPLOYED, "waiting for a fresh copy of the files"
            dep.save()


def do_record_copy_progress(variant_id: int, *, node: str, detail: str) -> None:
    """Refresh a running copy's progress (and so its liveness: the reconciler asks again for a copy whose worker
    stopped reporting); no ledger event, as for heartbeats."""
    NodeCopy.objects.filter(variant_id=variant_id, node=node, state=CopyState.COPYING).update(
        detail=detail[:2000], updated_at=timezone.now())


def do_record_copy(variant_id: int, *, node: str, source: str, problem: str = "", size_bytes: int = 0,
                   duration_ms: int = 0, actor: str) -> None:
    """Record the end of a copy to `node` from `source`: ready, or failed with the problem that stopped it."""
    with transaction.atomic():
        variant = ModelVariant.objects.filter(pk=variant_id).first()
        if variant is None:
            return  # deleted while copying; its copy's removal was queued with the delete
        state = CopyState.FAILED if problem else CopyState.READY
        _set_copy(variant, node, state, problem or f"copied from {source}")
        ledger.append("variant.copy", actor=actor, target=variant.name, outcome="failed" if problem else "ok",
                      details={"copy_on": node, "source": source, "size_bytes": size_bytes, "duration_ms": duration_ms,
                               **({"problem": problem[:500]} if problem else {})})


def do_verify(variant: ModelVariant, *, actor: str) -> None:
    """Enqueue a re-hash of the variant's files against its manifest on every node that holds a copy."""
    with transaction.atomic():
        ledger.append("variant.verify", actor=actor, target=variant.name, outcome="queued",
                      details={"nodes": sorted(copy_queues(variant))})
        queue_verification(variant)


def queue_verification(variant: ModelVariant) -> None:
    """Queue the re-hash of the variant on each node that holds a copy (once the transaction commits, if any)."""
    from . import tasks  # deferred, as in _queue_after_commit

    for queue in copy_queues(variant).values():
        transaction.on_commit(lambda queue=queue: tasks.verify_variant.apply_async((variant.pk,), queue=queue))


def copy_queues(variant: ModelVariant) -> dict[str, str | None]:
    """Return {node: its worker's queue} for the nodes that hold a copy of the variant (this node's at least: a
    variant from before copies were recorded lies in its store); None is this node's own queue."""
    nodes = set(variant.copies.exclude(state=CopyState.COPYING).values_list("node", flat=True))
    nodes.add(settings.APPLIANCE_NODE)
    queues = dict(Node.objects.filter(name__in=nodes).values_list("name", "queue"))
    return {node: (None if node == settings.APPLIANCE_NODE else queues.get(node) or None) for node in nodes}


def do_analyse_fit(variant: ModelVariant, *, actor: str) -> None:
    """Enqueue the fit advisor's analysis of the variant for this box."""
    with transaction.atomic():
        ledger.append("variant.fit", actor=actor, target=variant.name, outcome="queued")
        _queue_after_commit("analyse_fit", variant.pk)


def do_record_fit(variant: ModelVariant, summary: dict, *, duration_ms: int, actor: str) -> None:
    """Store the fit advisor's report for a variant, with its variant.fit event."""
    hardware, verdict = summary["hardware"]["label"], summary["verdict"]
    with transaction.atomic(durable=True):
        FitAnalysis.objects.update_or_create(variant=variant, defaults={
            "hardware": hardware, "context": summary["context"], "report": summary,
            "verdict": verdict["verdict"], "margin_gb": verdict["margin_gb"],
            "max_concurrent": verdict.get("max_concurrent") or 0})
        ledger.append("variant.fit", actor=actor, target=variant.name, details={
            "hardware": hardware, "context": summary["context"], "verdict": verdict["verdict"],
            "duration_ms": duration_ms})


def do_record_fit_failure(variant: ModelVariant, *, outcome: str, reason: str, duration_ms: int,
                          actor: str) -> None:
    """Record a fit analysis that was refused, failed or stopped (no report is stored)."""
    ledger.append("variant.fit", actor=actor, target=variant.name, outcome=outcome, details={
        "reason": reason[:500], "duration_ms": duration_ms})


def do_record_measurement(deployment_id: int, measured: dict) -> None:
    """Store what a loaded engine really allocated, measured in its process; the console shows it beside the
    advisor's prediction, and it is no ledger event (the deployment.load event records the load)."""
    Deployment.objects.filter(pk=deployment_id).update(measured=measured)


def do_deploy(variant: ModelVariant, *, actor: str, engine: str | None = None,
              engine_flags: list[str] | None = None, node: str | None = None,
              replicas: list[str] | None = None, parts: list[str] | None = None) -> Deployment:
    """Ask a node's web process to load the variant, on `engine` (None keeps the deployment's engine, builtin at
    first) with `engine_flags`, the fit plan as that engine's arguments (None keeps them), on `node`: a node's name
    or placement.ANYWHERE (None keeps the deployment's node, this node at first), and on each of `replicas`, other
    nodes by name that serve it too (None keeps them; [] drops them), or over `parts`, other nodes by name that
    each run a part of its one vLLM engine (None keeps them; [] drops them; engine_flags then say how).

    A running deployment keeps its engine, its node and its parts until it is undeployed: a change of any is
    refused, not applied half-way (a web process would have to unload and load it behind the administrator's
    back). Its replicas may change while it runs: a node added loads it, a node dropped unloads it.
    """
    if engine is not None:
        check_engine_name(engine)
    with transaction.atomic():
        variant = ModelVariant.objects.select_for_update(no_key=True).get(pk=variant.pk)
        if variant.status not in (VariantStatus.READY, VariantStatus.DEPLOYED):
            raise ActionRefused(f"variant {variant.name} is {variant.status}; only a ready variant can be deployed")
        deployment, _ = Deployment.objects.get_or_create(variant=variant)
        running = deployment.desired == DesiredState.DEPLOYED and deployment.actual != ActualState.FAILED
        if engine is not None and engine != deployment.engine:
            if running:
                raise ActionRefused(f"variant {variant.name} is deployed on {deployment.engine}; undeploy it "
                                    f"before deploying it on {engine}")
            deployment.engine = engine
        if engine_flags is not None:
            deployment.engine_flags = [str(flag) for flag in engine_flags]
        if node is not None or not deployment.node:
            try:
                chosen = placement.choose_node(variant, node or settings.APPLIANCE_NODE)
            except placement.PlacementRefused as exc:
                raise ActionRefused(f"deploy refused: {exc}") from exc
            if running and deployment.node and chosen != deployment.node:
                raise ActionRefused(f"variant {variant.name} is deployed on node {deployment.node}; undeploy it "
                                    f"before deploying it on {chosen}")
            deployment.node = chosen
        try:
            if replicas is not None:
                deployment.replicas = placement.choose_replicas(variant, replicas, deployment.node)
            if parts is not None:
                chosen_parts = placement.choose_replicas(variant, parts, deployment.node, role="part")
                if running and chosen_parts != deployment.parts:
                    raise ActionRefused(f"variant {variant.name} is deployed over nodes "
                                        f"{', '.join([deployment.node, *deployment.parts])}; undeploy it before "
                                        "changing its parts")
                deployment.parts = chosen_parts
        except placement.PlacementRefused as exc:
            raise ActionRefused(f"deploy refused: {exc}") from exc
        check_parts(deployment)
        deployment.desired = DesiredState.DEPLOYED
        if deployment.actual == ActualState.FAILED:
            # A new deploy is a new attempt: let the reconciler try again.
            deployment.actual, deployment.detail = ActualState.UNDEPLOYED, ""
        deployment.save()
        ledger.append("deployment.deploy", actor=actor, target=variant.name, outcome="requested",
                      details={"engine": deployment.engine, "engine_flags": deployment.engine_flags,
                               "placed_on": deployment.node, "replicas": deployment.replicas,
                               "parts": deployment.parts})
    return deployment


def check_parts(deployment: Deployment) -> None:
    """Refuse a deployment over several nodes that its engine and arguments cannot run: only vLLM's data-parallel
    mode runs one engine over several boxes, each part needs the arguments that say so, and one engine over every
    node leaves no node for a replica."""
    if not deployment.parts:
        return
    name = deployment.variant.name
    if deployment.engine != Engine.VLLM:
        raise ActionRefused(f"deploy refused: {name} runs over nodes {', '.join(deployment.parts)} as parts of one "
                            f"engine, which only vLLM's data-parallel mode does; deploy it with --engine vllm, not "
                            f"{deployment.engine}")
    if deployment.replicas:
        raise ActionRefused(f"deploy refused: {name} cannot have replicas ({', '.join(deployment.replicas)}) and "
                            "parts on other nodes at once; drop one or the other")
    flags = deployment.engine_flags
    if "--data-parallel-size-local" not in flags or "--data-parallel-address" not in flags:
        raise ActionRefused(f"deploy refused: {name}'s engine arguments do not run it over several nodes (no "
                            "--data-parallel-size-local and --data-parallel-address); deploy it with --part again")


def do_undeploy(variant: ModelVariant, *, actor: str) -> None:
    """Ask the web process to unload the variant."""
    with transaction.atomic():
        Deployment.objects.filter(variant=variant).update(desired=DesiredState.UNDEPLOYED)
        ledger.append("deployment.undeploy", actor=actor, target=variant.name, outcome="requested")


def _move_variant(name: str, frm: str, to: str) -> None:
    """Move a variant from one status to another through its transition rule (in the caller's transaction)."""
    variant = ModelVariant.objects.select_for_update(no_key=True).filter(name=name).first()
    if variant is not None and variant.status == frm:
        variant.transition(to)
        variant.save(update_fields=["status", "status_detail"])


def do_record_loading(deployment_id: int, detail: str) -> None:
    """Say what a load attempt is doing now (the console shows it); no ledger event until it ends."""
    Deployment.objects.filter(pk=deployment_id).update(actual=ActualState.LOADING, detail=detail)


def do_record_load(deployment_id: int, name: str, *, outcome: str, details: dict, actor: str, detail: str = "",
                   device: str = "", engine_process: dict | None = None, replica: bool = False,
                   part: int = 0) -> None:
    """Record how a load attempt ended, with its deployment.load event: ok (deployed), refused, failed, cancelled.

    A deployed variant moves from ready to deployed; `engine_process` (the engine process's own startup report)
    becomes that process's process.start event. A replica's load (a node other than the deployment's own), or a
    part's (`part`: its node's place among the deployment's nodes, from 1), leaves the deployment's state to its
    node: the event, which names the replica's or part's node, is its record.
    """
    actual = {"ok": ActualState.DEPLOYED, "cancelled": ActualState.UNDEPLOYED}.get(outcome, ActualState.FAILED)
    with transaction.atomic():
        if not (replica or part):
            Deployment.objects.filter(pk=deployment_id).update(actual=actual, device=device, detail=detail)
        details = {**details, **_elsewhere(replica, part)}
        if outcome == "ok" and not part:  # a part alone serves nothing: its head's load deploys the variant
            _move_variant(name, VariantStatus.READY, VariantStatus.DEPLOYED)
        if engine_process is not None:
            ledger.append("process.start", actor=f"system:engine:{name}"[:200], target=name, details=engine_process)
        ledger.append("deployment.load", actor=actor, target=name, outcome=outcome, details=details)


def do_record_unload(name: str, *, actor: str, replica: bool = False, part: int = 0) -> None:
    """Record that the web process unloaded a variant's engine: undeployed, the variant ready again (a replica's
    or a part's unload leaves both to the deployment's own node)."""
    with transaction.atomic():
        if not (replica or part):
            Deployment.objects.filter(variant__name=name).update(actual=ActualState.UNDEPLOYED, device="")
            _move_variant(name, VariantStatus.DEPLOYED, VariantStatus.READY)
        ledger.append("deployment.unload", actor=actor, target=name, outcome="ok", details=_elsewhere(replica, part))


def _elsewhere(replica: bool, part: int) -> dict:
    """Return what an engine event says of a node other than the deployment's own: a replica's, or a part's place."""
    return {"part": part} if part else {"replica": True} if replica else {}


def do_record_engine_exit(deployment_id: int, name: str, *, reason: str, pid: int, crashes: int,
                          restarts_allowed: int, window_s: int, actor: str, replica: bool = False,
                          part: int = 0) -> bool:
    """Record that a deployment's engine process ended unasked; return whether it may be started again.

    Within the restart budget the deployment goes back to loading (the reconciler starts a new process);
    past it, the deployment is failed with the reason, and the variant is no longer deployed. A replica's crash
    changes neither (the deployment's own node serves it still): the event, naming the replica's node, records it.
    When the deployment runs over several nodes, the head's or a part's end restarts the whole engine (its
    engine_epoch moves on: the head and every part start again); past the budget it is failed as a whole.
    """
    restart = crashes <= restarts_allowed
    detail = (f"restarting: the engine process {reason} (crash {crashes} of {restarts_allowed} allowed in "
              f"{window_s // 60} minutes)" if restart else
              f"failed: the engine process {reason}; {crashes} crashes in {window_s // 60} minutes, not restarted")
    if part:
        detail = f"{detail} (its part {part} on node {settings.APPLIANCE_NODE})"
    with transaction.atomic():
        if not replica:
            Deployment.objects.filter(pk=deployment_id).update(
                actual=ActualState.LOADING if restart else ActualState.FAILED, detail=detail[:500],
                engine_epoch=F("engine_epoch") + 1)
            if not restart:
                _move_variant(name, VariantStatus.DEPLOYED, VariantStatus.READY)
        ledger.append("deployment.crashed", actor=actor, target=name, outcome="restarting" if restart else "failed",
                      details={"reason": reason, "pid": pid, "crashes_in_window": crashes,
                               "restarts_allowed": restarts_allowed, "window_s": window_s,
                               **_elsewhere(replica, part)})
    return restart


def do_delete(variant: ModelVariant, *, actor: str) -> None:
    """Remove the variant from the registry and its files from every node's store (refused if the files of a
    variant from before copies were recorded lie outside this node's store)."""
    store = Path(settings.MODEL_STORE)
    store_path = variant.store_path
    if variant.copies.exists():  # this node's copy is at its name in this node's store (the path recorded is the
        local = str(in_store(store, check_name(variant.name, field="variant name")))  # importing node's)
    else:
        local = store_path
        try:
            if local:
                in_store(store, local)
        except OutsideStore as exc:
            raise ActionRefused(f"variant {variant.name} not deleted: {exc}") from exc

    def remove_files():
        try:
            if local:
                remove_in_store(store, local)
            if variant.lease_owner:  # an import in progress: its worker stops at its next renewal
                discard_attempt(variant.name, variant.lease_owner)
        except OSError:
            log.exception("removing the files of deleted variant %s failed", variant.name)

    from . import tasks  # deferred, as in _queue_after_commit

    # Every other node, not only those with a copy: a node that forwarded requests for it keeps its tokenizer.
    elsewhere = dict(Node.objects.exclude(name=settings.APPLIANCE_NODE).exclude(queue="")
                     .values_list("name", "queue"))
    with transaction.atomic():
        ledger.append("variant.delete", actor=actor, target=variant.name,
                      details={"store_path": store_path, "size_bytes": variant.size_bytes,
                               "removed_on": sorted(elsewhere)})
        variant.delete()
        # The reconciler unloads engines whose variant is gone; files go after commit, here and on every other
        # node (each node's worker removes its own).
        transaction.on_commit(remove_files)
        for queue in elsewhere.values():
            transaction.on_commit(lambda queue=queue: tasks.remove_copy.apply_async((variant.name,), queue=queue))


def do_create_team(name: str, *, actor: str) -> Team:
    """Create a team, or return the existing one of that name."""
    check_name(name, field="team name")
    with transaction.atomic():
        team, created = Team.objects.get_or_create(name=name)
        if created:
            ledger.append("team.create", actor=actor, target=name)
    return team


def do_issue_api_key(team: Team, *, actor: str, name: str = "") -> tuple[ApiKey, str]:
    """Issue a key for team; return the row and the plaintext, shown once and never stored."""
    with transaction.atomic():
        key, plaintext = ApiKey.issue(team, name=name)
        ledger.append("apikey.create", actor=actor, target=team.name, details={"key": key.prefix, "name": name})
    return key, plaintext


def do_revoke_api_key(key: ApiKey, *, actor: str) -> None:
    """Revoke a key; the next request with it is refused."""
    with transaction.atomic():
        ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        ledger.append("apikey.revoke", actor=actor, target=key.team.name, details={"key": key.prefix})


def forget_loaded_state() -> None:
    """Mark every deployment as not loaded: a process that just started holds no engines.

    Without this, rows left "deployed" by a previous web process would claim
    models are served that no process has loaded.
    """
    with transaction.atomic():
        Deployment.objects.exclude(actual=ActualState.UNDEPLOYED).update(
            actual=ActualState.UNDEPLOYED, device="", detail="")
        for variant in ModelVariant.objects.select_for_update(no_key=True).filter(status=VariantStatus.DEPLOYED):
            variant.transition(VariantStatus.READY)
            variant.save(update_fields=["status", "status_detail"])


# --- Teams, limits and console ---

def _describe(value):
    """Return value in a form the ledger's canonical JSON accepts (no floats, no datetimes)."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _apply_changes(row, values: dict, variants) -> dict:
    """Set values (and the variants list when given) on row; return {field: [old, new]} for what changed."""
    changes = {}
    for name, new in values.items():
        old = getattr(row, name)
        if old != new:
            changes[name] = [_describe(old), _describe(new)]
            setattr(row, name, new)
    if changes:
        row.save(update_fields=list(changes))
    if variants is not None:
        old = sorted(row.variants.values_list("name", flat=True))
        new = sorted(v.name for v in variants)
        if old != new:
            row.variants.set(variants)
            changes["variants"] = [old, new]
    return changes


def do_update_team(team: Team, *, actor: str, values: dict, variants=None) -> dict:
    """Change a team's access and limits in one transaction; record what changed as one ledger event."""
    allowed = {"all_variants", *Team.LIMIT_FIELDS}
    unknown = set(values) - allowed
    if unknown:
        raise ActionRefused(f"cannot change {', '.join(sorted(unknown))} of a team")
    with transaction.atomic():
        team = Team.objects.select_for_update(no_key=True).get(pk=team.pk)
        changes = _apply_changes(team, values, variants)
        if changes:
            ledger.append("team.update", actor=actor, target=team.name, details={"changes": changes})
    return changes


def do_update_api_key(key: ApiKey, *, actor: str, values: dict, variants=None) -> dict:
    """Change a key's name, expiry, variants and limits; record what changed as one ledger event."""
    allowed = {"name", "expires_at", *ApiKey.LIMIT_FIELDS}
    unknown = set(values) - allowed
    if unknown:
        raise ActionRefused(f"cannot change {', '.join(sorted(unknown))} of an API key")
    with transaction.atomic():
        key = ApiKey.objects.select_for_update(no_key=True).select_related("team").get(pk=key.pk)
        changes = _apply_changes(key, values, variants)
        if changes:
            ledger.append("apikey.update", actor=actor, target=key.team.name,
                          details={"key": key.prefix, "changes": changes})
    return changes


def do_issue_console_key(username: str, *, ttl_s: int) -> tuple[ApiKey, str]:
    """Issue a short-lived key of the user's console team for the chat page; revoke the user's older ones."""
    actor = f"admin:{username}"
    name = check_name(f"console-{slugify(username)}"[:NAME_MAX], field="console team name")
    now = timezone.now()
    with transaction.atomic():
        team, created = Team.objects.get_or_create(name=name, defaults={"console_user": username})
        if created:
            ledger.append("team.create", actor=actor, target=name, details={"console_user": username})
        replaced = list(team.api_keys.filter(revoked_at__isnull=True).values_list("prefix", flat=True))
        team.api_keys.filter(revoked_at__isnull=True).update(revoked_at=now)
        key, plaintext = ApiKey.issue(team, name="console chat", expires_at=now + timedelta(seconds=ttl_s))
        ledger.append("apikey.create", actor=actor, target=name,
                      details={"key": key.prefix, "name": key.name, "expires_at": key.expires_at.isoformat(),
                               "revoked": replaced})
    return key, plaintext


def sign_in_locked_out(username: str, address: str) -> bool:
    """Return whether recent failed sign-ins for this user name or address exceed the limits."""
    since = timezone.now() - timedelta(seconds=settings.CONSOLE_LOGIN_WINDOW_S)
    recent = LoginFailure.objects.filter(created_at__gte=since)
    return (recent.filter(username=username).count() >= settings.CONSOLE_LOGIN_MAX_FAILURES
            or recent.filter(address=address).count() >= settings.CONSOLE_LOGIN_MAX_FAILURES_PER_ADDRESS)


def do_record_sign_in_failure(username: str, address: str, *, shown: str) -> None:
    """Count a failed console sign-in and record it (and the lockout it causes) in the ledger, never the password.

    `shown` is the user name as the ledger may show it (escaped and cut by the caller).
    """
    with transaction.atomic():
        LoginFailure.objects.create(username=username, address=address)
        ledger.append("console.sign_in_failed", actor=f"sign-in:{shown}", target=shown, outcome="denied",
                      details={"address": address, "username_length": len(username)})
        if sign_in_locked_out(username, address):
            ledger.append("console.lockout", actor="anonymous", target=shown, outcome="denied",
                          details={"address": address, "window_s": settings.CONSOLE_LOGIN_WINDOW_S})


def do_clear_sign_in_failures(username: str) -> None:
    """Forget a user name's failed sign-ins once it signs in (its own lockout count starts again)."""
    LoginFailure.objects.filter(username=username).delete()


def do_record_password_change(user) -> None:
    """Remember that a console user chose their own password, with its ledger event."""
    with transaction.atomic():
        ConsolePassword.objects.update_or_create(user=user, defaults={"changed_at": timezone.now()})
        ledger.append("console.password_change", actor=f"admin:{user.get_username()}", target=user.get_username())


def do_register_node(name: str, *, address: str, version: str, gpus: list, memory_bytes: int, actor: str,
                     queue: str = "") -> Node:
    """Record that a node's web process started: its row created or refreshed, with a node.register event."""
    check_name(name, field="node name")
    now = timezone.now()
    facts = {"address": address, "version": version, "gpus": gpus, "memory_bytes": memory_bytes, "queue": queue}
    with transaction.atomic():
        node, created = Node.objects.update_or_create(
            name=name, defaults={**facts, "started_at": now, "last_heartbeat": now, "serving": [], "outstanding": 0})
        ledger.append("node.register", actor=actor, target=name, outcome="created" if created else "restarted",
                      details=facts)
    return node


def do_record_heartbeat(name: str, *, serving: list[str], outstanding: int) -> None:
    """Refresh a node's heartbeat and load; no ledger event (one every few seconds would bury the others)."""
    Node.objects.filter(name=name).update(last_heartbeat=timezone.now(), serving=serving, outstanding=outstanding)


def do_take_lease(name: str, *, holder: str, ttl_s: int) -> bool:
    """Take or renew a lease for ttl_s seconds when it is free, expired or already holder's; return whether holder
    now holds it. A change of holder is a lease.taken event; a renewal writes none."""
    now = timezone.now()
    Lease.objects.get_or_create(name=name, defaults={"holder": "", "expires_at": now})
    with transaction.atomic():
        previous = Lease.objects.select_for_update(no_key=True).filter(name=name).values_list("holder", "expires_at").get()
        # The one conditional update decides: of two contenders, the second finds the row no longer free.
        taken = Lease.objects.filter(name=name).filter(Q(holder=holder) | Q(expires_at__lte=now)).update(
            holder=holder, expires_at=now + timedelta(seconds=ttl_s)) == 1
        if taken and previous[0] != holder:
            ledger.append("lease.taken", actor=f"system:{holder}"[:200], target=name, details={
                "holder": holder, "previous_holder": previous[0], "previous_expired_at": previous[1].isoformat(),
                "ttl_s": ttl_s})
    return taken


def do_release_lease(name: str, *, holder: str) -> bool:
    """Let a lease go at once when holder holds it (a beat shutting down), so the next contender need not wait."""
    return Lease.objects.filter(name=name, holder=holder).update(expires_at=timezone.now()) == 1
