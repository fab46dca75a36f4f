"""The console's first page: the box at a glance."""
import logging
from datetime import timedelta

import psutil
from django.contrib import admin
from django.core.cache import cache
from django.db.models import Q
from django.utils import timezone

from audit import ledger
from audit.models import AuditEvent, Checkpoint
from appliance import engine_client, gpus as box_gpus

from .. import usage
from ..models import ModelVariant, Outcome, Period, UsageRecord
from .charts import chart

log = logging.getLogger(__name__)
VERIFY_CACHE_S = 60  # walking a long chain on every page load would make the page as slow as the chain is long


def engine_stats(name: str) -> dict:
    """Return the loaded engine's live figures (queue depth, running, KV-cache use), or {} when not loaded."""
    engine = engine_client.get(name)
    if engine is None:
        return {}
    try:
        live = engine.describe()
    except Exception:
        log.exception("describe() of engine %s failed", name)
        return {}
    budget = live.get("kv_budget_bytes") or 0
    return {"queue_depth": live["waiting"], "running": live["running"], "memory_bytes": live.get("resident_bytes"),
            "kv_cache_used_ratio": live["kv_reserved_bytes"] / budget if budget else 0.0}


def gpus() -> list[dict]:
    """Return each visible CUDA device with its memory, or [] without CUDA."""
    cuda = box_gpus.torch_cuda()
    found = []
    for i in range(cuda.device_count() if cuda else 0):
        free, total = cuda.mem_get_info(i)
        found.append({"index": i, "name": cuda.get_device_name(i), "total": total, "used": total - free,
                      "allocated_here": cuda.memory_allocated(i)})
    return found


def host() -> dict:
    """Return the host's CPU count and memory."""
    memory = psutil.virtual_memory()
    return {"cpus": psutil.cpu_count(), "memory_total": memory.total, "memory_used": memory.total - memory.available,
            "process_rss": psutil.Process().memory_info().rss}


def variants() -> list[dict]:
    """Return every variant with its deployment, memory (measured or estimated) and engine figures."""
    rows = []
    for v in ModelVariant.objects.select_related("deployment"):
        dep = getattr(v, "deployment", None)
        stats = engine_stats(v.name)
        loaded = engine_client.get(v.name) is not None
        memory = stats.get("memory_bytes")
        rows.append({"variant": v, "deployment": dep, "loaded": loaded, "stats": stats,
                     "memory": memory if memory is not None else (v.size_bytes if loaded else None),
                     "memory_estimated": memory is None})
    return rows


def unattributed_errors(since=None) -> int:
    """Return the API's failures that no usage row counts: 5xx before admission, requests cut by a web crash."""
    events = AuditEvent.objects.filter(Q(action="api.error", details__in_usage=False) | Q(action="chat.interrupted"))
    return (events if since is None else events.filter(created_at__gte=since)).count()


def traffic(now) -> dict:
    """Return request and token rates over the last minute and the last day, and the day's errors (every 5xx)."""
    minute = UsageRecord.objects.filter(created_at__gte=now - timedelta(seconds=60)).exclude(outcome=Outcome.REFUSED)
    last_minute = list(minute.values_list("prompt_tokens", "completion_tokens"))
    hours = usage.series(Period.HOUR, now - timedelta(hours=23), now)
    day_requests = sum(b.requests - b.refused for b in hours)
    day_tokens = sum(b.tokens for b in hours)
    return {
        "rps_now": len(last_minute) / 60, "tps_now": sum(p + c for p, c in last_minute) / 60,
        "rps_day": day_requests / 86400, "tps_day": day_tokens / 86400,
        "requests_day": day_requests, "tokens_day": day_tokens,
        "failed_day": sum(b.failed for b in hours) + unattributed_errors(now - timedelta(hours=24)),
        "refused_day": sum(b.refused for b in hours),
        "chart": chart("Requests per hour, last 24 h", [b.start.strftime("%H") for b in hours],
                       {"requests": [b.requests - b.refused for b in hours],
                        "failed": [b.failed for b in hours], "refused": [b.refused for b in hours]}),
    }


def ledger_state() -> dict:
    """Return the chain's verification (cached briefly) and its last signed checkpoint, if checkpoints exist."""
    state = cache.get("console:ledger-verify")
    if state is None:
        result = ledger.verify()
        state = {"ok": result.ok, "reason": result.reason, "events": result.events_checked,
                 "checked_at": timezone.now()}
        cache.set("console:ledger-verify", state, VERIFY_CACHE_S)
    state = dict(state)
    state["checkpoint"] = last_checkpoint()
    return state


def last_checkpoint():
    """Return the newest audit checkpoint, or None."""
    try:
        return Checkpoint.objects.order_by("-pk").first()
    except Exception:  # the table may not be migrated yet on this box
        log.exception("reading the last checkpoint failed")
        return None


def context() -> dict:
    """Return everything the dashboard template shows."""
    now = timezone.now()
    rows = variants()
    queue = [r["stats"]["queue_depth"] for r in rows if "queue_depth" in r["stats"]]
    egress = AuditEvent.objects.filter(action="egress.blocked").count()
    return {"now": now, "host": host(), "gpus": gpus(), "variants": rows, "traffic": traffic(now),
            "queue_depth": sum(queue) if queue else None, "ledger": ledger_state(), "egress_blocked": egress}


def index(request):
    """Render the admin index with the dashboard above the app list."""
    return admin.site.index(request, extra_context={"dashboard": context()})
