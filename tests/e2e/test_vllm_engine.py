"""A deployment on vLLM (its CPU build, in its own virtualenv) served through the appliance, with real processes.

One box and one vLLM deployment for the whole module: vLLM takes about a minute to start on this CPU. Selected
only by `pytest -m vllm` (tests/conftest.py), which CI runs in a step of its own with the virtualenv that
bench/peers_setup.sh builds; without that virtualenv these tests fail, they never skip.
"""
import json
import os
import signal
import time
from pathlib import Path

import httpx
import jsonschema_rs
import openai
import psutil
import pytest

from tests.api.tool_variant import write_tool_variant
from tests.livebox import read_stream, start_box

# A start of vLLM (the deploy fixture, and each restart the crash and hang tests wait for) takes minutes when the
# two cores are shared: past pytest's default 300 s, within the deploy's own 900 s bound.
pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(1200)]
MODEL = "dense-vllm"
HUNG_AFTER_S = 20
DEFAULT_PYTHON = Path(os.environ.get("BENCH_PEERS_HOME", "/work/.cache/bench")) / "vllm-venv" / "bin" / "python"


def vllm_python() -> str:
    python = os.environ.get("APPLIANCE_VLLM_PYTHON") or str(DEFAULT_PYTHON)
    if not os.access(python, os.X_OK):
        pytest.fail(f"the vLLM tests need vLLM's CPU build: {python} is missing (bash bench/peers_setup.sh vllm, "
                    "or set APPLIANCE_VLLM_PYTHON)")
    return python


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    # 1 GiB of KV cache: the demo model needs little, and the box runs other tests' processes too. An engine whose
    # /health is silent for HUNG_AFTER_S is killed as hung: short here, so the hang test need not wait a minute.
    yield from start_box(tmp_path_factory, APPLIANCE_VLLM_PYTHON=vllm_python(), VLLM_CPU_KVCACHE_SPACE="1",
                         APPLIANCE_ENGINE_HUNG_AFTER_S=str(HUNG_AFTER_S))


@pytest.fixture(scope="module")
def deployed(box, tmp_path_factory):
    # demo-dense with a chat template that renders tools (Hermes style): the demo's own renders none, and the API
    # refuses a forced call for such a model before any engine is asked. Without tools it renders the very
    # prompt the demo's template does, so every other test here sees demo-dense itself.
    source = write_tool_variant(box.demo_dir, tmp_path_factory.mktemp("vllm-tools") / "demo-dense-tools")
    box.manage("import_model", str(source), "--name", MODEL, "--kind", "dense", "--wait")
    out = box.manage("deploy", MODEL, "--engine", "vllm", "--wait", "--timeout", "900", timeout=960).stdout
    assert "(vllm)" in out
    return MODEL


@pytest.fixture(scope="module")
def key(box):
    return box.new_key("vllm-team")


def client(box, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=120)


def events(box, action: str, target: str = MODEL) -> list[dict]:
    """Return the ledger's events of one action on target, oldest first, as {outcome, actor, details}."""
    script = ("import json\nfrom audit.models import AuditEvent as E\n"
              f"print(json.dumps([dict(outcome=e.outcome, actor=e.actor, details=e.details) for e in "
              f"E.objects.filter(action={action!r}, target={target!r}).order_by('seq')]))")
    return json.loads(box.manage("shell", "--no-imports", "-c", script).stdout.strip().splitlines()[-1])


def engine_pid(box) -> int:
    return [e for e in events(box, "deployment.load") if e["outcome"] == "ok"][-1]["details"]["pid"]


def digest(box, text: str) -> str:
    script = f"from audit import ledger\nprint(ledger.digest({text!r}))"
    return box.manage("shell", "--no-imports", "-c", script).stdout.strip().splitlines()[-1]


def until(predicate, what: str, attempts: int = 600, pause: float = 0.5):
    """Return predicate()'s first truthy answer, asking up to `attempts` times."""
    for _ in range(attempts):
        result = predicate()
        if result:
            return result
        time.sleep(pause)
    raise AssertionError(f"never happened: {what}")


