"""What the team API needs to know about callers and variants, as a protocol.

The views speak to this protocol only; the registry's implementation (appliance.api.admission) is plugged in
through settings.API_GATEKEEPER, so the API's own behaviour is testable against a gatekeeper without a database.
"""
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Admission:
    """The registry's answer to "may this caller send this request now?"."""

    allowed: bool
    status: int = 200  # 403 (no access) or 429 (a limit) when refused
    message: str = ""
    code: str | None = None
    retry_after_s: int | None = None
    ticket: object = None  # handed back to settle(), e.g. the ids of the counters charged
    # Sent with the answer, allowed or not: OpenAI's x-ratelimit-* for a caller with limits, {} without.
    headers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class UsageReport:
    """What one admitted request cost, reported when it ends."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int
    ttft_ms: int | None
    outcome: str  # "ok" | "failed" | "cancelled" | "refused"


class Gatekeeper(Protocol):
    def authenticate(self, bearer_token: str) -> Caller | None:
        """Return the caller a key belongs to, or None for a missing, unknown or revoked key."""

    def models(self, caller: Caller) -> list[ModelCard]:
        """Return the variants the caller may use that are ready or deployed."""

    def exists(self, caller: Caller, name: str) -> bool:
        """Return whether name is a registered variant (whether or not the caller may use it)."""

    def admit(self, caller: Caller, model: str) -> Admission:
        """Check access and limits for one request to model, and count it."""

    def authenticate_and_admit(self, requests: list[tuple[str, str]]) -> list[tuple[Caller | None, Admission | None]]:
        """Answer chat requests given as (bearer token, model), in order: each one's caller and admission.

        The chat API asks for a whole burst at once, so that an implementation can read each key and variant
        once for all of its requests. A request without a valid key gets (None, None).
        """
        answers = []
        for token, model in requests:
            caller = self.authenticate(token)
            answers.append((caller, None if caller is None else self.admit(caller, model)))
        return answers

    def settle(self, caller: Caller, admission: Admission, report: UsageReport) -> None:
        """Record what an admitted request used (tokens, latency, outcome)."""

    def settle_many(self, reports: list[tuple[Caller, Admission, UsageReport]]) -> None:
        """Record several finished requests (the chat API hands over what finished together) as settle() would."""
        for caller, admission, report in reports:
            self.settle(caller, admission, report)


@lru_cache(maxsize=1)
def gatekeeper() -> Gatekeeper:
    return import_string(settings.API_GATEKEEPER)()
