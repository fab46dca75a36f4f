"""/metrics in Prometheus text format: the whole box's figures, from one registry.

Registry, usage and memory figures are read from the database at scrape time (roll-ups plus raw records), so
every web process answers with the same box-wide totals. The engines' figures (batch, queue, KV budget, MoE
expert telemetry) come from this web process's engine processes, and the API's 5xx count from this process.
Read-only and free of prompts and answers; counts only.
"""
import hmac
import ipaddress
from collections.abc import Iterator

from django.conf import settings
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt
from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import engine_client, usage
from .external_metrics import ExternalEngineCollector
from .console import dashboard
from .models import ModelVariant

def allowed(request) -> bool:
    """Return whether the caller is on the allowlist or presents the metrics token."""
    token = settings.METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(net, strict=False) for net in settings.METRICS_ALLOW)


class ApplianceCollector:
    """Collect the registry, usage and memory metrics on each scrape."""

    def collect(self):
        yield from self.registry()
        yield from self.usage()
        yield from self.memory()

    def registry(self):
        info = GaugeMetricFamily("appliance_variant_info", "Registered model variants (value 1).",
                                 labels=["variant", "kind", "status"])
        loaded = GaugeMetricFamily("appliance_variant_loaded", "1 if this web process has the variant loaded.",
                                   labels=["variant"])
        kv = GaugeMetricFamily("appliance_engine_kv_cache_used_ratio", "Share of the KV cache in use.",
                               labels=["variant"])
        for row in dashboard.variants():
            v = row["variant"]
            info.add_metric([v.name, v.kind, v.status], 1)
            loaded.add_metric([v.name], 1 if row["loaded"] else 0)
            if "kv_cache_used_ratio" in row["stats"]:
                kv.add_metric([v.name], row["stats"]["kv_cache_used_ratio"])
        yield from (info, loaded, kv)

    def usage(self):
        labels = ["variant", "team"]
        requests = CounterMetricFamily("appliance_requests", "Chat requests by outcome.", labels=labels + ["outcome"])
        tokens = CounterMetricFamily("appliance_tokens", "Tokens processed.", labels=labels + ["kind"])
        latency = HistogramMetricFamily("appliance_request_latency_seconds",
                                        "Latency of successful chat requests.", labels=labels)
        for b in usage.totals_by():
            key = [b.variant, b.team]
            for outcome, n in (("ok", b.ok), ("failed", b.failed), ("cancelled", b.cancelled),
                               ("refused", b.refused)):
                requests.add_metric(key + [outcome], n)
            tokens.add_metric(key + ["prompt"], b.prompt_tokens)
            tokens.add_metric(key + ["completion"], b.completion_tokens)
            cumulative, buckets = 0, []
            for bound, count in zip(usage.LATENCY_BUCKETS_MS, b.latency_buckets):
                cumulative += count
                buckets.append((str(bound / 1000), cumulative))
            buckets.append(("+Inf", b.ok))  # latencies above the last bound fall only here
            latency.add_metric(key, buckets, b.latency_sum_ms / 1000)
        # 5xx answered before any request was admitted (so no team or variant to count them under).
        requests.add_metric(["", "", "failed"], dashboard.unattributed_errors())
        yield from (requests, tokens, latency)

    def memory(self):
        gpu = GaugeMetricFamily("appliance_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu", "name"])
        gpu_total = GaugeMetricFamily("appliance_gpu_memory_total_bytes", "GPU memory.", labels=["gpu", "name"])
        for g in dashboard.gpus():
            gpu.add_metric([str(g["index"]), g["name"]], g["used"])
            gpu_total.add_metric([str(g["index"]), g["name"]], g["total"])
        host = dashboard.host()
        yield from (gpu, gpu_total,
                    GaugeMetricFamily("appliance_host_memory_used_bytes", "Host memory in use.",
                                      value=host["memory_used"]),
                    GaugeMetricFamily("appliance_host_memory_total_bytes", "Host memory.", value=host["memory_total"]),
                    GaugeMetricFamily("appliance_variants", "Registered variants.",
                                      value=ModelVariant.objects.count()))


