"""Shared bits of the registry's management commands."""
import getpass
import time
from contextlib import contextmanager

from django.core.management.base import CommandError

from appliance.actions import ActionRefused
from appliance.models import ModelVariant
from appliance.names import InvalidName, check_name


def cli_actor() -> str:
    """Return the ledger actor for a command run from a shell on the box."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli:unknown"


@contextmanager
def refusals_as_errors():
    """Turn a refused name or action into a CommandError (its message on stderr, exit status 1)."""
    try:
        yield
    except (ActionRefused, InvalidName) as exc:
        raise CommandError(str(exc)) from exc


def get_variant(name: str) -> ModelVariant:
    """Return the variant of that name, or raise CommandError naming a bad or unknown name."""
    with refusals_as_errors():
        check_name(name, field="variant name")
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
