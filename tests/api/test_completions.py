"""/v1/completions against a real demo engine: prompts, echo, logprobs, streaming, refused fields."""

from __future__ import annotations

import json

import pytest
from django.test import AsyncClient

from appliance.api.completions import COMPLETION_FIELDS
from tests.api.test_chat_api import AUTH, SETTLED, api  # noqa: F401  (api is a fixture)
from tests.inference.conftest import run
from tests.audit.tamper import write_queued_events


def complete(body: dict):
    async def go():
        response = await AsyncClient().post("/v1/completions", json.dumps(body), content_type="application/json",
                                            **AUTH)
        if response.get("Content-Type", "").startswith("text/event-stream"):
            raw = b"".join([part async for part in response.streaming_content]).decode()
            events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
            return response.status_code, [e if e == "[DONE]" else json.loads(e) for e in events]
        return response.status_code, response.json()

    return run(go())


def test_a_prompt_is_completed(api) -> None:
    status, body = complete({"model": api, "prompt": "The audit ledger", "max_tokens": 5, "temperature": 0})
    assert status == 200, body
    assert body["object"] == "text_completion"
    (choice,) = body["choices"]
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    assert body["usage"]["completion_tokens"] <= 5


def test_a_list_of_prompts_is_one_choice_each_and_one_settlement(api) -> None:
    SETTLED.clear()
    prompts = ["The box", "Every key", "The worker"]
    status, body = complete({"model": api, "prompt": prompts, "max_tokens": 4, "temperature": 0})
    assert status == 200
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for prompt, choice in zip(prompts, body["choices"]):
        _, alone = complete({"model": api, "prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert choice["text"] == alone["choices"][0]["text"]  # greedy: the same alone as batched
    write_queued_events()
    assert len(SETTLED) == 4  # the list once, then each prompt alone


def test_echo_puts_the_prompt_first(api) -> None:
    _, plain = complete({"model": api, "prompt": "The box", "max_tokens": 4, "temperature": 0})
    _, echoed = complete({"model": api, "prompt": "The box", "max_tokens": 4, "temperature": 0, "echo": True})
    assert echoed["choices"][0]["text"] == "The box" + plain["choices"][0]["text"]


def test_logprobs_in_the_legacy_shape(api) -> None:
    status, body = complete({"model": api, "prompt": "The box", "max_tokens": 4, "temperature": 0, "logprobs": 2})
    assert status == 200
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == body["usage"]["completion_tokens"]
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0


def test_the_stream_is_the_whole_answer(api) -> None:
    params = {"model": api, "prompt": "The box", "max_tokens": 6, "temperature": 0}
    _, whole = complete(params)
    status, events = complete({**params, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert text == whole["choices"][0]["text"]
    assert events[-2]["usage"] == whole["usage"]


@pytest.mark.parametrize("params,param", [
    ({"suffix": "end"}, "suffix"), ({"best_of": 2}, "best_of"), ({"n": 9}, "n"), ({"prompt": ["a"] * 3, "n": 6}, "n"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"prompt": [1, 2, 3]}, "prompt"), ({"echo": True, "logprobs": 1}, "echo"), ({"logprobs": 6}, "logprobs"),
    ({"prompt": ["a", "b"], "stream": True}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": ["x"] * 17}, "prompt"),
])
def test_what_cannot_be_served_is_a_400_naming_it(api, params: dict, param: str) -> None:
    status, body = complete({"model": api, "prompt": "The box", **params})
    assert status == 400, body
    assert body["error"]["param"] == param


def test_every_refused_completion_field_is_tested() -> None:
    refused = {name for name, rule in COMPLETION_FIELDS.items() if rule.support == "refused"}
    assert refused == {"best_of", "suffix", "logit_bias"}
