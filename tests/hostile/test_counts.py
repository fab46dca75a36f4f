"""What the box counts against a live box: outcomes as clients really end them, every 5xx, what /v1/models
offers, the rate-limit headers, and requests cut by a web crash."""
import json
import re
import sys

import httpx
import openai
import pytest

from tests.livebox import WEB_ARGS, start, start_box, wait_http

CHAT = "/v1/chat/completions"
# Waits for the box's own writer thread to commit (an upper bound, polled from inside one manage.py shell).
WAIT_FOR = '''
import json, time
from audit.models import AuditEvent
from appliance.models import UsageRecord
deadline = time.monotonic() + 60
while True:
    {query}
    if found or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(json.dumps(found))
'''


def wait_for(box, query: str):
    """Run `query` (setting `found`) in a shell on the box until found is truthy; return it (JSON-decoded)."""
    out = box.manage("shell", "--no-imports", "-c", WAIT_FOR.format(query=query)).stdout
    return json.loads(out.strip().splitlines()[-1])


def alive(box) -> None:
    assert all(proc.poll() is None for proc in box.procs.values()), {n: p.poll() for n, p in box.procs.items()}


@pytest.fixture(scope="module")
def counted(box):
    """Return the box with `counts-dense` deployed and `counts-idle` imported but not deployed."""
    box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", "counts-dense", "--kind", "dense", "--wait")
    box.manage("deploy", "counts-dense", "--wait")
    box.manage("import_model", str(box.demo_dir / "demo-distilled"), "--name", "counts-idle", "--kind", "distilled",
               "--wait")
    return box


