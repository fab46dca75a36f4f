"""/metrics: engine and MoE figures in Prometheus text format."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from appliance import engine_client
from inference.engine import Engine, SamplingParams
from tests.inference.conftest import run


@pytest.fixture
def served(engines: dict[str, Engine]):
    """Register the shared demo-moe and demo-dense engines under test names for the view to find."""
    names = {"metrics-moe": engines["demo-moe"], "metrics-dense": engines["demo-dense"]}
    for name, engine in names.items():
        engine_client.register(name, engine)
    yield names
    for name in names:
        engine_client.unregister(name)


def scrape() -> dict[str, list]:
    response = Client().get("/metrics", REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(response.content.decode())}


@pytest.mark.django_db
def test_metrics_show_each_engine_and_the_moe_idle_experts(served) -> None:
    engine = served["metrics-moe"]

    async def one() -> None:
        handle = engine.submit(engine.encode_chat([{"role": "user", "content": "hi"}]), SamplingParams(max_tokens=3))
        [c async for c in handle]

    run(one())
    families = scrape()
    budget = {s.labels["model"]: s.value for s in families["appliance_engine_kv_budget_bytes"]}
    assert budget["metrics-moe"] == engine.scheduler.kv_budget_bytes
    generated = {s.labels["model"]: s.value for s in families["appliance_engine_generated_tokens"]
                 if s.name.endswith("_total")}
    assert generated["metrics-moe"] >= 3
    idle = [s for s in families["appliance_moe_idle_expert_fraction"] if s.labels["model"] == "metrics-moe"]
    assert [s.labels["layer"] for s in idle] == ["1", "2"] and all(0 <= s.value <= 1 for s in idle)
    assert not [s for s in idle if s.labels["model"] == "metrics-dense"]
    experts = [s for s in families["appliance_moe_expert_tokens"] if s.labels["model"] == "metrics-moe"
               and s.name.endswith("_total")]
    assert len(experts) == 2 * 16


@pytest.mark.django_db
def test_metrics_show_the_prefix_cache_and_preemptions(demo_dir: Path, served) -> None:
    # Plain mode, the default: exact mode has no prefix cache.
    with Engine(demo_dir / "demo-dense", device="cpu", telemetry=False) as engine:
        engine_client.register("metrics-plain", engine)
        try:
            prompt = engine.encode_chat([{"role": "user", "content": "a shared system prompt " * 40}])

            async def twice() -> None:
                for _ in range(2):
                    [c async for c in engine.submit(prompt, SamplingParams(max_tokens=2), cache_scope="team")]

            run(twice())
            families = scrape()
        finally:
            engine_client.unregister("metrics-plain")

    def value(family: str) -> float:
        return next(s.value for s in families[family] if s.labels["model"] == "metrics-plain")

    hit, queried = value("appliance_engine_prefix_cache_hit_tokens"), value("appliance_engine_prefix_cache_query_tokens")
    assert 0 < hit <= queried == 2 * len(prompt)
    assert value("appliance_engine_prefix_cache_blocks") > 0 and value("appliance_engine_prefix_cache_bytes") > 0
    assert value("appliance_engine_preemptions") == 0
    # The exact-mode engines have no prefix cache, and say nothing about one.
    assert "metrics-dense" in {s.labels["model"] for s in families["appliance_engine_steps"]}
    assert "metrics-dense" not in {s.labels["model"] for s in families["appliance_engine_prefix_cache_hit_tokens"]}


@pytest.mark.django_db
def test_metrics_refuse_writes() -> None:
    response = Client().post("/metrics", REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 405 and response["Allow"] == "GET, HEAD"
