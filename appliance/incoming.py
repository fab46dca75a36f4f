"""The store's partial copies: store/.incoming/<name>/<attempt>/ holds an import attempt's files until they move
into place; nothing there is ever served."""
from pathlib import Path

from django.conf import settings

from .modelfiles import in_store, remove_in_store
from .names import is_valid_name

INCOMING = ".incoming"


def attempt_of(owner: str) -> str:
    """Return the attempt id (the name of its directory under .incoming/<name>/) from a lease owner."""
    return owner.partition(":")[0]


def discard_attempt(name: str, owner: str) -> None:
    """Remove an attempt's partial files, and .incoming/<name> once no attempt is left in it."""
    if not (is_valid_name(name) and is_valid_name(attempt_of(owner))):
        return  # nothing was written for a name the store refuses
    store = Path(settings.MODEL_STORE)
    remove_in_store(store, INCOMING, name, attempt_of(owner))
    try:
        in_store(store, INCOMING, name).rmdir()
    except OSError:
        pass  # missing, or another attempt's files are in it
