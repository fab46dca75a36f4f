"""logprobs / top_logprobs through the chat API, whole and streamed, on a real demo engine."""

from __future__ import annotations

import math

import pytest

from tests.api.test_chat_api import chat, post
from tests.api.test_chat_api import api  # noqa: F401  (a fixture)
from tests.api.test_chat_api import api  # noqa: F401  (a fixture)


def test_greedy_logprobs_name_the_most_likely_token_and_sum_to_at_most_one(api) -> None:
    status, _, body = post(chat(api, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5))
    assert status == 200, body
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"]
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 5
        assert top[0]["logprob"] == pytest.approx(entry["logprob"])  # greedy picks the most likely token
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-5
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))


def test_streamed_logprobs_are_the_whole_answers(api) -> None:
    params = dict(max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    _, _, whole = post(chat(api, **params))
    _, _, events = post(chat(api, stream=True, **params))
    streamed = [entry for event in events if event != "[DONE]" and event["choices"]
                for entry in (event["choices"][0]["logprobs"] or {}).get("content", [])]
    assert [(e["token"], round(e["logprob"], 4)) for e in streamed] == [
        (e["token"], round(e["logprob"], 4)) for e in whole["choices"][0]["logprobs"]["content"]]


def test_logprobs_without_asking_are_null(api) -> None:
    _, _, body = post(chat(api, max_tokens=2))
    assert body["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("params,param", [({"top_logprobs": 3}, "top_logprobs"),
                                          ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")])
def test_top_logprobs_out_of_bounds_or_alone_is_a_400(api, params, param) -> None:
    status, _, body = post(chat(api, **params))
    assert status == 400
    assert body["error"]["param"] == param
