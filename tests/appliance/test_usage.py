"""Usage accounting: one record per request, hourly and daily roll-ups, pruning, and the CSV export."""
import csv
import io
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from appliance import tasks, usage
from appliance.api.admission import RegistryGatekeeper
from appliance.models import Period, UsageRecord, UsageRollup
from appliance.api.gatekeeper import UsageReport

from .teams import team_with_key, variant

pytestmark = pytest.mark.django_db
gk = RegistryGatekeeper()
DAY = datetime(2030, 5, 17, tzinfo=dt_timezone.utc)


def add(when, team="research", model="general", latency=100, tokens=(10, 5), outcome="ok"):
    row = usage.record(team=team, key_prefix="sk-box-abcdef", variant=model, prompt_tokens=tokens[0],
                       completion_tokens=tokens[1], latency_ms=latency, ttft_ms=latency // 4, outcome=outcome)
    UsageRecord.objects.filter(pk=row.pk).update(created_at=when)


def test_settle_records_tokens_latency_ttft_outcome_team_key_and_variant():
    variant("general")
    _, key, plaintext = team_with_key("research")
    caller = gk.authenticate(plaintext)
    gk.settle(caller, gk.admit(caller, "general"), UsageReport("general", 12, 30, 850, 120, "ok"))
    row = UsageRecord.objects.get()
    assert (row.team, row.key_prefix, row.variant) == ("research", key.prefix, "general")
    assert (row.prompt_tokens, row.completion_tokens, row.latency_ms, row.ttft_ms, row.outcome) == (12, 30, 850, 120, "ok")


def test_settling_a_burst_sums_tokens_per_counter_and_inserts_every_row(django_assert_max_num_queries):
    from appliance.quotas import current_usage

    variant("general")
    _, key, plaintext = team_with_key("research")
    caller = gk.authenticate(plaintext)
    admissions = [gk.admit(caller, "general") for _ in range(5)]
    reports = [UsageReport("general", 10 + i, 20, 300, 40, "ok") for i in range(5)]
    with django_assert_max_num_queries(6):  # one token update, one insert (and the transaction around them)
        gk.settle_many([(caller, a, r) for a, r in zip(admissions, reports)])
    assert sorted(UsageRecord.objects.values_list("prompt_tokens", flat=True)) == [10, 11, 12, 13, 14]
    assert current_usage("key", key.pk)["tokens_per_minute"] == sum(r.prompt_tokens + 20 for r in reports)


def test_one_bad_report_in_a_burst_costs_only_its_own_row(caplog):
    variant("general")
    _, _, plaintext = team_with_key("research")
    caller = gk.authenticate(plaintext)
    good = UsageReport("general", 1, 2, 300, 40, "ok")
    bad = UsageReport("general", 1, 2, None, 40, "ok")  # a latency that cannot be stored
    gk.settle_many([(caller, gk.admit(caller, "general"), r) for r in (good, bad, good)])
    assert UsageRecord.objects.count() == 2
    assert "could not record usage of 1 requests" in caplog.text


def test_percentiles_use_the_nearest_rank():
    values = list(range(1, 101))
    assert usage.percentile(values, 50) == 50 and usage.percentile(values, 95) == 95
    assert usage.percentile([], 50) is None and usage.percentile([7], 95) == 7


def test_roll_up_sums_per_hour_and_day_and_prunes_finished_days():
    for minute in range(10):
        add(DAY + timedelta(hours=9, minutes=minute), latency=100 * (minute + 1))
    add(DAY + timedelta(hours=10), outcome="failed", tokens=(3, 0))
    add(DAY + timedelta(hours=10), team="sales", outcome="refused", tokens=(0, 0))
    result = usage.roll_up(now=DAY + timedelta(days=1, hours=1))
    assert result == {"hours": 3, "days": 2, "pruned": 12}
    assert not UsageRecord.objects.exists()
    nine = UsageRollup.objects.get(period=Period.HOUR, start=DAY + timedelta(hours=9), team="research")
    assert (nine.requests, nine.prompt_tokens, nine.completion_tokens) == (10, 100, 50)
    assert (nine.latency_p50_ms, nine.latency_p95_ms) == (500, 1000)
    day = UsageRollup.objects.get(period=Period.DAY, start=DAY, team="research")
    assert (day.requests, day.failed, day.prompt_tokens) == (11, 1, 103)
    assert UsageRollup.objects.get(period=Period.DAY, team="sales").refused == 1


def test_roll_up_keeps_today_raw_and_is_idempotent():
    add(DAY + timedelta(hours=3))
    now = DAY + timedelta(hours=5)
    usage.roll_up(now=now)
    usage.roll_up(now=now)
    assert UsageRecord.objects.count() == 1
    assert UsageRollup.objects.get(period=Period.HOUR).requests == 1


def test_series_counts_each_request_once_before_and_after_pruning():
    add(DAY + timedelta(hours=1), tokens=(4, 4))
    add(DAY + timedelta(hours=2), team="sales", tokens=(1, 1))
    before = usage.series(Period.DAY, DAY, DAY)
    usage.roll_up(now=DAY + timedelta(hours=3))  # rolled up, raw rows kept (today)
    during = usage.series(Period.DAY, DAY, DAY)
    usage.roll_up(now=DAY + timedelta(days=2))  # the day is over: pruned
    after = usage.series(Period.DAY, DAY, DAY)
    assert [(b.requests, b.tokens) for b in before] == [(2, 10)]
    assert [(b.requests, b.tokens) for b in during] == [(2, 10)]
    assert [(b.requests, b.tokens) for b in after] == [(2, 10)]
    hours = usage.series(Period.HOUR, DAY, DAY + timedelta(hours=3), team="sales")
    assert [b.requests for b in hours] == [0, 0, 1, 0]


def test_the_beat_task_rolls_up_and_prunes():
    add(timezone.now() - timedelta(days=3))
    result = tasks.roll_up_usage()
    assert result["pruned"] == 1 and UsageRollup.objects.filter(period=Period.DAY).count() == 1


@pytest.fixture
def console(client):
    client.force_login(get_user_model().objects.create_superuser("root", password="a-long-password"))
    return client


def test_csv_export_has_one_row_per_bucket(console):
    now = timezone.now()
    add(now, tokens=(7, 3), latency=250)
    add(now, team="sales", outcome="failed")
    response = console.get("/admin/usage/export.csv?period=day&team=research")
    assert response["Content-Type"] == "text/csv"
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert len(rows) == 1
    assert rows[0]["team"] == "research" and rows[0]["prompt_tokens"] == "7" and rows[0]["latency_p50_ms"] == "250"
    assert console.get("/admin/usage/export.csv?period=week").status_code == 400
