"""/metrics: the engines' figures in Prometheus text format (batch, queue, KV budget, MoE idle experts).

Read-only and free of prompts and answers; counts only. The box's /metrics
(appliance/console/metrics.py) serves REGISTRY next to the registry's own figures.
"""

from __future__ import annotations

from collections.abc import Iterator

from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from appliance import engine_client


class EngineCollector:
    """Collect the figures of every engine this web process has loaded, at scrape time."""

    def collect(self) -> Iterator[Metric]:
        engines = [(name, engine_client.get(name)) for name in engine_client.names()]
        engines = [(name, engine) for name, engine in engines if engine is not None]
        gauges = {
            "running": GaugeMetricFamily("appliance_engine_requests_running", "Requests in the running batch.",
                                         labels=["model"]),
            "waiting": GaugeMetricFamily("appliance_engine_requests_waiting", "Requests waiting for admission.",
                                         labels=["model"]),
            "kv_budget_bytes": GaugeMetricFamily("appliance_engine_kv_budget_bytes",
                                                 "KV-cache memory the deployment may hold.", labels=["model"]),
            "kv_reserved_bytes": GaugeMetricFamily("appliance_engine_kv_reserved_bytes",
                                                   "KV-cache memory reserved by running requests.", labels=["model"]),
            "mean_batch_size": GaugeMetricFamily("appliance_engine_mean_batch_size",
                                                 "Mean requests per step since load.", labels=["model"]),
        }
        counters = {
            "steps": CounterMetricFamily("appliance_engine_steps", "Model steps run.", labels=["model"]),
            "step_seconds": CounterMetricFamily("appliance_engine_step_seconds", "Seconds spent in steps.",
                                                labels=["model"]),
            "prompt_tokens": CounterMetricFamily("appliance_engine_prompt_tokens", "Prompt tokens prefilled.",
                                                 labels=["model"]),
            "generated_tokens": CounterMetricFamily("appliance_engine_generated_tokens", "Tokens generated.",
                                                    labels=["model"]),
        }
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
            for key, family in gauges.items():
                family.add_metric([name], figures[key])
            for key, family in counters.items():
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
REGISTRY.register(EngineCollector())
# Every 5xx this web process answered on the API (a 500, a 503, or a stream that ended in an error event). The
# box-wide figure, across web processes and restarts, is appliance_requests{outcome="failed"} from the database.
SERVER_ERRORS = Counter("appliance_api_server_errors", "5xx answers of this web process's chat API.",
                        labelnames=["status"], registry=REGISTRY)


def count_server_error(status: int) -> None:
    """Count one 5xx answer (or a stream that failed after its 200) of this process."""
    SERVER_ERRORS.labels(status=str(status)).inc()


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Return the engines' figures in Prometheus text format."""
    if request.method not in ("GET", "HEAD"):
        return HttpResponse(status=405, headers={"Allow": "GET, HEAD"})
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
