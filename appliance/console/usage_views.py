"""Usage pages (per team, per variant, the whole box) with charts, and their CSV export."""
import csv
from urllib.parse import urlencode
from datetime import timedelta

from django.contrib import admin
from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from .. import quotas, usage
from ..models import ModelVariant, Period, Team, UsageRecord, UsageRollup
from .charts import usage_charts

CSV_COLUMNS = ("period", "start", "team", "variant", "requests", "ok", "failed", "cancelled", "refused",
               "prompt_tokens", "completion_tokens", "latency_p50_ms", "latency_p95_ms", "ttft_p50_ms")


def _known(name: str, model) -> bool:
    """Return whether name is a current row of model or appears in usage (deleted variants keep their usage)."""
    usage_field = "team" if model is Team else "variant"
    if "\x00" in name or len(name) > 100:  # no stored name is like that (PostgreSQL refuses NUL in text)
        return False
    return (model.objects.filter(name=name).exists()
            or UsageRecord.objects.filter(**{usage_field: name}).exists()
            or UsageRollup.objects.filter(**{usage_field: name}).exists())


def _page(request, *, title: str, team: str | None = None, variant: str | None = None, extra: dict | None = None):
    now = timezone.now()
    hours = usage.series(Period.HOUR, now - timedelta(hours=23), now, team=team, variant=variant)
    days = usage.series(Period.DAY, now - timedelta(days=29), now, team=team, variant=variant)
    breakdown_by = "variant" if team else "team"
    breakdown = {}
    for b in usage.buckets(Period.DAY, now - timedelta(days=29), team=team, variant=variant):
        name = getattr(b, breakdown_by)
        row = breakdown.setdefault(name, {"name": name, "requests": 0, "tokens": 0, "failed": 0, "refused": 0})
        row["requests"] += b.requests
        row["tokens"] += b.tokens
        row["failed"] += b.failed
        row["refused"] += b.refused
    query = urlencode({k: v for k, v in (("team", team), ("variant", variant)) if v})
    context = {
        **admin.site.each_context(request), "title": title, "team": team, "variant": variant,
        "hour_charts": usage_charts(hours, "%H"), "day_charts": usage_charts(days, "%d %b"),
        "totals_day": _sum(hours), "totals_month": _sum(days), "breakdown_by": breakdown_by,
        "breakdown": sorted(breakdown.values(), key=lambda r: -r["tokens"]), "csv_query": query,
        "teams": Team.objects.order_by("name"), "variants": ModelVariant.objects.order_by("name"),
        **(extra or {}),
    }
    return render(request, "console/usage.html", context)


def _sum(series) -> dict:
    return {"requests": sum(b.requests for b in series), "tokens": sum(b.tokens for b in series),
            "failed": sum(b.failed for b in series), "refused": sum(b.refused for b in series)}


def overview(request):
    """Show the whole box's usage, with links to each team and variant."""
    return _page(request, title="Usage of the box")


def team_usage(request, name: str):
    """Show one team's usage and how close it is to its limits."""
    if not _known(name, Team):
        raise Http404(f"no team named {name}")
    team = Team.objects.filter(name=name).first()
    limits = []
    if team is not None:
        used = quotas.current_usage("team", team.pk)
        limits = [{"name": quotas.LIMITS[k][2], "value": v, "used": used[k]} for k, v in team.limits().items()]
    return _page(request, title=f"Usage of team {name}", team=name, extra={"team_row": team, "limits": limits})


def variant_usage(request, name: str):
    """Show one variant's usage across teams."""
    if not _known(name, ModelVariant):
        raise Http404(f"no variant named {name}")
    return _page(request, title=f"Usage of variant {name}", variant=name)


def export_csv(request):
    """Return usage buckets as CSV: ?period=hour|day, &days=N (default 30), optionally &team= and &variant=."""
    period = request.GET.get("period", Period.DAY)
    if period not in Period.values:
        return HttpResponse("period must be hour or day", status=400, content_type="text/plain")
    try:
        days = min(max(int(request.GET.get("days", "30")), 1), 3660)
    except ValueError:
        return HttpResponse("days must be a whole number", status=400, content_type="text/plain")
    filters = {k: request.GET[k] for k in ("team", "variant") if request.GET.get(k)}
    if any("\x00" in v for v in filters.values()):
        return HttpResponse("team and variant must not contain NUL characters", status=400, content_type="text/plain")
    rows = usage.buckets(period, timezone.now() - timedelta(days=days - 1), **filters)
    response = HttpResponse(content_type="text/csv")
    response["Content-Disposition"] = f'attachment; filename="usage-{period}.csv"'
    writer = csv.writer(response)
    writer.writerow(CSV_COLUMNS)
    for b in rows:
        writer.writerow([period, b.start.isoformat(), b.team, b.variant, b.requests, b.ok, b.failed, b.cancelled,
                         b.refused, b.prompt_tokens, b.completion_tokens, _blank(b.latency_p50_ms),
                         _blank(b.latency_p95_ms), _blank(b.ttft_p50_ms)])
    return response


def _blank(value):
    return "" if value is None else value