# Each engine's figures (describe()'s keys), published as appliance_engine_<key>.
ENGINE_GAUGES = {
    "requests_running": "Requests in the running batch.",
    "requests_waiting": "Requests waiting for admission.",
    "kv_budget_bytes": "KV-cache memory the deployment may hold.",
    "kv_reserved_bytes": "KV-cache memory reserved by running requests.",
    "mean_batch_size": "Mean requests per step since load.",
    "prefix_cache_blocks": "KV blocks held by the prefix cache.",
    "prefix_cache_bytes": "Memory held by the prefix cache.",
}
ENGINE_COUNTERS = {
    "steps": "Model steps run.",
    "step_seconds": "Seconds spent in steps.",
    "prompt_tokens": "Prompt tokens prefilled.",
    "generated_tokens": "Tokens generated.",
    "preemptions": "Running requests sent back to wait for KV room (recomputed later).",
    "prefix_cache_query_tokens": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hit_tokens": "Prompt tokens served from the prefix cache.",
    "prefix_cache_evicted_blocks": "Prefix-cache blocks evicted for room.",
}
# Where the published name says more than describe()'s key.
FIGURE_KEYS = {"requests_running": "running", "requests_waiting": "waiting"}


class EngineCollector:
    """Collect the figures of every engine this web process has loaded, at scrape time."""

    def collect(self) -> Iterator[Metric]:
        engines = [(name, engine_client.get(name)) for name in engine_client.names()]
        engines = [(name, engine) for name, engine in engines if engine is not None]
        gauges = {key: GaugeMetricFamily(f"appliance_engine_{key}", text, labels=["model"])
                  for key, text in ENGINE_GAUGES.items()}
        counters = {key: CounterMetricFamily(f"appliance_engine_{key}", text, labels=["model"])
                    for key, text in ENGINE_COUNTERS.items()}
        finished = CounterMetricFamily("appliance_engine_requests_finished", "Finished requests by finish reason.",
                                       labels=["model", "reason"])
        idle = GaugeMetricFamily("appliance_moe_idle_expert_fraction",
                                 "Mean fraction of a layer's experts that received no token in a step (recent steps).",
                                 labels=["model", "layer"])
        per_active = GaugeMetricFamily("appliance_moe_tokens_per_active_expert",
                                       "Mean tokens per expert that received any, per step (recent steps).",
                                       labels=["model", "layer"])
        expert_tokens = CounterMetricFamily("appliance_moe_expert_tokens", "Tokens routed to each expert since load.",
                                            labels=["model", "layer", "expert"])
        for name, engine in engines:
            figures = engine.describe()
            for key, family in (*gauges.items(), *counters.items()):
                key = FIGURE_KEYS.get(key, key)
                if key in figures:  # the prefix cache's figures exist only where it is on (not in exact mode)
                    family.add_metric([name], figures[key])
            for reason, count in figures["finished"].items():
                finished.add_metric([name, reason], count)
            moe = engine.telemetry()
            for layer in moe.get("layers", []):
                labels = [name, str(layer["layer"])]
                if layer["idle_fraction"] is not None:
                    idle.add_metric(labels, layer["idle_fraction"])
                    per_active.add_metric(labels, layer["tokens_per_active_expert"])
                for expert, count in enumerate(layer["expert_tokens"]):
                    expert_tokens.add_metric([*labels, str(expert)], count)
        yield from gauges.values()
        yield from counters.values()
        yield from (finished, idle, per_active, expert_tokens)


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(ApplianceCollector())
REGISTRY.register(EngineCollector())
REGISTRY.register(ExternalEngineCollector())  # vLLM's own metrics, per variant
for _runtime in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # this web process's own CPU, memory, GC
    REGISTRY.register(_runtime)
# Every 5xx this web process answered on the API (a 500, a 503, or a stream that ended in an error event). The
# box-wide figure, across web processes and restarts, is appliance_requests{outcome="failed"} from the database.
SERVER_ERRORS = Counter("appliance_api_server_errors", "5xx answers of this web process's chat API.",
                        labelnames=["status"], registry=REGISTRY)


def count_server_error(status: int) -> None:
    """Count one 5xx answer (or a stream that failed after its 200) of this process."""
    SERVER_ERRORS.labels(status=str(status)).inc()


@csrf_exempt  # read-only: a POST is a 405, not CSRF's 403
def metrics(request):
    """Return the box's metrics, or 403 to callers off the allowlist without the token."""
    if request.method not in ("GET", "HEAD"):
        return HttpResponse(status=405, headers={"Allow": "GET, HEAD"})
    if not allowed(request):
        return HttpResponse("metrics are served to the allowlist or with the metrics token\n", status=403,
                            content_type="text/plain")
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
