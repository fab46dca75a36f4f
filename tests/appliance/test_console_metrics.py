"""/metrics: Prometheus text for the allowlist or the token holder, box-wide usage from the database."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance import usage
from appliance.models import VariantStatus

from .teams import bearer, team_with_key, variant

pytestmark = pytest.mark.django_db


@pytest.fixture
def traffic():
    variant("general", VariantStatus.READY)
    _, _, key = team_with_key("research")
    for latency in (80, 400, 3000):
        usage.record(team="research", key_prefix="sk-box-abcdef", variant="general", prompt_tokens=10,
                     completion_tokens=20, latency_ms=latency, ttft_ms=10, outcome="ok")
    usage.record(team="research", key_prefix="sk-box-abcdef", variant="general", prompt_tokens=0,
                 completion_tokens=0, latency_ms=0, ttft_ms=None, outcome="refused")
    return key


def samples(response) -> dict:
    found = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            found[s.name, tuple(sorted(s.labels.items()))] = s.value
    return found


def test_loopback_reads_request_token_and_latency_metrics(client, traffic):
    response = client.get("/metrics", REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    found = samples(response)
    labels = (("team", "research"), ("variant", "general"))
    assert found["appliance_requests_total", tuple(sorted(labels + (("outcome", "ok"),)))] == 3
    assert found["appliance_requests_total", tuple(sorted(labels + (("outcome", "refused"),)))] == 1
    assert found["appliance_tokens_total", tuple(sorted(labels + (("kind", "completion"),)))] == 60
    assert found["appliance_request_latency_seconds_bucket", tuple(sorted(labels + (("le", "0.5"),)))] == 2
    assert found["appliance_request_latency_seconds_count", labels] == 3
    assert found["appliance_variant_info", (("kind", "dense"), ("status", "ready"), ("variant", "general"))] == 1
    assert ("appliance_host_memory_total_bytes", ()) in found


def test_the_totals_survive_the_roll_up(client, traffic):
    before = samples(client.get("/metrics", REMOTE_ADDR="127.0.0.1"))
    usage.roll_up()
    after = samples(client.get("/metrics", REMOTE_ADDR="127.0.0.1"))
    assert {k: v for k, v in after.items() if k[0].startswith("appliance_re")} == \
           {k: v for k, v in before.items() if k[0].startswith("appliance_re")}


def test_an_address_off_the_allowlist_is_refused(client, traffic):
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 403


def test_a_team_key_is_not_a_metrics_token(client, traffic, settings):
    settings.METRICS_TOKEN = "scrape-token-123"
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3", **bearer(traffic)).status_code == 403


def test_the_metrics_token_opens_it_from_elsewhere(client, traffic, settings):
    settings.METRICS_TOKEN = "scrape-token-123"
    response = client.get("/metrics", REMOTE_ADDR="10.1.2.3", HTTP_AUTHORIZATION="Bearer scrape-token-123")
    assert response.status_code == 200


def test_the_allowlist_takes_networks(client, traffic, settings):
    settings.METRICS_ALLOW = ["10.0.0.0/8"]
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403


def test_5xx_without_an_admitted_request_and_interrupted_requests_are_failures(client, traffic, transactional_db):
    from django.utils import timezone

    from appliance.console import dashboard
    from audit import ledger
    from tests.audit.tamper import wipe_ledger

    try:
        before = dashboard.traffic(timezone.now())["failed_day"]
        ledger.append("api.error", actor="anonymous", target="/v1/models", outcome="error",
                      details={"status": 500, "in_usage": False})
        ledger.append("chat.interrupted", actor="team:research", target="general", outcome="interrupted")
        ledger.append("api.error", actor="anonymous", target="/v1/x", outcome="error", details={"in_usage": True})
        assert dashboard.traffic(timezone.now())["failed_day"] == before + 2
        found = samples(client.get("/metrics", REMOTE_ADDR="127.0.0.1"))
        assert found["appliance_requests_total", (("outcome", "failed"), ("team", ""), ("variant", ""))] == 2
    finally:
        wipe_ledger()
