"""Rate limits and token budgets, charged to counters in the database so every web process shares them.

Admission charges one request to the current minute, day and month counter of
the team and of the key, all in one transaction, after checking every limit;
settlement adds the tokens the request used. A burst of requests of a key that no
limit applies to is counted in one go. Token limits are checked before a
request (its size is unknown until it ends), so the last admitted request may
overshoot a budget by its own size.
"""
import calendar
from dataclasses import dataclass, field
from typing import NamedTuple
from datetime import datetime, timedelta, timezone as dt_timezone

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from .models import ApiKey, UsageCounter, Window

# Which counter each limit reads, and what it counts there.
LIMITS = {
    "requests_per_minute": (Window.MINUTE, "requests", "requests per minute"),
    "tokens_per_minute": (Window.MINUTE, "tokens", "tokens per minute"),
    "tokens_per_day": (Window.DAY, "tokens", "tokens per day"),
    "tokens_per_month": (Window.MONTH, "tokens", "tokens per month"),
}
SCOPES = ("team", "key")
WINDOWS = (Window.MINUTE, Window.DAY, Window.MONTH)


def window_bounds(window: str, now: datetime) -> tuple[datetime, datetime]:
    """Return the start and end (UTC) of the calendar window that holds now."""
    now = now.astimezone(dt_timezone.utc)
    if window == Window.MINUTE:
        start = now.replace(second=0, microsecond=0)
        return start, start + timedelta(minutes=1)
    if window == Window.DAY:
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = calendar.monthrange(start.year, start.month)[1]
    return start, start + timedelta(days=days)


@dataclass(frozen=True)
class Exceeded:
    """One limit a request would break."""

    scope: str  # "team" or "key"
    owner: str  # the team's name or the key's prefix
    limit: str  # a key of LIMITS
    value: int
    resets_at: datetime

    def message(self, now: datetime) -> str:
        """Return the sentence a client sees: which limit, and when it resets."""
        what = f"Team '{self.owner}'" if self.scope == "team" else f"API key {self.owner}…"
        wait = max(1, int((self.resets_at - now).total_seconds() + 0.999))
        return (f"{what} has reached its limit of {self.value:,} {LIMITS[self.limit][2]}; "
                f"it resets at {self.resets_at:%Y-%m-%d %H:%M:%S} UTC (in {wait} s).")


@dataclass(frozen=True)
class Ticket:
    """What admission charged, handed back to settle() to add the tokens."""

    team: str
    key_prefix: str
    variant: str
    counter_ids: tuple[int, ...] = field(default=())


class LimitReached(Exception):
    def __init__(self, exceeded: list[Exceeded], headers: dict[str, str] | None = None):
        super().__init__(exceeded)
        self.exceeded = exceeded
        self.headers = headers or {}


class Charged(NamedTuple):
    """What an admission counted: the counter rows, and the x-ratelimit-* headers a limited key's answer carries."""

    counter_ids: tuple[int, ...]
    headers: dict[str, str]


# Row ids of counters already created: (scope, owner id, window, window start) → id. A row of a current window
# is never deleted (pruning takes ended ones), so a known id saves the insert-if-missing on every request.
_known_counters: dict[tuple, int] = {}
_KNOWN_COUNTERS_MAX = 10_000


def is_limited(key: ApiKey) -> bool:
    """Return whether any limit applies to key or its team."""
    return any(value is not None for owner in (key.team, key) for value in owner.limits().values())


def charge(key: ApiKey, now: datetime | None = None, *, requests: int = 1) -> Charged:
    """Count requests against every window of key and its team; raise LimitReached instead if over.

    Several requests at once only for a key without limits: a limited key's requests are each checked.
    """
    now = now or timezone.now()
    owners = {"team": key.team, "key": key}
    wanted = [(scope, owners[scope].pk, window, window_bounds(window, now)[0])
              for scope in SCOPES for window in WINDOWS]
    limited = is_limited(key)
    if limited and requests != 1:
        raise ValueError("a key with limits is charged one request at a time, so that each one is checked")
    with transaction.atomic():
        known = [_known_counters.get(w) for w in wanted]
        if not limited and None not in known:
            # Nothing to check: one UPDATE. Fewer rows updated means one was deleted by hand; take the long way.
            counted = UsageCounter.objects.filter(pk__in=known).update(requests=F("requests") + requests)
            if counted == len(known):
                return Charged(tuple(known), {})
            _known_counters.clear()
            UsageCounter.objects.filter(pk__in=known).update(requests=F("requests") - requests)
        return _charge_checked(owners, wanted, now, requests)


