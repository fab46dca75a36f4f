"""/metrics for deployments on an external engine: the engine's own metrics, scraped from it, labelled per variant.

vLLM's families keep their names (vllm:num_requests_running, vllm:generation_tokens, ...), so dashboards made for
vLLM work unchanged; each sample gains `model`, the variant it serves, and one family holds the samples of every
deployment that reports it (the text format allows a family once).
"""
from collections.abc import Iterator

from prometheus_client.core import Metric

from . import engine_client


class ExternalEngineCollector:
    """Yield the scraped families of every loaded engine that has its own metrics (those whose client scrapes)."""

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for name in engine_client.names():
            engine = engine_client.get(name)
            if engine is None or not hasattr(engine, "scraped"):
                continue  # the builtin engine's figures are appliance.metrics.EngineCollector's
            for family in engine.scraped():
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    out.add_sample(sample.name, {**sample.labels, "model": name}, sample.value, sample.timestamp)
        yield from merged.values()