def client(box, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_a_stream_read_to_done_and_closed_is_ok_in_the_ledger_and_in_usage(counted):
    box = counted
    key = box.new_key("hostile-counts-stream")
    stream = client(box, key).chat.completions.create(
        model="counts-dense", messages=[{"role": "user", "content": "count"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True},
        # A random-weight model may sample its end-of-sequence token early; the count under test is 5.
        extra_body={"ignore_eos": True})
    chunks = list(stream)  # the SDK reads to data: [DONE] and closes the response there
    request_id = chunks[0].id
    assert chunks[-1].usage.completion_tokens == 5
    event = wait_for(box, f'found = list(AuditEvent.objects.filter(action="chat.completion", '
                          f'details__request_id="{request_id}").values_list("outcome", flat=True))')
    assert event == ["ok"]
    usage = wait_for(box, 'found = list(UsageRecord.objects.filter(team="hostile-counts-stream")'
                          '.values_list("outcome", "completion_tokens"))')
    assert usage == [["ok", 5]]
    alive(box)
    box.manage("audit_verify")


def metric(box, name: str, **labels: str) -> float:
    """Return one sample of the box's /metrics (0 when absent)."""
    text = httpx.get(f"{box.url}/metrics", timeout=60).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        metric_name, _, rest = line.partition("{")
        if metric_name == name and rest.startswith(wanted + "}"):
            return float(rest.rsplit(" ", 1)[1])
    return 0.0


def failed_today(box) -> int:
    return int(box.manage("shell", "--no-imports", "-c",
                          "from django.utils import timezone\nfrom appliance.console import dashboard\n"
                          "print(dashboard.traffic(timezone.now())['failed_day'])").stdout.split()[-1])


def test_a_503_is_an_error_on_the_dashboard_and_in_metrics(counted):
    box = counted
    key = box.new_key("hostile-counts-5xx")
    errors_before, dashboard_before = metric(box, "appliance_api_server_errors_total", status="503"), failed_today(box)
    with pytest.raises(openai.InternalServerError) as refused:
        client(box, key).chat.completions.create(model="counts-idle", messages=[{"role": "user", "content": "x"}])
    assert refused.value.status_code == 503 and "not loaded" in refused.value.message
    wait_for(box, 'found = UsageRecord.objects.filter(team="hostile-counts-5xx").exists()')
    assert metric(box, "appliance_requests_total", outcome="failed", team="hostile-counts-5xx",
                  variant="counts-idle") == 1
    assert metric(box, "appliance_api_server_errors_total", status="503") == errors_before + 1
    assert failed_today(box) >= dashboard_before + 1
    alive(box)
    box.manage("audit_verify")


def test_models_lists_only_what_is_loaded(counted):
    box = counted
    ids = [m.id for m in client(box, box.new_key("hostile-counts-models")).models.list()]
    assert "counts-dense" in ids and "counts-idle" not in ids
    alive(box)


def test_a_limited_team_gets_openai_rate_limit_headers_and_an_unlimited_one_none(counted):
    box = counted
    key = box.new_key("hostile-counts-limited")
    box.manage("shell", "--no-imports", "-c",
               "from appliance import actions\nfrom appliance.models import Team\n"
               "actions.do_update_team(Team.objects.get(name='hostile-counts-limited'), actor='admin:hostile', "
               "values={'requests_per_minute': 50, 'tokens_per_day': 100000})")
    raw = client(box, key).chat.completions.with_raw_response.create(
        model="counts-dense", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert raw.http_response.status_code == 200
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "50"
    assert int(headers["x-ratelimit-remaining-requests"]) in (48, 49)  # 49 unless the minute turned meanwhile
    # under a second left in the minute reads "461ms", as OpenAI writes it
    assert re.fullmatch(r"\d+ms|\d+s|1m0s", headers["x-ratelimit-reset-requests"])
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(headers["x-ratelimit-remaining-tokens"]) <= 100000
    assert re.fullmatch(r"\d+h\d+m\d+s|\d+m\d+s|\d+s|\d+ms", headers["x-ratelimit-reset-tokens"])
    unlimited = client(box, box.new_key("hostile-counts-unlimited")).chat.completions.with_raw_response.create(
        model="counts-dense", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert not [name for name in unlimited.headers if name.startswith("x-ratelimit")]
    alive(box)
    box.manage("audit_verify")


def test_a_web_process_killed_mid_stream_leaves_a_chat_interrupted_event(tmp_path_factory):
    gen = start_box(tmp_path_factory)
    box = next(gen)
    try:
        box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", "crash-dense", "--kind", "dense",
                   "--wait")
        box.manage("deploy", "crash-dense", "--wait")
        key = box.new_key("hostile-crash")
        body = {"model": "crash-dense", "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 1500, "stream": True,
                "ignore_eos": True}  # still streaming when the web process is killed, whatever the weights sample
        with httpx.stream("POST", box.url + CHAT, json=body, headers={"Authorization": f"Bearer {key}"},
                          timeout=120) as stream:
            # The line iterator is held until the kill: one dropped here is finalized at once, which closes the
            # connection, and the web process could then settle the stream as cancelled before it is killed.
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            request_id = json.loads(first[len("data: "):])["id"]
            box.procs["web"].kill()  # SIGKILL: no handler, no settlement, no cleanup
            box.procs["web"].wait(timeout=60)
        port = box.url.rsplit(":", 1)[1]
        box.procs["web"] = start([sys.executable, "-m", "uvicorn", "appliance.asgi:application", "--host",
                                  "127.0.0.1", "--port", port, "--lifespan", "off", *WEB_ARGS], box.env,
                                 box.home / "logs" / "web-restarted.log")
        wait_http(f"{box.url}/v1/models", box.procs, box.home / "logs")
        event = wait_for(box, f'found = list(AuditEvent.objects.filter(action="chat.interrupted", '
                              f'details__request_id="{request_id}").values("actor", "target", "outcome"))')
        assert event == [{"actor": "team:hostile-crash", "target": "crash-dense", "outcome": "interrupted"}]
        assert wait_for(box, "from audit.models import InFlightRequest\n    found = not InFlightRequest.objects."
                             f"filter(request_id='{request_id}').exists()")
        assert failed_today(box) >= 1  # the dashboard counts it as an error
        alive(box)
        box.manage("audit_verify")
    finally:
        gen.close()
