"""The chat endpoint's parameters and failures, against a real demo engine and a stand-in gatekeeper."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from django.test import AsyncClient

from inference import serving
from inference.api import Exchange, admit_on_gate, sse
from inference.engine import Engine
from inference.gatekeeper import Admission, Caller, Gatekeeper, UsageReport, gatekeeper
from tests.audit.tamper import wipe_ledger
from tests.inference.conftest import run

KEY = "sk-box-chat-api-test"
AUTH = {"headers": {"Authorization": f"Bearer {KEY}"}}


class OneKeyGatekeeper(Gatekeeper):
    """Lets exactly KEY in, as team `api-tests`; every variant exists."""

    def authenticate(self, bearer_token: str) -> Caller | None:
        return Caller(team="api-tests", key_prefix=KEY[:13]) if bearer_token == KEY else None

    def models(self, caller: Caller) -> list:
        return []

    def exists(self, caller: Caller, name: str) -> bool:
        return True

    def admit(self, caller: Caller, model: str) -> Admission:
        return Admission(True)

    def authenticate_and_admit(self, requests: list[tuple[str, str]]) -> list:
        BURSTS.append(len(requests))
        return super().authenticate_and_admit(requests)

    def settle(self, caller: Caller, admission: Admission, report: UsageReport) -> None:
        SETTLED.append(report)


SETTLED: list[UsageReport] = []
BURSTS: list[int] = []  # how many requests each admission call answered


@pytest.fixture
def api(transactional_db, settings, engines: dict[str, Engine]):
    """Serve the shared dense engine as `api-dense` behind the stand-in gatekeeper."""
    settings.INFERENCE_GATEKEEPER = f"{__name__}.OneKeyGatekeeper"
    gatekeeper.cache_clear()
    serving.register("api-dense", engines["demo-dense"])
    yield "api-dense"
    serving.unregister("api-dense")
    gatekeeper.cache_clear()
    wipe_ledger()  # the ledger's triggers refuse the flush that ends a transactional test


def post(body: dict) -> tuple[int, dict, object]:
    """POST a chat request; return (status, headers, parsed JSON or the list of SSE events)."""

    async def go():
        response = await AsyncClient().post("/v1/chat/completions", json.dumps(body),
                                            content_type="application/json", **AUTH)
        if response.get("Content-Type", "").startswith("text/event-stream"):
            raw = b"".join([part async for part in response.streaming_content]).decode()
            events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
            return response.status_code, response, [e if e == "[DONE]" else json.loads(e) for e in events]
        return response.status_code, response, response.json()

    return run(go())


def chat(model: str, **params) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Describe the audit ledger."}], **params}


@pytest.mark.parametrize("text", ["plain", 'quote " and \\ backslash', "line\nbreak\ttab", "ünïcödé 中文 🙂",
                                  "\x00", "", "data: [DONE]\n\n"])
def test_a_content_event_is_the_chunk_object_as_sse(text: str) -> None:
    exchange = Exchange(caller=Caller(team="t", key_prefix="sk-box-abc"), model='odd "model"', messages=[])
    expected = sse(exchange.chunk_object({"content": text}, None))
    assert exchange.content_event(text) == expected.encode()
    assert json.loads(exchange.content_event(text).decode()[len("data: "):])["choices"][0]["delta"] == {
        "content": text}


def test_penalties_and_top_k_are_served(api) -> None:
    status, _, body = post(chat(api, max_tokens=8, temperature=0.7, top_k=20, seed=5,
                                presence_penalty=0.5, frequency_penalty=1.0))
    assert status == 200
    assert body["usage"]["completion_tokens"] >= 1
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("param,value", [
    ("top_k", -2), ("presence_penalty", 2.5), ("frequency_penalty", -3), ("n", 2), ("temperature", 7),
    ("top_p", 0), ("max_tokens", 0), ("max_completion_tokens", -1), ("seed", -1),
])
def test_out_of_range_values_are_400s_naming_the_parameter(api, param: str, value) -> None:
    status, _, body = post(chat(api, **{param: value}))
    assert status == 400
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"


def test_prompt_plus_max_tokens_beyond_the_context_is_a_400_stating_the_limit(api) -> None:
    status, _, body = post(chat(api, max_tokens=2040))
    assert status == 400
    assert body["error"]["param"] == "max_tokens"
    assert body["error"]["code"] == "context_length_exceeded"
    assert "2048 tokens" in body["error"]["message"]


def test_stream_ends_with_finish_reason_and_usage(api) -> None:
    status, _, events = post(chat(api, max_tokens=6, temperature=0, stream=True,
                                  stream_options={"include_usage": True}))
    assert status == 200
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2] if e["choices"])
    _, _, whole = post(chat(api, max_tokens=6, temperature=0))
    assert text == whole["choices"][0]["message"]["content"]


def test_a_stop_string_ends_with_finish_reason_stop(api) -> None:
    _, _, free = post(chat(api, max_tokens=24, temperature=0))
    text = free["choices"][0]["message"]["content"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    _, _, stopped = post(chat(api, max_tokens=24, temperature=0, stop=[stop]))
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["message"]["content"] == text[: text.index(stop)]


@pytest.fixture
def busy(transactional_db, settings, demo_dir: Path):
    """Serve a dense engine that runs one request at a time and lets one more wait."""
    settings.INFERENCE_GATEKEEPER = f"{__name__}.OneKeyGatekeeper"
    gatekeeper.cache_clear()
    engine = Engine(demo_dir / "demo-dense", device="cpu", queue_limit=1, max_batch_size=1)
    engine.eos_token_ids = set()
    serving.register("api-busy", engine)
    yield engine
    serving.unregister("api-busy")
    engine.close()
    gatekeeper.cache_clear()
    wipe_ledger()


def test_a_full_queue_is_a_429_with_retry_after(busy) -> None:
    async def go():
        client = AsyncClient()
        body = json.dumps(chat("api-busy", max_tokens=1500, temperature=0, stream=True))
        running = await client.post("/v1/chat/completions", body, content_type="application/json", **AUTH)
        waiting = await client.post("/v1/chat/completions", body, content_type="application/json", **AUTH)
        refused = await client.post("/v1/chat/completions", body, content_type="application/json", **AUTH)
        for response in (running, waiting):  # closing the streams cancels both requests
            await response.streaming_content.aclose()
        return running.status_code, waiting.status_code, refused

    first, second, refused = run(go())
    assert (first, second) == (200, 200)
    assert refused.status_code == 429
    assert refused["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "engine_busy"


@pytest.fixture
def broken(transactional_db, settings, demo_dir: Path):
    """Serve a dense engine whose model fails on every forward."""
    settings.INFERENCE_GATEKEEPER = f"{__name__}.OneKeyGatekeeper"
    gatekeeper.cache_clear()
    engine = Engine(demo_dir / "demo-dense", device="cpu")

    def fault(module, args):
        raise RuntimeError("simulated device fault")

    engine.model.get_input_embeddings().register_forward_pre_hook(fault)
    serving.register("api-broken", engine)
    yield "api-broken"
    serving.unregister("api-broken")
    engine.close()
    gatekeeper.cache_clear()
    wipe_ledger()


def test_a_failed_generation_is_a_500_in_openai_shape(broken) -> None:
    status, _, body = post(chat(broken, max_tokens=4))
    assert status == 500
    assert body["error"]["type"] == "server_error"
    assert "simulated device fault" in body["error"]["message"]


def test_a_failed_stream_ends_with_an_error_event(broken) -> None:
    status, _, events = post(chat(broken, max_tokens=4, stream=True))
    assert status == 200  # the headers were sent before the failure
    assert events[-1]["error"]["type"] == "server_error"
    assert "simulated device fault" in events[-1]["error"]["message"]


def test_each_admitted_request_is_settled_with_its_usage(api) -> None:
    from inference.api import _ledger_writer

    SETTLED.clear()
    post(chat(api, max_tokens=5, temperature=0))
    post(chat(api, max_tokens=2040))  # admitted, then refused by the engine (context)
    _ledger_writer.submit(lambda: None).result()  # settle() runs on the ledger thread, in order
    ok, refused = SETTLED
    assert (ok.model, ok.completion_tokens, ok.outcome) == (api, 5, "ok")
    assert ok.prompt_tokens > 0 and ok.ttft_ms is not None and ok.latency_ms >= ok.ttft_ms
    assert (refused.completion_tokens, refused.outcome) == (0, "refused")


def hold_the_gatekeeper() -> threading.Event:
    """Keep the gatekeeper thread busy until the returned event is set, as a burst's first request does."""
    from inference.api import _gate

    release = threading.Event()
    _gate.submit(release.wait, 30)
    return release


async def until_waiting(count: int) -> None:
    from inference.api import _admissions

    for _ in range(500):
        if _admissions.queued() >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} admissions never queued")


def test_requests_that_arrive_together_are_admitted_in_one_call(api) -> None:
    async def go():
        release = hold_the_gatekeeper()
        burst = [asyncio.create_task(admit_on_gate(KEY, api)) for _ in range(5)]
        await until_waiting(5)
        release.set()
        return await asyncio.gather(*burst)

    BURSTS.clear()
    answers = run(go())
    assert all(caller.team == "api-tests" and admission.allowed for caller, admission in answers)
    assert BURSTS == [5]


def test_a_request_whose_client_left_while_waiting_is_not_admitted(api) -> None:
    async def go():
        release = hold_the_gatekeeper()
        left = asyncio.create_task(admit_on_gate(KEY, api))
        await until_waiting(1)
        left.cancel()
        await asyncio.gather(left, return_exceptions=True)
        stayed = asyncio.create_task(admit_on_gate(KEY, api))
        await until_waiting(2)
        release.set()
        return await stayed

    BURSTS.clear()
    caller, admission = run(go())
    assert admission.allowed
    assert BURSTS == [1]  # the request that stayed, alone