def _charge_checked(owners: dict, wanted: list[tuple], now: datetime, requests: int = 1) -> Charged:
    """Create missing counters, lock them, check every limit and count the request (inside a transaction)."""
    # Create missing rows first; a concurrent creator wins and we use its row.
    UsageCounter.objects.bulk_create(
        [UsageCounter(scope=s, scope_id=i, window=w, window_start=t) for s, i, w, t in wanted],
        ignore_conflicts=True)
    # Lock in one fixed order (by primary key) so two admissions never deadlock on PostgreSQL;
    # on SQLite the transaction already holds the database's write lock (BEGIN IMMEDIATE).
    locked = UsageCounter.objects.select_for_update(no_key=True).filter(
        scope__in=SCOPES, scope_id__in={owners["key"].pk, owners["team"].pk},
        window_start__in={t for *_, t in wanted},
    ).order_by("pk")
    found = {(r.scope, r.scope_id, r.window, r.window_start): r for r in locked}
    rows = {(scope, window): found[scope, owner, window, start] for scope, owner, window, start in wanted}
    exceeded = over_limits(owners, rows, now)
    if exceeded:
        raise LimitReached(exceeded, rate_limit_headers(owners, rows, now, counted=0))
    ids = tuple(row.pk for row in rows.values())
    UsageCounter.objects.filter(pk__in=ids).update(requests=F("requests") + requests)
    transaction.on_commit(lambda: _remember_counters({w: found[w].pk for w in wanted}))
    return Charged(ids, rate_limit_headers(owners, rows, now, counted=requests))


def rate_limit_headers(owners: dict, rows: dict, now: datetime, *, counted: int) -> dict[str, str]:
    """Return OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens} for the tightest limits that apply.

    Of the key's and the team's limits, the one with the least left stands for requests and for tokens (tokens
    per minute, day or month alike); a kind without any limit gets no headers. `counted` requests were just
    added to the counters read in `rows`.
    """
    tightest: dict[str, tuple[int, int, datetime]] = {}
    for scope, owner in owners.items():
        for limit, value in owner.limits().items():
            if value is None:
                continue
            window, column, _ = LIMITS[limit]
            used = getattr(rows[scope, window], column) + (counted if column == "requests" else 0)
            left = max(0, value - used)
            if column not in tightest or left < tightest[column][1]:
                tightest[column] = (value, left, window_bounds(window, now)[1])
    headers = {}
    for kind, (value, left, resets_at) in sorted(tightest.items()):
        headers[f"x-ratelimit-limit-{kind}"] = str(value)
        headers[f"x-ratelimit-remaining-{kind}"] = str(left)
        headers[f"x-ratelimit-reset-{kind}"] = duration((resets_at - now).total_seconds())
    return headers


def duration(seconds: float) -> str:
    """Return seconds as OpenAI writes a reset time: "20ms", "59s", "6m0s", "23h59m12s"."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    whole = int(seconds + 0.999)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _remember_counters(ids: dict[tuple, int]) -> None:
    """Remember committed counter rows only, so a rolled-back row's id is never taken for a live one."""
    if len(_known_counters) > _KNOWN_COUNTERS_MAX:
        _known_counters.clear()
    _known_counters.update(ids)


def over_limits(owners: dict, rows: dict, now: datetime) -> list[Exceeded]:
    """Return every limit that one more request would break, latest reset first."""
    found = []
    for scope, owner in owners.items():
        for limit, value in owner.limits().items():
            if value is None:
                continue
            window, column, _ = LIMITS[limit]
            used = getattr(rows[scope, window], column)
            # Requests: this one would be number used+1. Tokens: refused once the budget is spent.
            if used + (1 if column == "requests" else 0) > value or (column == "tokens" and used >= value):
                name = owner.name if scope == "team" else owner.prefix
                found.append(Exceeded(scope, name, limit, value, window_bounds(window, now)[1]))
    return sorted(found, key=lambda e: e.resets_at, reverse=True)


def add_tokens(counter_ids: tuple[int, ...], tokens: int) -> None:
    """Add a settled request's tokens to the counters its admission charged."""
    if tokens and counter_ids:
        UsageCounter.objects.filter(pk__in=counter_ids).update(tokens=F("tokens") + tokens)


def prune_counters(now: datetime | None = None) -> int:
    """Delete counters of windows that ended long enough ago that no limit reads them."""
    now = now or timezone.now()
    deleted = 0
    for window, keep in ((Window.MINUTE, timedelta(hours=1)), (Window.DAY, timedelta(days=2)),
                         (Window.MONTH, timedelta(days=62))):
        deleted += UsageCounter.objects.filter(window=window, window_start__lt=now - keep).delete()[0]
    return deleted


def current_usage(scope: str, scope_id: int, now: datetime | None = None) -> dict:
    """Return {limit name: amount used in its current window} for one team or key (for the console)."""
    now = now or timezone.now()
    starts = {w: window_bounds(w, now)[0] for w in WINDOWS}
    rows = {r.window: r for r in UsageCounter.objects.filter(scope=scope, scope_id=scope_id)
            if starts.get(r.window) == r.window_start}
    return {limit: getattr(rows[w], column) if w in rows else 0 for limit, (w, column, _) in LIMITS.items()}
