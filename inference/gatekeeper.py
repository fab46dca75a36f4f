"""What the chat API needs to know about callers and variants, without importing the registry.

`inference` may not import `appliance` (dependencies point one way), so the
registry plugs its implementation in through settings.INFERENCE_GATEKEEPER.
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from django.conf import settings
from django.utils.module_loading import import_string


@dataclass(frozen=True)
class Caller:
    team: str
    key_prefix: str


@dataclass(frozen=True)
class ModelCard:
    name: str
    created: int  # unix seconds
    owned_by: str
    kind: str
    random_weights: bool


class Gatekeeper(Protocol):
    def authenticate(self, bearer_token: str) -> Caller | None:
        """Return the caller a key belongs to, or None for a missing, unknown or revoked key."""

    def models(self, caller: Caller) -> list[ModelCard]:
        """Return the variants the caller may use that are ready or deployed."""

    def exists(self, caller: Caller, name: str) -> bool:
        """Return whether name is a registered variant the caller may use."""


@lru_cache(maxsize=1)
def gatekeeper() -> Gatekeeper:
    return import_string(settings.INFERENCE_GATEKEEPER)()
