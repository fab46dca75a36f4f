"""Rate limits and token budgets: which limit refuses, what the client is told, and that processes share them."""
import json
import os
import subprocess
import sys
from datetime import datetime, timezone as dt_timezone

import httpx
import pytest

from appliance import actions, quotas
from appliance.api.admission import RegistryGatekeeper
from appliance.models import UsageCounter, UsageRecord, Window
from audit.models import AuditEvent
from appliance.api.gatekeeper import UsageReport
from tests.livebox import PostgresDatabase, free_port, start, wait_http

from .teams import team_with_key, variant

pytestmark = pytest.mark.django_db
gk = RegistryGatekeeper()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def report(tokens: int = 0, outcome: str = "ok") -> UsageReport:
    return UsageReport("general", prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2,
                       latency_ms=40, ttft_ms=10, outcome=outcome)


@pytest.fixture
def general():
    return variant("general")


def caller_of(plaintext):
    return gk.authenticate(plaintext)


def test_windows_are_calendar_minutes_days_and_months_in_utc():
    now = datetime(2024, 2, 29, 23, 59, 30, 5, tzinfo=dt_timezone.utc)
    assert quotas.window_bounds(Window.MINUTE, now) == (datetime(2024, 2, 29, 23, 59, tzinfo=dt_timezone.utc),
                                                        datetime(2024, 3, 1, 0, 0, tzinfo=dt_timezone.utc))
    assert quotas.window_bounds(Window.DAY, now)[1] == datetime(2024, 3, 1, tzinfo=dt_timezone.utc)
    assert quotas.window_bounds(Window.MONTH, now) == (datetime(2024, 2, 1, tzinfo=dt_timezone.utc),
                                                       datetime(2024, 3, 1, tzinfo=dt_timezone.utc))


def test_requests_per_minute_refuses_the_next_request_naming_the_limit(general):
    _, _, key = team_with_key("research", requests_per_minute=3)
    caller = caller_of(key)

    def four_requests():
        admitted = [gk.admit(caller, "general").allowed for _ in range(3)]
        return admitted, gk.admit(caller, "general")

    admitted, refused = in_one_minute(four_requests)
    assert all(admitted)
    assert (refused.allowed, refused.status, refused.code) == (False, 429, "rate_limit_exceeded")
    assert "Team 'research'" in refused.message and "3 requests per minute" in refused.message
    assert "resets at" in refused.message and 1 <= refused.retry_after_s <= 60


def test_tokens_per_minute_counts_what_settle_reports(general):
    _, _, key = team_with_key("research", tokens_per_minute=100)
    caller = caller_of(key)
    admission = gk.admit(caller, "general")
    gk.settle(caller, admission, report(tokens=60))
    second = gk.admit(caller, "general")
    assert second.allowed  # 60 of 100 used: a budget refuses only once it is spent
    gk.settle(caller, second, report(tokens=60))
    refused = gk.admit(caller, "general")
    assert refused.status == 429 and "100 tokens per minute" in refused.message


def test_a_team_over_its_monthly_budget_is_told_when_it_resets(general):
    team, _, key = team_with_key("research", tokens_per_month=1000, tokens_per_day=10**6)
    caller = caller_of(key)
    gk.settle(caller, gk.admit(caller, "general"), report(tokens=1500))
    refused = gk.admit(caller, "general")
    assert refused.code == "insufficient_quota" and "1,000 tokens per month" in refused.message
    resets = quotas.window_bounds(Window.MONTH, datetime.now(dt_timezone.utc))[1]
    assert f"{resets:%Y-%m-%d} 00:00:00 UTC" in refused.message
    assert refused.retry_after_s > 60


def test_a_key_limit_binds_that_key_only(general):
    team, key_row, key = team_with_key("research")
    key_row.requests_per_minute = 1
    key_row.save()
    from appliance.models import ApiKey
    _, other = ApiKey.issue(team)
    assert gk.admit(caller_of(key), "general").allowed
    refused = gk.admit(caller_of(key), "general")
    assert refused.status == 429 and f"API key {key_row.prefix}…" in refused.message
    assert gk.admit(caller_of(other), "general").allowed


def test_a_team_limit_is_shared_by_all_its_keys(general):
    team, _, first = team_with_key("research", requests_per_minute=2)
    from appliance.models import ApiKey
    _, second = ApiKey.issue(team)
    assert gk.admit(caller_of(first), "general").allowed
    assert gk.admit(caller_of(second), "general").allowed
    assert gk.admit(caller_of(first), "general").status == 429
    assert gk.admit(caller_of(second), "general").status == 429


def test_refused_requests_are_not_charged_but_are_accounted(general):
    team, _, key = team_with_key("research", requests_per_minute=1)
    caller = caller_of(key)
    gk.admit(caller, "general")
    for _ in range(3):
        gk.admit(caller, "general")
    minute = UsageCounter.objects.get(scope="team", scope_id=team.pk, window=Window.MINUTE)
    assert minute.requests == 1
    assert UsageRecord.objects.filter(team="research", outcome="refused").count() == 3


