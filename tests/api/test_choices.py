"""`n` > 1: n choices per chat request, the prompt computed once, one settlement and one ledger event."""

from __future__ import annotations

import asyncio
import json

import jsonschema_rs
import pytest
from django.test import AsyncClient

from audit.models import AuditEvent
from tests.api.test_cached_usage import KEYS, SYSTEM, cached_api, plain_engine, post as post_as  # noqa: F401
from tests.api.test_chat_api import (AUTH, SETTLED, api, broken, chat, post, serve_own_engine,  # noqa: F401
                                     until_engine)
from tests.api.test_completions import complete
from tests.api.test_reasoning import think_engine, thinker  # noqa: F401  (fixtures)
from tests.api.test_tool_calls import ASK, TOOLS, WEATHER, streamed_calls, tool_engine, tooled  # noqa: F401
from appliance.api.choices import MAX_CHOICES, submit_choices
from inference.engine import Engine
from inference.engine.request import SamplingParams
from tests.inference.conftest import run
from tests.audit.tamper import write_queued_events


def ledger_event(request_id: str) -> dict:
    write_queued_events()
    return next(e.details for e in AuditEvent.objects.filter(action="chat.completion")
                if e.details.get("request_id") == request_id)


def test_n_choices_each_with_its_index_and_usage_counting_the_prompt_once(api) -> None:
    SETTLED.clear()
    status, _, one = post(chat(api, max_tokens=6, temperature=1.0, seed=11))
    status, _, three = post(chat(api, max_tokens=6, temperature=1.0, seed=11, n=3, logprobs=True))
    assert status == 200
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] in ("stop", "length") for c in three["choices"])
    # Choice 0 is the request's answer with that seed; the others used seed + 1 and seed + 2.
    assert three["choices"][0]["message"]["content"] == one["choices"][0]["message"]["content"]
    for choice in three["choices"]:
        assert len(choice["logprobs"]["content"]) >= 1
    usage = three["usage"]
    assert usage["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in three["choices"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    details = ledger_event(three["id"])  # written after the usage rows, on the same thread
    # One usage row per request, whatever n is.
    assert [(r.prompt_tokens, r.completion_tokens) for r in SETTLED] == [
        (one["usage"]["prompt_tokens"], one["usage"]["completion_tokens"]),
        (usage["prompt_tokens"], usage["completion_tokens"])]
    assert len(details["choice_digests"]) == 3 and details["completion_tokens"] == usage["completion_tokens"]
    assert details["finish_reasons"] == [c["finish_reason"] for c in three["choices"]]


def test_choice_i_with_a_seed_is_the_answer_of_seed_plus_i(api) -> None:
    _, _, three = post(chat(api, max_tokens=8, temperature=1.0, seed=40, n=3))
    for i in range(3):
        _, _, alone = post(chat(api, max_tokens=8, temperature=1.0, seed=40 + i))
        assert three["choices"][i]["message"]["content"] == alone["choices"][0]["message"]["content"]


def test_greedy_choices_are_equal(api) -> None:
    _, _, body = post(chat(api, max_tokens=6, temperature=0, n=2))
    assert body["choices"][0]["message"] == body["choices"][1]["message"]


def test_a_stream_sends_each_choice_under_its_index(api) -> None:
    status, _, events = post(chat(api, max_tokens=6, temperature=1.0, seed=3, n=3, stream=True,
                                  stream_options={"include_usage": True}))
    assert status == 200 and events[-1] == "[DONE]"
    # Every choice opens (its role) in index order before any sends text, as the SDK's stream helper needs.
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in events[:3]] == [
        (i, {"role": "assistant", "content": ""}) for i in range(3)]
    texts, finishes, roles = ["", "", ""], [None, None, None], [0, 0, 0]
    for event in events[:-2]:
        (choice,) = event["choices"]
        i = choice["index"]
        assert finishes[i] is None, "nothing after a choice's finishing chunk"
        roles[i] += choice["delta"].get("role") == "assistant"
        texts[i] += choice["delta"].get("content") or ""
        finishes[i] = choice["finish_reason"]
    assert roles == [1, 1, 1] and all(f in ("stop", "length") for f in finishes)
    _, _, whole = post(chat(api, max_tokens=6, temperature=1.0, seed=3, n=3))
    assert texts == [c["message"]["content"] for c in whole["choices"]]
    assert events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]


