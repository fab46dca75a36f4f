"""Every state change of the registry, each atomic and each recorded in the ledger.

Views, admin actions and management commands validate their input and then
call one of these; nothing else writes registry rows.
"""
from pathlib import Path

from django.db import transaction

from audit import ledger

from .models import (
    ActualState,
    ApiKey,
    DesiredState,
    Deployment,
    ModelVariant,
    Team,
    VariantKind,
    VariantStatus,
)


class ActionRefused(Exception):
    """The request cannot be carried out in the registry's current state; the message says why."""


def do_start_import(*, name: str, kind: str, source_path: str, actor: str) -> ModelVariant:
    """Register a variant as importing and enqueue its import once the row is committed."""
    from .tasks import import_variant

    if kind not in VariantKind.values:
        raise ActionRefused(f"unknown kind {kind!r}; expected one of {', '.join(VariantKind.values)}")
    source = str(Path(source_path).expanduser().resolve())
    with transaction.atomic():
        variant = ModelVariant.objects.select_for_update().filter(name=name).first()
        if variant is None:
            variant = ModelVariant.objects.create(name=name, kind=kind, source_path=source)
        elif variant.status == VariantStatus.FAILED:
            variant.transition(VariantStatus.IMPORTING)
            variant.kind, variant.source_path, variant.progress = kind, source, 0
            variant.save()
        else:
            raise ActionRefused(f"variant {name} already exists (status {variant.status})")
        ledger.append("variant.import", actor=actor, target=name, outcome="queued",
                      details={"source": source, "kind": kind})
        transaction.on_commit(lambda: import_variant.delay(variant.pk))
    return variant


def do_verify(variant: ModelVariant, *, actor: str) -> None:
    """Enqueue a re-hash of the variant's stored files against its manifest."""
    from .tasks import verify_variant

    with transaction.atomic():
        ledger.append("variant.verify", actor=actor, target=variant.name, outcome="queued")
        transaction.on_commit(lambda: verify_variant.delay(variant.pk))


def do_deploy(variant: ModelVariant, *, actor: str) -> Deployment:
    """Ask the web process to load the variant."""
    with transaction.atomic():
        variant = ModelVariant.objects.select_for_update().get(pk=variant.pk)
        if variant.status not in (VariantStatus.READY, VariantStatus.DEPLOYED):
            raise ActionRefused(f"variant {variant.name} is {variant.status}; only a ready variant can be deployed")
        deployment, _ = Deployment.objects.get_or_create(variant=variant)
        deployment.desired = DesiredState.DEPLOYED
        if deployment.actual == ActualState.FAILED:
            # A new deploy is a new attempt: let the reconciler try again.
            deployment.actual, deployment.detail = ActualState.UNDEPLOYED, ""
        deployment.save()
        ledger.append("deployment.deploy", actor=actor, target=variant.name, outcome="requested")
    return deployment


def do_undeploy(variant: ModelVariant, *, actor: str) -> None:
    """Ask the web process to unload the variant."""
    with transaction.atomic():
        Deployment.objects.filter(variant=variant).update(desired=DesiredState.UNDEPLOYED)
        ledger.append("deployment.undeploy", actor=actor, target=variant.name, outcome="requested")


def do_delete(variant: ModelVariant, *, actor: str) -> None:
    """Remove the variant from the registry and its files from the store."""
    from .modelfiles import remove_tree

    store_path = variant.store_path
    with transaction.atomic():
        ledger.append("variant.delete", actor=actor, target=variant.name,
                      details={"store_path": store_path, "size_bytes": variant.size_bytes})
        variant.delete()
        # The reconciler unloads engines whose variant is gone; files go after commit.
        if store_path:
            transaction.on_commit(lambda: remove_tree(Path(store_path)))


def do_create_team(name: str, *, actor: str) -> Team:
    """Create a team, or return the existing one of that name."""
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
    from django.utils import timezone

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
        ModelVariant.objects.filter(status=VariantStatus.DEPLOYED).update(status=VariantStatus.READY)
