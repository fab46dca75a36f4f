"""Usage accounting: one raw record per request, rolled up per hour and day, then pruned.

Readers (usage pages, dashboard, /metrics, CSV) merge the two: a bucket that
still has raw records is computed from them, an older one is read from its
roll-up, so no request is counted twice and none is lost by pruning.
"""
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone as dt_timezone

from django.db import transaction
from django.utils import timezone

from .models import Outcome, Period, UsageRecord, UsageRollup

# Upper bounds of the latency histogram served by /metrics (and kept in each roll-up).
LATENCY_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)


def bucket_start(period: str, when: datetime) -> datetime:
    """Return the start (UTC) of the hour or day holding when."""
    when = when.astimezone(dt_timezone.utc).replace(minute=0, second=0, microsecond=0)
    return when if period == Period.HOUR else when.replace(hour=0)


def percentile(sorted_values: list[int], q: float) -> int | None:
    """Return the nearest-rank q-th percentile (0 < q <= 100) of sorted values, or None."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


@dataclass
class Bucket:
    """Usage of one (period start, team, variant), from a roll-up or computed from raw records."""

    start: datetime
    team: str
    variant: str
    requests: int = 0
    failed: int = 0
    cancelled: int = 0
    refused: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_sum_ms: int = 0
    latency_p50_ms: int | None = None
    latency_p95_ms: int | None = None
    ttft_p50_ms: int | None = None
    latency_buckets: list = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_MS))

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def errors(self) -> int:
        return self.failed

    @classmethod
    def from_records(cls, start, team, variant, records: list) -> "Bucket":
        """Return the bucket summarising records."""
        b = cls(start, team, variant)
        latencies, ttfts = [], []
        for r in records:
            b.requests += 1
            if r.outcome == Outcome.FAILED:
                b.failed += 1
            elif r.outcome == Outcome.CANCELLED:
                b.cancelled += 1
            elif r.outcome == Outcome.REFUSED:
                b.refused += 1
            b.prompt_tokens += r.prompt_tokens
            b.completion_tokens += r.completion_tokens
            if r.outcome == Outcome.OK:
                b.latency_sum_ms += r.latency_ms
                latencies.append(r.latency_ms)
                for i, bound in enumerate(LATENCY_BUCKETS_MS):
                    if r.latency_ms <= bound:
                        b.latency_buckets[i] += 1
                        break
                if r.ttft_ms is not None:
                    ttfts.append(r.ttft_ms)
        latencies.sort()
        ttfts.sort()
        b.latency_p50_ms, b.latency_p95_ms = percentile(latencies, 50), percentile(latencies, 95)
        b.ttft_p50_ms = percentile(ttfts, 50)
        return b

    @classmethod
    def from_rollup(cls, row: UsageRollup) -> "Bucket":
        """Return the bucket a roll-up row stores."""
        names = [f.name for f in UsageRollup._meta.fields if f.name not in ("id", "period")]
        bucket = cls(**{n: getattr(row, n) for n in names})
        bucket.latency_buckets = list(row.latency_buckets) or [0] * len(LATENCY_BUCKETS_MS)
        return bucket

    @property
    def ok(self) -> int:
        return self.requests - self.failed - self.cancelled - self.refused


def record(**fields) -> UsageRecord:
    """Store the raw record of one request (the fields of `usage_row`)."""
    row = usage_row(**fields)
    row.save()
    return row


def record_many(rows: list[UsageRecord]) -> None:
    """Store the raw records of several requests (built by `usage_row`) in one insert."""
    UsageRecord.objects.bulk_create(rows)


def usage_row(*, team: str, key_prefix: str, variant: str, prompt_tokens: int, completion_tokens: int,
              latency_ms: int, ttft_ms: int | None, outcome: str) -> UsageRecord:
    """Return the unsaved record of one request, with negative figures (clock steps) clamped to 0."""
    return UsageRecord(
        team=team, key_prefix=key_prefix, variant=variant, prompt_tokens=max(0, prompt_tokens),
        completion_tokens=max(0, completion_tokens), latency_ms=max(0, latency_ms),
        ttft_ms=None if ttft_ms is None else max(0, ttft_ms), outcome=outcome)


def _group(records, period: str) -> dict:
    grouped = defaultdict(list)
    for r in records:
        grouped[bucket_start(period, r.created_at), r.team, r.variant].append(r)
    return grouped


def buckets(period: str, since: datetime, *, team: str | None = None, variant: str | None = None) -> list[Bucket]:
    """Return the usage buckets of period from since on, optionally for one team or variant."""
    since = bucket_start(period, since)
    filters = {k: v for k, v in (("team", team), ("variant", variant)) if v is not None}
    found = {(b.start, b.team, b.variant): b for b in map(
        Bucket.from_rollup, UsageRollup.objects.filter(period=period, start__gte=since, **filters))}
    raw = UsageRecord.objects.filter(created_at__gte=since, **filters).order_by("created_at")
    # Raw records supersede any roll-up of the same bucket: they are its complete source.
    for (start, t, v), records in _group(raw, period).items():
        found[start, t, v] = Bucket.from_records(start, t, v, records)
    return sorted(found.values(), key=lambda b: (b.start, b.team, b.variant))


def series(period: str, since: datetime, until: datetime, *, team: str | None = None,
           variant: str | None = None) -> list[Bucket]:
    """Return one bucket per period from since to until (empty ones included), teams and variants merged."""
    filters = {k: v for k, v in (("team", team), ("variant", variant)) if v}
    step = timedelta(hours=1) if period == Period.HOUR else timedelta(days=1)
    first = bucket_start(period, since)
    out, start = {}, first
    while start <= until:
        out[start] = Bucket(start, team or "*", variant or "*")
        start += step
    raw = defaultdict(list)
    for r in UsageRecord.objects.filter(created_at__gte=first, **filters):
        raw[bucket_start(period, r.created_at)].append(r)
    for row in UsageRollup.objects.filter(period=period, start__gte=first, **filters):
        if row.start in out and row.start not in raw:
            _merge_into(out[row.start], Bucket.from_rollup(row))
    # Percentiles cannot be merged from parts, so buckets that still have raw records are recomputed whole.
    for start, records in raw.items():
        if start in out:
            out[start] = Bucket.from_records(start, team or "*", variant or "*", records)
    return list(out.values())


def _merge_into(total: Bucket, part: Bucket) -> None:
    """Add part's counts to total; percentiles become the worst of the parts (an upper bound)."""
    for name in ("requests", "failed", "cancelled", "refused", "prompt_tokens", "completion_tokens",
                 "latency_sum_ms"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    for name in ("latency_p50_ms", "latency_p95_ms", "ttft_p50_ms"):
        values = [v for v in (getattr(total, name), getattr(part, name)) if v is not None]
        setattr(total, name, max(values) if values else None)
    total.latency_buckets = [a + b for a, b in zip(total.latency_buckets, part.latency_buckets)]


def roll_up(now: datetime | None = None) -> dict:
    """Write hour and day roll-ups from the raw records, and prune the records of finished days."""
    now = now or timezone.now()
    today = bucket_start(Period.DAY, now)
    written = {Period.HOUR: 0, Period.DAY: 0}
    pruned = 0
    # Only days with records are touched; each day is rolled up and pruned in one transaction.
    for date in UsageRecord.objects.dates("created_at", "day"):
        day = datetime(date.year, date.month, date.day, tzinfo=dt_timezone.utc)
        with transaction.atomic():
            records = list(UsageRecord.objects.filter(created_at__gte=day, created_at__lt=day + timedelta(days=1)))
            for period in (Period.HOUR, Period.DAY):
                for (start, team, variant), group in _group(records, period).items():
                    _store(period, Bucket.from_records(start, team, variant, group))
                    written[period] += 1
            if day < today:
                pruned += UsageRecord.objects.filter(pk__in=[r.pk for r in records]).delete()[0]
    return {"hours": written[Period.HOUR], "days": written[Period.DAY], "pruned": pruned}


def _store(period: str, b: Bucket) -> None:
    values = {n: getattr(b, n) for n in ("requests", "failed", "cancelled", "refused", "prompt_tokens",
                                          "completion_tokens", "latency_sum_ms", "latency_p50_ms",
                                          "latency_p95_ms", "ttft_p50_ms", "latency_buckets")}
    UsageRollup.objects.update_or_create(period=period, start=b.start, team=b.team, variant=b.variant,
                                         defaults=values)


def totals_by(since: datetime | None = None) -> list[Bucket]:
    """Return all-time (or since) totals per (team, variant), for /metrics and the CSV export."""
    since = since or datetime(2000, 1, 1, tzinfo=dt_timezone.utc)
    merged: dict = {}
    for b in buckets(Period.DAY, since):
        total = merged.setdefault((b.team, b.variant), Bucket(since, b.team, b.variant))
        _merge_into(total, b)
    return list(merged.values())