@pytest.mark.parametrize("n", [9, 0])
def test_n_outside_1_to_8_is_a_400_naming_n(api, n: int) -> None:
    status, _, body = post(chat(api, max_tokens=2, n=n))
    assert status == 400 and body["error"]["param"] == "n"


def test_the_later_choices_reuse_the_prompt_the_first_computed(cached_api) -> None:
    key = list(KEYS)[0]
    # A prompt of a few blocks, well under a step's prefill budget (256 tokens): submitted together, all three
    # choices would be prefilled in one step, none reusing another's blocks.
    question = {"model": cached_api, "max_tokens": 4, "temperature": 0, "n": 3,
                "messages": [{"role": "system", "content": SYSTEM[:160]}, {"role": "user", "content": "n = 3"}]}
    status, _, body = post_as(question, key=key)
    assert status == 200
    prompt_tokens = body["usage"]["prompt_tokens"]
    full_blocks = (prompt_tokens - 1) // 16 * 16  # the prefix cache keeps whole 16-token blocks
    assert 0 < full_blocks and 3 * prompt_tokens < 256, prompt_tokens
    # The usage reports the prompt once, as the first choice computed it (a new prompt: nothing cached).
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert ledger_event(body["id"])["choice_cached_tokens"] == [0, full_blocks, full_blocks]


class SubmitsWatched:
    """The real engine, noting at each submission how much of the first request's prompt it had computed."""

    def __init__(self, engine) -> None:
        self.engine, self.handles, self.first_computed = engine, [], []

    def submit(self, prompt_ids, params, **options):
        if self.handles:
            self.first_computed.append(self.handles[0].state.num_computed)
        self.handles.append(self.engine.submit(prompt_ids, params, **options))
        return self.handles[-1]


