"""Shared bits of the registry's management commands."""
import getpass
import time

from django.core.management.base import CommandError

from appliance.models import ModelVariant


def cli_actor() -> str:
    """Return the ledger actor for a command run from a shell on the box."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli:unknown"


def get_variant(name: str) -> ModelVariant:
    variant = ModelVariant.objects.filter(name=name).first()
    if variant is None:
        known = ", ".join(ModelVariant.objects.values_list("name", flat=True)) or "none"
        raise CommandError(f"no variant named {name!r} (registered: {known})")
    return variant


def wait_for(predicate, *, timeout: float, what: str, interval: float = 0.2):
    """Poll predicate until it returns a truthy value; raise CommandError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise CommandError(f"timed out after {timeout:.0f}s waiting for {what}")
