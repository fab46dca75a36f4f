"""/metrics for deployments on an external engine: the engine's own metrics, scraped from it, labelled per variant.

vLLM's families keep their names (vllm:num_requests_running, vllm:generation_tokens, ...), so dashboards made for
vLLM work unchanged; each sample gains `model`, the variant it serves, and one family holds the samples of every
deployment that reports it (the text format allows a family once). Where vLLM runs expert parallelism with EPLB, its
latest expert load report (which vLLM logs, and does not export) is added as appliance_vllm_eplb_* gauges.
"""
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from . import engine_client

EPLB_GAUGES = {
    "balancedness": "vLLM EPLB: mean over max of the EP ranks' expert token load (1 is even), latest report.",
    "avg_tokens": "vLLM EPLB: mean expert token load per EP rank over the MoE layers, latest report.",
    "max_tokens": "vLLM EPLB: largest expert token load of an EP rank over the MoE layers, latest report.",
    "step": "vLLM EPLB: the engine step of the latest expert load report.",
}


class ExternalEngineCollector:
    """Yield the scraped families of every loaded engine that has its own metrics (those whose client scrapes)."""

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        eplb = {key: GaugeMetricFamily(f"appliance_vllm_eplb_{key}", text, labels=["model"])
                for key, text in EPLB_GAUGES.items()}
        for name in engine_client.names():
            engine = engine_client.get(name)
            if engine is None or not hasattr(engine, "scraped"):
                continue  # the builtin engine's figures are appliance.metrics.EngineCollector's
            report = engine.eplb()
            if report is not None:
                for key, family in eplb.items():
                    family.add_metric([name], report[key])
            for family in engine.scraped():
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    out.add_sample(sample.name, {**sample.labels, "model": name}, sample.value, sample.timestamp)
        yield from merged.values()
        yield from (family for family in eplb.values() if family.samples)