def test_the_load_records_vllm_and_its_interpreters_own_guard_and_telemetry_check(box, deployed):
    load = [e for e in events(box, "deployment.load") if e["outcome"] == "ok"][-1]
    assert load["details"]["engine"] == "vllm"
    report = [e for e in events(box, "process.start") if e["actor"] == f"system:engine:{MODEL}"][-1]["details"]
    assert report["engine"] == "vllm" and report["pid"] == load["details"]["pid"]
    assert report["python"] == vllm_python()
    assert report["guard_installed"] is True
    assert report["allowlist"] == ["127.0.0.0/8", "::1/128"]
    assert report["outside_connection"].startswith("refused: egress refused")
    assert report["telemetry"]["usage_stats_enabled"] is False
    assert report["telemetry"]["VLLM_NO_USAGE_STATS"] is True and report["telemetry"]["VLLM_DO_NOT_TRACK"] is True
    assert all(report["libraries_read"].values()) and report["libraries_read"]["transformers.is_offline_mode()"]


def test_every_process_of_the_engine_starts_guarded_offline_and_untracked(box, deployed):
    launcher = psutil.Process(engine_pid(box))
    processes = [launcher, *launcher.children(recursive=True)]
    interpreters = [p for p in processes if p.exe() == launcher.exe()]  # not the tools vLLM runs (lscpu, ...)
    assert len(interpreters) >= 2  # the API server and vLLM's EngineCore
    site = str(Path(__file__).resolve().parents[2] / "inference" / "vllm_site")
    pids = {p.pid for p in interpreters}
    for process in interpreters:
        env = process.environ()
        if not env:  # vLLM's setproctitle wrote VLLM::EngineCore over the environment block: a fork, guard inherited
            assert process.cmdline()[0].startswith("VLLM::") and process.ppid() in pids
            continue
        assert env.get("PYTHONPATH") == site, process.cmdline()  # its sitecustomize installs the guard first
        assert env["VLLM_NO_USAGE_STATS"] == "1" and env["DO_NOT_TRACK"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    for process in processes:
        assert not {"DATABASE_URL", "CELERY_BROKER_URL"} & set(process.environ()), process.cmdline()
    listening = [c.laddr for p in processes for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(address.ip == "127.0.0.1" for address in listening)


def test_chat_through_the_appliance_with_usage_and_ledger_digests(box, key, deployed):
    messages = [{"role": "user", "content": "Which engine answers?"}]
    whole = client(box, key).chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    answer = whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    event = until(lambda: [e for e in events(box, "chat.completion") if e["details"]["request_id"] == whole.id],
                  "the request's chat.completion event")[0]
    assert event["outcome"] == "ok" and event["actor"] == "team:vllm-team"
    assert event["details"]["completion_digest"] == digest(box, answer)
    assert event["details"]["prompt_digest"] == digest(box, json.dumps(messages, sort_keys=True))
    assert event["details"]["completion_tokens"] == whole.usage.completion_tokens


def test_streaming_with_the_official_client_gives_the_same_answer_and_usage(box, key, deployed):
    messages = [{"role": "user", "content": "Describe the audit ledger."}]
    whole = client(box, key).chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    stream = client(box, key).chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                      stream=True, stream_options={"include_usage": True})
    text, usage, finish = read_stream(stream)
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_choices_are_one_request_with_every_choices_tokens(box, key, deployed):
    reply = client(box, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Two?"}],
                                                     max_tokens=6, n=2, seed=7)
    assert [choice.index for choice in reply.choices] == [0, 1]
    assert reply.usage.completion_tokens >= 2


def assert_greedy_alternatives(chosen: str, logprob: float, top: list[tuple[str, float]], count: int) -> None:
    """One greedy token's log probabilities: the chosen one at most 0, `count` alternatives most likely first,
    the chosen token the most likely of them."""
    assert logprob <= 0
    assert len(top) == count
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert top[0][0] == chosen and top[0][1] == pytest.approx(logprob, abs=1e-4)


def test_chat_logprobs_come_from_vllm_in_the_builtin_engines_shape(box, key, deployed):
    messages = [{"role": "user", "content": "Name a colour."}]
    asked = dict(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    whole = client(box, key).chat.completions.create(**asked)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert all(t.bytes == list(t.token.encode("utf-8")) for t in entry.top_logprobs)
        assert_greedy_alternatives(entry.token, entry.logprob, [(t.token, t.logprob) for t in entry.top_logprobs], 3)
    streamed = [entry for chunk in client(box, key).chat.completions.create(**asked, stream=True)
                for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, [t.token for t in e.top_logprobs]) for e in content]


def test_completion_logprobs_come_from_vllm_in_the_builtin_engines_shape(box, key, deployed):
    reply = client(box, key).completions.create(model=MODEL, prompt="The ledger", max_tokens=5, temperature=0,
                                                logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert len(logprobs.tokens) == reply.usage.completion_tokens
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert_greedy_alternatives(token, logprob, list(top.items()), 2)
    no_alternatives = client(box, key).completions.create(model=MODEL, prompt="The ledger", max_tokens=3,
                                                          temperature=0, logprobs=0)
    assert no_alternatives.choices[0].logprobs.top_logprobs == [{}, {}, {}][:no_alternatives.usage.completion_tokens]


def test_structured_output_through_vllm_holds_the_schema(box, key, deployed):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green"]},
                                               "bright": {"type": "boolean"}},
              "required": ["colour", "bright"], "additionalProperties": False}  # bounded: it must end
    reply = client(box, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A colour and a count, as JSON."}], max_tokens=40,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}})
    assert reply.choices[0].finish_reason == "stop"
    answer = json.loads(reply.choices[0].message.content)
    assert set(answer) == {"colour", "bright"} and answer["colour"] in ("red", "green")
    assert isinstance(answer["bright"], bool)
    anything = client(box, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Some JSON."}], max_tokens=40, temperature=0,
        response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":  # a demo model may go on until max_tokens: then it is cut
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:
        assert anything.choices[0].message.content.lstrip().startswith("{")


# One function whose arguments are one required string: bounded (maxLength, no other property), so a forced
# call ends within max_tokens whatever the demo model's weights prefer.
LOOKUP = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
          "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a city up", "parameters": LOOKUP}}]
