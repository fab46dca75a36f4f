"""The registry's answers to the chat API: who is calling, what they may use, and what they used."""
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from appliance.api.gatekeeper import Admission, Caller, Gatekeeper, ModelCard, UsageReport

from .. import quotas, usage
from ..names import is_valid_name
from ..models import ApiKey, ModelVariant, Outcome, VariantStatus, hash_api_key

log = logging.getLogger(__name__)
SERVABLE = (VariantStatus.READY, VariantStatus.DEPLOYED)
# last_used_at is for people reading the console; writing it on every request would cost a write each.
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True)
class RegistryCaller(Caller):
    """A Caller that also carries the key's id, so admit() needs no second lookup by prefix."""

    key_id: int = 0


def active_keys():
    """Return the keys that may authenticate now: neither revoked nor expired."""
    return ApiKey.objects.filter(revoked_at__isnull=True).filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))


class RegistryGatekeeper(Gatekeeper):
    def authenticate(self, bearer_token: str) -> Caller | None:
        """Return the caller a key belongs to, or None for a missing, unknown, revoked or expired key."""
        key = self._key_for_token(bearer_token)
        return None if key is None else self._caller(key)

    def authenticate_and_admit(self, requests: list[tuple[str, str]]) -> list[tuple[Caller | None, Admission | None]]:
        """Answer a burst with one read of each key and variant: a key was just read, so it is as fresh as a
        re-read, and a burst of a key without limits is charged in one update."""
        answers: dict[tuple[str, str], Iterator[tuple[Caller | None, Admission | None]]] = {}
        for (token, model), count in Counter(requests).items():
            key = self._key_for_token(token)
            # In arrival order: with a limit, the earlier requests are the ones admitted.
            answers[token, model] = iter([(None, None)] * count if key is None else [
                (self._caller(key), admission) for admission in self._admit(key, model, count)])
        return [next(answers[request]) for request in requests]

    def models(self, caller: Caller) -> list[ModelCard]:
        """Return the ready or deployed variants that the caller's team and key may both use."""
        key = self._key(caller)
        if key is None:
            return []
        variants = ModelVariant.objects.filter(status__in=SERVABLE)
        if not key.team.all_variants:
            variants = variants.filter(teams=key.team)
        if key.variants.exists():
            variants = variants.filter(api_keys=key)
        return [
            ModelCard(name=v.name, created=int(v.created_at.timestamp()), owned_by="appliance",
                      kind=v.kind, random_weights=v.random_weights)
            for v in variants.distinct()
        ]

    def exists(self, caller: Caller, name: str) -> bool:
        """Return whether name is a registered variant (whether or not the caller may use it)."""
        return is_valid_name(name) and (
            ModelVariant.objects.filter(name=name).exclude(status=VariantStatus.IMPORTING).exists())

    def admit(self, caller: Caller, model: str) -> Admission:
        """Check access and limits for one request to model, and count it."""
        return self._admit(self._key(caller), model)[0]

    def _admit(self, key: ApiKey | None, model: str, count: int = 1) -> list[Admission]:
        """Check access and limits for `count` requests of one key to model, and count the admitted ones."""
        if key is None:
            return [Admission(False, 403, "This API key was revoked or has expired.", "key_inactive")] * count
        # A name no variant can have (a NUL, a path, 10k characters) is never sent to the database.
        variant = ModelVariant.objects.filter(name=model).exclude(status=VariantStatus.IMPORTING).first() \
            if is_valid_name(model) else None
        if variant is None:
            # Not charged: the API answers 404 for an unknown model, as OpenAI does.
            return [Admission(True)] * count
        if not key.may_use(variant):
            who = "this API key" if key.team.may_use(variant) else f"team '{key.team.name}'"
            refusal = Admission(False, 403, f"The model '{model}' is not available to {who}; "
                                            "ask an administrator of this box for access.", "model_not_permitted")
            for _ in range(count):
                self._record_refusal(key, model)
            return [refusal] * count
        now = timezone.now()
        if quotas.is_limited(key):  # each request is checked against the limits on its own
            admissions = [self._charge(key, model, now) for _ in range(count)]
        else:
            admissions = [self._charge(key, model, now, count)] * count
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        return admissions

    def _charge(self, key: ApiKey, model: str, now, requests: int = 1) -> Admission:
        """Count `requests` requests to the key's counters, or refuse one that a limit does not allow."""
        try:
            charged = quotas.charge(key, now, requests=requests)
        except quotas.LimitReached as exc:
            first = exc.exceeded[0]
            retry = max(1, int((first.resets_at - now).total_seconds() + 0.999))
            self._record_refusal(key, model)
            return Admission(False, 429, first.message(now), "rate_limit_exceeded" if "minute" in first.limit
                             else "insufficient_quota", retry_after_s=retry, headers=exc.headers)
        return Admission(True, ticket=quotas.Ticket(key.team.name, key.prefix, model, charged.counter_ids),
                         headers=charged.headers)

    def settle(self, caller: Caller, admission: Admission, report: UsageReport) -> None:
        """Record what an admitted request used (tokens, latency, outcome) and charge its tokens."""
        self.settle_many([(caller, admission, report)])

    def settle_many(self, reports: list[tuple[Caller, Admission, UsageReport]]) -> None:
        """Settle finished requests together: one insert of their usage rows, one token update per counter set."""
        # Refusals were recorded by admit(); unknown models are not accounted.
        settled = [(admission.ticket, report) for _, admission, report in reports
                   if admission.allowed and isinstance(admission.ticket, quotas.Ticket)]
        if settled and not self._record_usage(settled) and len(settled) > 1:
            for one in settled:  # so that one bad report costs its own row only
                self._record_usage([one])

    @staticmethod
    def _record_usage(settled: list[tuple[quotas.Ticket, UsageReport]]) -> bool:
        """Charge the tokens and store the usage rows of settled requests in one transaction; False if it failed."""
        tokens: Counter[tuple[int, ...]] = Counter()
        for ticket, report in settled:
            tokens[ticket.counter_ids] += report.prompt_tokens + report.completion_tokens
        try:
            with transaction.atomic():
                for counter_ids, count in tokens.items():
                    quotas.add_tokens(counter_ids, count)
                usage.record_many([usage.usage_row(
                    team=ticket.team, key_prefix=ticket.key_prefix, variant=ticket.variant,
                    prompt_tokens=report.prompt_tokens, completion_tokens=report.completion_tokens,
                    latency_ms=report.latency_ms, ttft_ms=report.ttft_ms,
                    outcome=report.outcome if report.outcome in Outcome.values else Outcome.FAILED)
                    for ticket, report in settled])
            return True
        except Exception:
            # The answers have already gone out; losing usage rows must not turn them into errors.
            log.exception("could not record usage of %d requests (first: %s on %s)", len(settled),
                          settled[0][0].team, settled[0][0].variant)
            return False

    def _key_for_token(self, bearer_token: str) -> ApiKey | None:
        # The unique index finds the row by digest; comparing the digest again in
        # constant time means no code path compares secrets with an early exit.
        key = active_keys().select_related("team").filter(key_hash=hash_api_key(bearer_token)).first()
        return key if key is not None and key.matches(bearer_token) else None

    @staticmethod
    def _caller(key: ApiKey) -> RegistryCaller:
        return RegistryCaller(team=key.team.name, key_prefix=key.prefix, key_id=key.pk)

    def _key(self, caller: Caller) -> ApiKey | None:
        """Return the caller's key if it is still active (revocation takes effect on the next request)."""
        keys = active_keys().select_related("team")
        if isinstance(caller, RegistryCaller) and caller.key_id:
            return keys.filter(pk=caller.key_id).first()
        return keys.filter(prefix=caller.key_prefix, team__name=caller.team).first()

    def _record_refusal(self, key: ApiKey, model: str) -> None:
        usage.record(team=key.team.name, key_prefix=key.prefix, variant=model, prompt_tokens=0,
                     completion_tokens=0, latency_ms=0, ttft_ms=None, outcome=Outcome.REFUSED)