def test_settle_ignores_a_refusal_so_a_caller_that_always_settles_is_not_double_counted(general):
    _, _, key = team_with_key("research", requests_per_minute=0)
    caller = caller_of(key)
    refused = gk.admit(caller, "general")
    gk.settle(caller, refused, report(tokens=0, outcome="refused"))
    assert UsageRecord.objects.count() == 1


def test_limits_change_through_an_action_that_records_the_change(general):
    team, key_row, _ = team_with_key("research")
    changes = actions.do_update_team(team, actor="admin:root", values={"tokens_per_day": 5000, "all_variants": False},
                                     variants=[general])
    assert changes == {"tokens_per_day": [None, 5000], "all_variants": [True, False],
                       "variants": [[], ["general"]]}
    event = AuditEvent.objects.get(action="team.update")
    assert event.target == "research" and event.details["changes"]["tokens_per_day"] == [None, 5000]
    actions.do_update_api_key(key_row, actor="admin:root", values={"requests_per_minute": 7})
    assert AuditEvent.objects.get(action="apikey.update").details["key"] == key_row.prefix
    assert actions.do_update_team(team, actor="admin:root", values={"tokens_per_day": 5000}) == {}
    assert AuditEvent.objects.filter(action="team.update").count() == 1  # no change, no event


def test_unknown_fields_are_refused_by_the_actions(general):
    team, _, _ = team_with_key("research")
    with pytest.raises(actions.ActionRefused):
        actions.do_update_team(team, actor="admin:root", values={"name": "renamed"})


def test_old_counters_are_pruned(general):
    team, _, key = team_with_key("research")
    gk.admit(caller_of(key), "general")
    assert quotas.prune_counters(datetime(2099, 1, 1, tzinfo=dt_timezone.utc)) == 6
    assert not UsageCounter.objects.exists()


# --- across processes: each process is a separate database client -----------------------------

ADMIT_SCRIPT = """
from appliance.api.admission import RegistryGatekeeper
gk = RegistryGatekeeper()
caller = gk.authenticate(open({key_file!r}).read().strip())
print(sum(gk.admit(caller, 'general').allowed for _ in range({n})))
"""
SETUP_SCRIPT = """
from appliance.models import ApiKey, ModelVariant, Team
ModelVariant.objects.create(name='general', kind='dense', source_path='/x', status='ready')
team = Team.objects.create(name='shared', requests_per_minute={limit})
open({key_file!r}, 'w').write(ApiKey.issue(team)[1])
"""
FORGET_SCRIPT = "from appliance.models import UsageCounter; UsageCounter.objects.all().delete()"


def forget_counts() -> None:
    """Delete every usage counter of this test's database: what a straddling run counted must not count again."""
    UsageCounter.objects.all().delete()


def in_one_minute(scenario, forget=forget_counts):
    """Return what scenario returns from a run that began and ended in one UTC minute (a rate-limit window).

    A run that straddles a minute boundary counts in two windows; it is run again, at once, after `forget` has
    deleted what it counted (its requests after the boundary sit in the new minute's counters): that run starts
    just after a boundary, so it fits unless it takes a whole minute. No waiting for the clock.
    """
    for _ in range(3):
        began = datetime.now(dt_timezone.utc).replace(second=0, microsecond=0)
        result = scenario()
        if datetime.now(dt_timezone.utc).replace(second=0, microsecond=0) == began:
            return result
        forget()
    raise AssertionError("three runs in a row straddled a minute boundary")