ASK = [{"role": "user", "content": "Look Oslo up."}]
FORCED = {"named": {"type": "function", "function": {"name": "lookup"}}, "required": "required"}


def assert_one_lookup_call(calls) -> None:
    """One call of `lookup` whose arguments are JSON holding its parameters' schema."""
    assert [call.function.name for call in calls] == ["lookup"]
    assert calls[0].id.startswith("call_") and calls[0].type == "function"
    arguments = json.loads(calls[0].function.arguments)
    jsonschema_rs.validate(LOOKUP, arguments)
    assert isinstance(arguments["city"], str)


@pytest.mark.parametrize("choice", FORCED)
def test_a_forced_tool_call_through_vllm_holds_the_functions_schema(box, key, deployed, choice):
    # parallel_tool_calls=False: `required` is then an array of exactly one call, so its grammar ends.
    asked = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=FORCED[choice], parallel_tool_calls=False,
                 max_tokens=120, temperature=0)
    whole = client(box, key).chat.completions.create(**asked)
    assert whole.choices[0].finish_reason == "tool_calls"
    assert whole.choices[0].message.content is None
    assert_one_lookup_call(whole.choices[0].message.tool_calls)
    assert whole.usage.completion_tokens >= 1

    calls: dict[int, dict] = {}
    finish = None
    for chunk in client(box, key).chat.completions.create(**asked, stream=True):
        for streamed in chunk.choices:
            finish = streamed.finish_reason or finish
            assert not streamed.delta.content  # a forced answer is all call, no text beside it
            for delta in streamed.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                if delta.function:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["id"].startswith("call_") and calls[0]["name"] == "lookup"
    jsonschema_rs.validate(LOOKUP, json.loads(calls[0]["arguments"]))
    # Greedy and grammar-bound: the stream's call is the whole answer's, argument for argument.
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.choices[0].message.tool_calls[0].function.arguments)


def completion_event(box, request_id: str) -> dict:
    return until(lambda: [e for e in events(box, "chat.completion") if e["details"]["request_id"] == request_id],
                 f"the chat.completion event of {request_id}")[0]


