"""/metrics in Prometheus text format: registry, usage and memory figures of the whole box.

Usage counters are read from the database (roll-ups plus raw records), so
every web process answers with the same box-wide totals. Metrics that other
code registers on prometheus_client's default registry (the engine's, for
instance) are served too, so inference/ can add its own without touching this.
"""
import hmac
import ipaddress

from django.conf import settings
from django.http import HttpResponse
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from appliance.api import metrics as engine_metrics

from .. import usage
from ..models import ModelVariant
from . import dashboard


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
        queue = GaugeMetricFamily("appliance_engine_queue_depth", "Requests waiting in the engine.", labels=["variant"])
        kv = GaugeMetricFamily("appliance_engine_kv_cache_used_ratio", "Share of the KV cache in use.",
                               labels=["variant"])
        for row in dashboard.variants():
            v = row["variant"]
            info.add_metric([v.name, v.kind, v.status], 1)
            loaded.add_metric([v.name], 1 if row["loaded"] else 0)
            if "queue_depth" in row["stats"]:
                queue.add_metric([v.name], row["stats"]["queue_depth"])
            if "kv_cache_used_ratio" in row["stats"]:
                kv.add_metric([v.name], row["stats"]["kv_cache_used_ratio"])
        yield from (info, loaded, queue, kv)

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


_registry = CollectorRegistry(auto_describe=False)
_registry.register(ApplianceCollector())


def metrics(request):
    """Return the box's metrics, or 403 to callers off the allowlist without the token."""
    if not allowed(request):
        return HttpResponse("metrics are served to the allowlist or with the metrics token\n", status=403,
                            content_type="text/plain")
    # The registry's figures, the engines' own (batch, KV, MoE expert telemetry), and the process defaults.
    body = generate_latest(_registry) + generate_latest(engine_metrics.REGISTRY) + generate_latest(REGISTRY)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