def test_the_later_choices_are_submitted_once_the_first_prompt_is_computed(plain_engine) -> None:
    prompt = plain_engine.encode_chat([{"role": "user", "content": SYSTEM}])
    watched = SubmitsWatched(plain_engine)

    async def go():
        handles = await submit_choices(watched, prompt, SamplingParams(max_tokens=3, temperature=0), 3, "team-w")
        return [[chunk async for chunk in handle] for handle in handles]

    answers = run(go())
    assert min(watched.first_computed) >= len(prompt)
    assert [a[-1].cached_tokens for a in answers][1:] == [(len(prompt) - 1) // 16 * 16] * 2
    assert all(a[-1].finish_reason == "length" for a in answers)


@pytest.mark.parametrize("stream", [False, True])
def test_each_choice_makes_its_own_forced_tool_call(tooled, stream: bool) -> None:
    status, _, body = post({"model": tooled, "messages": ASK, "tools": TOOLS, "max_tokens": 200, "seed": 5, "n": 2,
                            "tool_choice": {"type": "function", "function": {"name": "weather"}}, "stream": stream})
    assert status == 200, body
    if stream:
        per_choice = [[e for e in body if e != "[DONE]" and e["choices"] and e["choices"][0]["index"] == i]
                      for i in range(2)]
        answers = [streamed_calls(events) for events in per_choice]
    else:
        answers = [({0: {"name": c["message"]["tool_calls"][0]["function"]["name"],
                         "arguments": c["message"]["tool_calls"][0]["function"]["arguments"]}}, c["finish_reason"])
                   for c in body["choices"]]
    for calls, finish in answers:
        assert finish == "tool_calls" and [c["name"] for c in calls.values()] == ["weather"]
        jsonschema_rs.validate(WEATHER, json.loads(calls[0]["arguments"]))


def test_each_choice_has_its_own_reasoning_and_usage_counts_all(thinker) -> None:
    _, _, body = post(chat(thinker, max_tokens=5, temperature=1.0, seed=2, n=2))
    alone = [post(chat(thinker, max_tokens=5, temperature=1.0, seed=2 + i))[2] for i in range(2)]
    for choice, one in zip(body["choices"], alone):
        assert choice["message"] == one["choices"][0]["message"]
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == sum(
        one["usage"]["completion_tokens_details"]["reasoning_tokens"] for one in alone)


@pytest.mark.django_db
def test_the_openapi_document_states_the_cap_on_n(client) -> None:
    n = client.get("/v1/openapi.json").json()["components"]["schemas"]["ChatCompletionRequest"]["properties"]["n"]
    assert (n["minimum"], n["maximum"]) == (1, MAX_CHOICES) and "computed once" in n["description"]


@pytest.fixture
def endless(transactional_db, settings, demo_dir):
    """Serve a dense engine of the test's own that never samples an end of sequence."""
    engine = Engine(demo_dir / "demo-dense", device="cpu")
    engine.eos_token_ids = set()
    yield from serve_own_engine(settings, "api-endless", engine)


def test_a_client_leaving_a_stream_of_choices_stops_every_choice(endless) -> None:
    async def go():
        response = await AsyncClient().post(
            "/v1/chat/completions", json.dumps(chat("api-endless", max_tokens=1500, n=3, stream=True)),
            content_type="application/json", **AUTH)
        seen, all_seen = set(), asyncio.Event()

        async def read():
            async for part in response.streaming_content:
                seen.update(json.loads(line[len("data: "):])["choices"][0]["index"]
                            for line in part.decode().splitlines() if line.startswith("data: {"))
                if len(seen) == 3:
                    all_seen.set()

        # The client goes away as Django's ASGI handler sees it: the task sending the stream is cancelled.
        reader = asyncio.create_task(read())
        await all_seen.wait()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await until_engine(endless, running=0, waiting=0)

    run(go())
    write_queued_events()
    assert endless.describe()["finished"] == {"cancelled": 3}  # none ran on to its 1500 tokens
    (event,) = AuditEvent.objects.filter(action="chat.completion")
    assert event.outcome == "cancelled" and len(event.details["choice_digests"]) == 3


def test_a_failed_generation_of_choices_is_a_500_and_one_failed_event(broken) -> None:
    status, _, body = post(chat(broken, max_tokens=4, n=3))
    assert status == 500 and "simulated device fault" in body["error"]["message"]
    status, _, events = post(chat(broken, max_tokens=4, n=3, stream=True))
    assert status == 200 and events[-1]["error"]["type"] == "server_error"
    write_queued_events()
    assert [e.outcome for e in AuditEvent.objects.filter(action="chat.completion")] == ["failed", "failed"]


def test_completions_give_n_choices_per_prompt_in_openais_order(api) -> None:
    params = {"model": api, "max_tokens": 5, "temperature": 1.0, "seed": 6, "echo": True}
    status, body = complete({**params, "prompt": ["The box", "The ledger"], "n": 2})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    alone = {(prompt, seed): complete({**params, "prompt": prompt, "seed": seed})[1]
             for prompt in ("The box", "The ledger") for seed in (6, 7)}
    # Choice i of prompt p is choice p * n + i, with seed + i.
    expected = [alone[("The box", 6)], alone[("The box", 7)], alone[("The ledger", 6)], alone[("The ledger", 7)]]
    assert [c["text"] for c in body["choices"]] == [one["choices"][0]["text"] for one in expected]
    prompt_tokens = alone[("The box", 6)]["usage"]["prompt_tokens"] + alone[("The ledger", 6)]["usage"]["prompt_tokens"]
    assert body["usage"]["prompt_tokens"] == prompt_tokens  # each prompt once
    assert body["usage"]["completion_tokens"] == sum(one["usage"]["completion_tokens"] for one in expected)


def test_a_completion_stream_sends_each_choice_under_its_index(api) -> None:
    params = {"model": api, "prompt": "The box", "max_tokens": 5, "temperature": 1.0, "seed": 2, "n": 3}
    _, whole = complete(params)
    status, events = complete({**params, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    texts = ["", "", ""]
    for event in events[:-2]:
        (choice,) = event["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in whole["choices"]] and events[-2]["usage"] == whole["usage"]