@pytest.fixture
def separate_box(tmp_path):
    """Return (env, run) for a migrated database of its own that subprocesses share."""
    env = {**os.environ, "APPLIANCE_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    database = None
    if os.environ.get("DATABASE_URL", "").startswith("postgres"):
        database = PostgresDatabase(os.environ["DATABASE_URL"])
        env["DATABASE_URL"] = database.url

    def manage(*args, background=False):
        cmd = [sys.executable, "manage.py", *args]
        if background:
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    manage("migrate", "--verbosity", "0")
    try:
        yield env, manage
    finally:
        if database:
            database.drop()


def test_two_processes_share_one_limit_in_the_database(separate_box, tmp_path):
    env, manage = separate_box
    key_file = str(tmp_path / "key")
    manage("shell", "--no-imports", "-c", SETUP_SCRIPT.format(limit=25, key_file=key_file))

    def attempt() -> list[int]:
        procs = [manage("shell", "--no-imports", "-c", ADMIT_SCRIPT.format(key_file=key_file, n=20), background=True)
                 for _ in range(2)]
        outputs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
        return [int(out.strip().splitlines()[-1]) for out, _ in outputs]

    admitted = in_one_minute(attempt, forget=lambda: manage("shell", "--no-imports", "-c", FORGET_SCRIPT))
    # 40 attempts inside one minute against a limit of 25: exactly 25 pass, whoever ran first.
    assert sum(admitted) == 25, admitted


# Needs the gatekeeper wired into appliance/api/views.py: two web processes, one limit.
@pytest.mark.e2e
def test_two_web_processes_share_one_limit(separate_box, tmp_path):
    env, manage = separate_box
    key_file = str(tmp_path / "key")
    manage("shell", "--no-imports", "-c", SETUP_SCRIPT.format(limit=4, key_file=key_file))
    key = open(key_file).read().strip()
    logs = tmp_path / "logs"
    logs.mkdir()
    ports = [free_port(), free_port()]
    procs = {f"web{i}": start([sys.executable, "-m", "uvicorn", "appliance.asgi:application", "--host", "127.0.0.1",
                               "--port", str(port), "--lifespan", "off"], env, logs / f"web{i}.log")
             for i, port in enumerate(ports)}
    try:
        for port in ports:
            wait_http(f"http://127.0.0.1:{port}/v1/models", procs, logs)
        body = {"model": "general", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

        def attempt() -> tuple[list[int], httpx.Response]:
            statuses, last = [], None
            for i in range(6):
                r = httpx.post(f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions", json=body, timeout=30,
                               headers={"Authorization": f"Bearer {key}"})
                statuses.append(r.status_code)
                if r.status_code == 429:
                    last = r
            return statuses, last

        statuses, last = in_one_minute(attempt, forget=lambda: manage("shell", "--no-imports", "-c", FORGET_SCRIPT))
        # Admitted requests get 503 (nothing is loaded); the limit of 4 holds across both processes.
        assert statuses.count(503) == 4 and statuses.count(429) == 2, statuses
        assert "4 requests per minute" in last.json()["error"]["message"]
        assert 1 <= int(last.headers["Retry-After"]) <= 60
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=20)


# --- the unlimited fast path ----------------------------------------------------------------------------

def test_an_unlimited_key_is_charged_with_one_update_once_its_counters_exist(general, transactional_db,
                                                                             django_assert_max_num_queries):
    _, api_key, key = team_with_key("unlimited")
    caller = caller_of(key)
    assert gk.admit(caller, "general").allowed  # creates the six counters (committed: remembered)
    with django_assert_max_num_queries(3) as captured:  # BEGIN, UPDATE, COMMIT
        quotas.charge(api_key)
    assert [q["sql"].split()[0] for q in captured.captured_queries if "usagecounter" in q["sql"]] == ["UPDATE"]
    counters = UsageCounter.objects.filter(scope_id__in=(api_key.pk, api_key.team.pk))
    assert counters.count() == 6 and {c.requests for c in counters} == {2}


def test_a_counter_deleted_behind_the_cache_is_recreated_and_counted_once(general, transactional_db):
    _, api_key, key = team_with_key("unlimited")
    quotas.charge(api_key)
    UsageCounter.objects.filter(scope="key", window=Window.MINUTE).delete()
    quotas.charge(api_key)
    counters = {(c.scope, c.window): c.requests for c in UsageCounter.objects.all()}
    assert counters[("key", Window.MINUTE)] == 1
    assert counters[("team", Window.MINUTE)] == 2 and counters[("key", Window.DAY)] == 2


def test_a_limit_set_after_counters_were_remembered_is_enforced(general, transactional_db):
    team, api_key, key = team_with_key("unlimited")
    caller = caller_of(key)
    assert gk.admit(caller, "general").allowed
    team.requests_per_minute = 2
    team.save()
    assert gk.admit(caller_of(key), "general").allowed
    assert gk.admit(caller_of(key), "general").code == "rate_limit_exceeded"


# --- x-ratelimit-* headers ------------------------------------------------------------------------------------

def test_a_limited_key_is_told_its_tightest_limits_as_openai_headers(general):
    _, api_key, key = team_with_key("research", requests_per_minute=3, tokens_per_day=1000)
    api_key.tokens_per_minute = 400
    api_key.save()
    caller = caller_of(key)

    def two_requests():
        first = gk.admit(caller, "general")
        gk.settle(caller, first, report(tokens=100))
        return first, gk.admit(caller, "general")

    first, second = in_one_minute(two_requests)
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert (first.headers["x-ratelimit-remaining-requests"], second.headers["x-ratelimit-remaining-requests"]) == (
        "2", "1")
    # The key's 400 per minute has less left than the team's 1000 per day: it stands for tokens.
    assert (second.headers["x-ratelimit-limit-tokens"], second.headers["x-ratelimit-remaining-tokens"]) == (
        "400", "300")
    assert second.headers["x-ratelimit-reset-requests"].endswith("s")
    refused = in_one_minute(lambda: [gk.admit(caller, "general") for _ in range(4)][-1])
    assert refused.status == 429 and refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_an_unlimited_key_gets_no_rate_limit_headers(general):
    _, _, key = team_with_key("unlimited")
    assert gk.admit(caller_of(key), "general").headers == {}


@pytest.mark.parametrize("seconds,text", [(0.02, "20ms"), (1, "1s"), (59.2, "1m0s"), (360, "6m0s"),
                                          (86399.5, "24h0m0s"), (3 * 3600 + 62, "3h1m2s")])
def test_reset_times_are_written_as_openai_writes_them(seconds, text):
    assert quotas.duration(seconds) == text