def test_legacy_completions_through_vllm_with_usage_and_ledger_digests(box, key, deployed):
    prompt = "The appliance keeps"
    asked = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    whole = client(box, key).completions.create(**asked)
    text, finish = whole.choices[0].text, whole.choices[0].finish_reason
    assert finish in ("stop", "length") and whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    event = completion_event(box, whole.id.removeprefix("cmpl-"))
    assert event["outcome"] == "ok" and event["actor"] == "team:vllm-team"
    assert event["details"]["endpoint"] == "completions" and event["details"]["finish_reason"] == [finish]
    assert event["details"]["completion_digest"] == digest(box, json.dumps([text]))
    assert event["details"]["prompt_digest"] == digest(box, json.dumps([prompt]))
    assert (event["details"]["prompt_tokens"], event["details"]["completion_tokens"]) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens)

    pieces, usage, streamed_finish, ids = [], None, None, set()
    for chunk in client(box, key).completions.create(**asked, stream=True, stream_options={"include_usage": True}):
        ids.add(chunk.id)
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            streamed_finish = choice.finish_reason or streamed_finish
    assert "".join(pieces) == text and streamed_finish == finish
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    (stream_id,) = ids
    event = completion_event(box, stream_id.removeprefix("cmpl-"))
    assert event["outcome"] == "ok" and event["details"]["completion_digest"] == digest(box, json.dumps([text]))
    assert event["details"]["completion_tokens"] == usage.completion_tokens


def test_the_responses_api_through_vllm_answers_with_usage(box, key, deployed):
    reply = client(box, key).responses.create(model=MODEL, input="Which engine answers?", max_output_tokens=12,
                                              temperature=0)
    assert reply.status in ("completed", "incomplete") and reply.output[0].role == "assistant"
    assert reply.usage.output_tokens >= 1 and reply.usage.input_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    event = until(lambda: [e for e in events(box, "chat.completion") if e["details"].get("response_id") == reply.id],
                  "the response's chat.completion event")[0]
    assert event["outcome"] == "ok" and event["details"]["endpoint"] == "responses"
    assert event["details"]["completion_digest"] == digest(box, reply.output_text)
    assert event["details"]["completion_tokens"] == reply.usage.output_tokens


def test_the_responses_api_through_vllm_holds_a_json_schema(box, key, deployed):
    schema = {"type": "object", "properties": {"engine": {"type": "string", "enum": ["vllm", "builtin"]},
                                               "local": {"type": "boolean"}},
              "required": ["engine", "local"], "additionalProperties": False}  # bounded: it must end
    reply = client(box, key).responses.create(
        model=MODEL, input="Which engine, as JSON?", max_output_tokens=40, temperature=0,
        text={"format": {"type": "json_schema", "name": "engine", "schema": schema, "strict": True}})
    assert reply.status == "completed"
    answer = json.loads(reply.output_text)
    jsonschema_rs.validate(schema, answer)
    assert set(answer) == {"engine", "local"}


def test_a_team_past_its_token_quota_is_refused_before_vllm_is_asked(box, deployed):
    key = box.new_key("vllm-limited")
    box.manage("shell", "--no-imports", "-c",
               "from appliance import actions\nfrom appliance.models import Team\n"
               "actions.do_update_team(Team.objects.get(name='vllm-limited'), actor='admin:test', "
               "values={'tokens_per_month': 1})")

    def refused():
        try:
            client(box, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                     max_tokens=2)
        except openai.RateLimitError as exc:
            return exc
        return None

    refusal = until(refused, "a 429 once the team's usage passes its month's budget", attempts=20)
    assert refusal.status_code == 429
    assert [e for e in events(box, "chat.refused") if e["actor"] == "team:vllm-limited"]


