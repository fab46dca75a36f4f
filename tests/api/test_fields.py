"""The field table: every refused field is a 400 naming it, the README lists the table, structured output holds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema_rs
import pytest

from appliance.api.fields import ACCEPTED, FIELDS, HONOURED, REFUSED
from tests.api.test_chat_api import api, chat, post  # noqa: F401  (api is a fixture)

README = Path(__file__).resolve().parents[2] / "README.md"

# A value of each refused field that asks for what the server lacks.
ASKING = {
    "functions": [{"name": "f"}], "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "high", "verbosity": "low",
    "web_search_options": {"search_context_size": "low"}, "service_tier": "priority",
    "prompt_cache_retention": "24h", "store": True,
}
# Values of refused fields that ask for nothing, and of accepted fields: answered, not refused.
HARMLESS = {"n": 1, "logprobs": False, "logit_bias": {}, "ignore_eos": False, "stop_token_ids": [], "tools": [], "tool_choice": "none", "store": False,
            "modalities": ["text"], "service_tier": "auto", "user": "someone", "metadata": {"k": "v"},
            "safety_identifier": "h", "prompt_cache_key": "k", "parallel_tool_calls": True, "top_logprobs": None}


def test_every_refused_field_has_a_value_that_asks_for_it() -> None:
    assert {name for name, rule in FIELDS.items() if rule.support == REFUSED} == set(ASKING)


def test_the_readme_table_is_the_code_table() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| (honoured|accepted|refused) \|", README.read_text(), re.MULTILINE)
    assert dict(rows) == {name: rule.support for name, rule in FIELDS.items()}
    assert {HONOURED, ACCEPTED, REFUSED} == {rule.support for rule in FIELDS.values()}


@pytest.mark.parametrize("field", sorted(ASKING))
def test_a_refused_field_is_a_400_naming_it(api, field: str) -> None:
    status, _, body = post(chat(api, max_tokens=4, **{field: ASKING[field]}))
    assert status == 400
    assert body["error"]["param"] == field
    assert "not supported by this server" in body["error"]["message"]


@pytest.mark.parametrize("field", sorted(HARMLESS))
def test_a_value_that_asks_for_nothing_is_answered(api, field: str) -> None:
    status, _, body = post(chat(api, max_tokens=2, **{field: HARMLESS[field]}))
    assert status == 200, body


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "score"],
          "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9},
                         "why": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}}}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_answers_hold_the_schema(api, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        status, _, body = post(chat(api, max_tokens=200, temperature=1.0, seed=seed, response_format=fmt,
                                    stream=stream))
        assert status == 200
        text = ("".join(e["choices"][0]["delta"].get("content") or "" for e in body[:-1] if e["choices"])
                if stream else body["choices"][0]["message"]["content"])
        jsonschema_rs.validate(SCHEMA, json.loads(text))


def test_json_object_answer_is_an_object_unless_cut_by_max_tokens(api) -> None:
    # Any object may hold strings of any length, and random weights rarely close one: the answer is an object,
    # or, when max_tokens cuts it, the start of one (finish_reason "length"), as on OpenAI.
    for seed in range(3):
        status, _, body = post(chat(api, max_tokens=100, temperature=1.0, seed=seed,
                                    response_format={"type": "json_object"}))
        assert status == 200
        choice = body["choices"][0]
        assert choice["message"]["content"].startswith("{")
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:
            assert choice["finish_reason"] == "length"
            assert body["usage"]["completion_tokens"] == 100


def test_an_unsupported_schema_keyword_is_a_400_naming_it(api) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "array", "uniqueItems": True}}}
    status, _, body = post(chat(api, response_format=fmt))
    assert status == 400
    assert body["error"]["param"] == "response_format.json_schema.schema"
    assert "uniqueItems" in body["error"]["message"]


def test_an_agents_second_turn_with_a_tool_message_is_answered(api) -> None:
    messages = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "weather", "arguments": json.dumps({"city": "Oslo"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, rain"},
    ]
    status, _, body = post({"model": api, "messages": messages, "max_tokens": 4})
    assert status == 200, body


@pytest.mark.parametrize("message,param", [
    ({"role": "tool", "content": "x"}, "messages.0"),
    ({"role": "user", "content": None}, "messages.0"),
    ({"role": "user", "content": "x", "tool_calls": [{"id": "c", "type": "function",
                                                      "function": {"name": "f", "arguments": "{}"}}]}, "messages.0"),
])
def test_malformed_tool_messages_are_400s(api, message: dict, param: str) -> None:
    status, _, body = post({"model": api, "messages": [message]})
    assert status == 400
    assert body["error"]["param"] == param


def test_the_extensions_fix_the_length_and_logit_bias_picks_the_token(api) -> None:
    status, _, body = post(chat(api, max_tokens=7, ignore_eos=True, temperature=0, logit_bias={"40": 100}))
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 7 and body["choices"][0]["finish_reason"] == "length"
    _, _, again = post(chat(api, max_tokens=3, temperature=0, logit_bias={"40": 100}, logprobs=True))
    assert {entry["token"] for entry in again["choices"][0]["logprobs"]["content"]} == {
        again["choices"][0]["logprobs"]["content"][0]["token"]}


@pytest.mark.parametrize("params,param", [
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"stop_token_ids": [99999999]}, "stop_token_ids"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"), ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
])
def test_bad_extension_values_are_400s_naming_them(api, params, param) -> None:
    status, _, body = post(chat(api, **params))
    assert status == 400, body
    assert body["error"]["param"] == param