def test_metrics_carry_the_engines_own_metrics_labelled_by_variant(box, key, deployed):
    client(box, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    text = httpx.get(f"{box.url}/metrics", timeout=30).text
    lines = [line for line in text.splitlines() if line.startswith("vllm:generation_tokens_total{")]
    assert lines and all(f'model="{MODEL}"' in line for line in lines)
    assert float(lines[0].rsplit(" ", 1)[1]) >= 1
    assert f'appliance_engine_generated_tokens_total{{model="{MODEL}"}}' in text


def test_a_killed_engine_is_recorded_and_restarted(box, key, deployed):
    old = engine_pid(box)
    os.kill(old, signal.SIGKILL)
    crash = until(lambda: [e for e in events(box, "deployment.crashed") if e["details"].get("pid") == old],
                  "the crash's ledger event")[0]
    assert crash["outcome"] == "restarting" and "SIGKILL" in crash["details"]["reason"]
    until(lambda: engine_pid(box) != old, "a new engine process", attempts=1800)
    reply = until(lambda: _answer_or_none(box, key), "an answer from the restarted engine", attempts=120)
    assert reply.usage.completion_tokens >= 1
    assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE


def test_an_engine_that_stops_answering_health_is_killed_recorded_as_hung_and_restarted(box, key, deployed):
    old = engine_pid(box)
    group = [psutil.Process(old), *psutil.Process(old).children(recursive=True)]
    os.killpg(old, signal.SIGSTOP)  # alive, but nothing in its group answers any more
    hang = until(lambda: [e for e in events(box, "deployment.crashed") if e["details"].get("pid") == old],
                 "the hang's ledger event")[0]
    assert hang["outcome"] == "restarting"
    assert hang["details"]["reason"] == (f"was hung: its /health did not answer 200 for {HUNG_AFTER_S} s, "
                                         "so it was killed")
    until(lambda: engine_pid(box) != old, "a new engine process", attempts=1800)
    reply = until(lambda: _answer_or_none(box, key), "an answer from the restarted engine", attempts=120)
    assert reply.usage.completion_tokens >= 1
    until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in group),
          "every process of the hung group gone (killed, not left stopped)")


def _answer_or_none(box, key):
    try:
        return client(box, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=4)
    except openai.APIStatusError:
        return None


def test_undeploy_stops_every_engine_process(box, key, deployed):
    launcher = psutil.Process(engine_pid(box))
    processes = [launcher, *launcher.children(recursive=True)]
    box.manage("undeploy", MODEL)
    until(lambda: _status(box, key) == 503, "the variant answering 503 once unloaded")
    until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes),
          "every engine process gone")
    assert [e for e in events(box, "deployment.unload")]


def _status(box, key) -> int:
    return httpx.post(f"{box.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code


def test_vllms_own_parser_takes_every_nodes_command_of_a_plan_and_refuses_a_bad_flag(settings):
    from appliance.engine_plan import check_flags, launch_plan
    from inference.fit.engine_flags import NodeLaunch

    settings.VLLM_PYTHON = vllm_python()
    planned = launch_plan("vllm", "2x8xH200", "dp16-ep16", 8192, "bf16", head="10.0.0.1")
    bad = NodeLaunch(0, ("--tensor-parallel-size", "two"))
    verdicts = check_flags("vllm", [*planned.launches, bad], "/models/r1")
    assert verdicts[:2] == ["ok", "ok"]
    assert "--tensor-parallel-size" in verdicts[2] and "invalid" in verdicts[2]


def test_the_eplb_report_the_appliance_reads_is_the_one_vllms_source_logs(tmp_path):
    """EPLB needs expert parallelism over GPUs, so no engine here writes the report: this reads vLLM's own call
    that logs it (EplbState.step) and checks that a line it writes is one eplb_figures reads."""
    import ast
    import subprocess

    from appliance.vllm_engine import eplb_figures

    purelib = subprocess.run([vllm_python(), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    source = (Path(purelib) / "vllm" / "distributed" / "eplb" / "eplb_state.py").read_text(encoding="utf-8")
    formats = [node.args[0].value for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "info" and node.args
               and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("EPLB step:")]
    assert len(formats) == 1, formats
    log = tmp_path / "engine.log"
    log.write_text("INFO 12-02 10:00:00 [eplb_state.py:635] " + formats[0] % (300, "main", 812.25, 1024, 0.7932, 2700))
    assert eplb_figures(log, 0) == {"step": 300, "avg_tokens": 812.25, "max_tokens": 1024, "balancedness": 0.7932}
