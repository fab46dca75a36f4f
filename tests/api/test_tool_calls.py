"""Function calling through the chat API: forced calls validate on a random-weight model, auto is parsed."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest

from appliance import engine_client
from appliance.api.toolcalls import DEEPSEEK, HERMES, LLAMA3, parse_calls, tool_format
from inference.engine import Engine
from tests.api.test_chat_api import api, post  # noqa: F401  (api is a fixture)
from tests.api.tool_variant import HERMES_TEMPLATE, write_tool_variant

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"type": "string", "maxLength": 10}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "clock", "parameters": TIME}}]
SCHEMAS = {"weather": WEATHER, "clock": TIME}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def tool_engine(demo_dir, tmp_path_factory):
    engine = Engine(write_tool_variant(demo_dir, tmp_path_factory.mktemp("tools") / "demo-tools"), device="cpu")
    yield engine
    engine.close()


@pytest.fixture
def tooled(api, tool_engine):
    engine_client.register("api-tools", tool_engine)
    yield "api-tools"
    engine_client.unregister("api-tools")


def streamed_calls(events: list) -> tuple[dict, str]:
    """Assemble streamed tool-call deltas the way the SDK does: by index, arguments concatenated."""
    calls, finish = {}, None
    for event in events:
        if event == "[DONE]" or not event["choices"]:
            continue
        choice = event["choices"][0]
        finish = choice["finish_reason"] or finish
        for delta in choice["delta"].get("tool_calls") or []:
            call = calls.setdefault(delta["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.get("id") or call["id"]
            call["name"] += (delta.get("function") or {}).get("name") or ""
            call["arguments"] += (delta.get("function") or {}).get("arguments") or ""
    return calls, finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_named_tool_choice_returns_valid_arguments(tooled, stream: bool, seed: int) -> None:
    status, _, body = post({"model": tooled, "messages": ASK, "tools": TOOLS, "max_tokens": 200, "seed": seed,
                            "tool_choice": {"type": "function", "function": {"name": "weather"}},
                            "stream": stream})
    assert status == 200, body
    if stream:
        calls, finish = streamed_calls(body)
        assert [c["name"] for c in calls.values()] == ["weather"] and calls[0]["id"].startswith("call_")
        arguments = calls[0]["arguments"]
    else:
        choice = body["choices"][0]
        finish, (call,) = choice["finish_reason"], choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "weather"
        assert choice["message"]["content"] is None
        arguments = call["function"]["arguments"]
    assert finish == "tool_calls"
    jsonschema_rs.validate(WEATHER, json.loads(arguments))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("parallel", [True, False])
def test_required_returns_calls_of_offered_functions_with_valid_arguments(tooled, stream, parallel) -> None:
    for seed in range(3):
        status, _, body = post({"model": tooled, "messages": ASK, "tools": TOOLS, "max_tokens": 300, "seed": seed,
                                "tool_choice": "required", "parallel_tool_calls": parallel, "stream": stream})
        assert status == 200, body
        if stream:
            assembled, finish = streamed_calls(body)
            calls = [(c["name"], c["arguments"]) for c in assembled.values()]
        else:
            finish = body["choices"][0]["finish_reason"]
            calls = [(c["function"]["name"], c["function"]["arguments"])
                     for c in body["choices"][0]["message"]["tool_calls"]]
        assert finish == "tool_calls"
        assert 1 <= len(calls) and (parallel or len(calls) == 1)
        for name, arguments in calls:
            jsonschema_rs.validate(SCHEMAS[name], json.loads(arguments))


def test_a_full_round_trip_call_tool_message_then_text(tooled) -> None:
    status, _, first = post({"model": tooled, "messages": ASK, "tools": TOOLS, "max_tokens": 200,
                             "tool_choice": {"type": "function", "function": {"name": "weather"}}})
    assert status == 200
    call = first["choices"][0]["message"]["tool_calls"][0]
    history = ASK + [first["choices"][0]["message"],
                     {"role": "tool", "tool_call_id": call["id"], "content": "4 degrees, rain"}]
    status, _, second = post({"model": tooled, "messages": history, "tools": TOOLS, "tool_choice": "none",
                              "max_tokens": 8})
    assert status == 200, second
    assert isinstance(second["choices"][0]["message"]["content"], str)
    assert "tool_calls" not in second["choices"][0]["message"]


def test_a_template_without_tools_answers_auto_in_text_and_refuses_forced_calls(api, tooled) -> None:
    status, _, body = post({"model": api, "messages": ASK, "tools": TOOLS, "max_tokens": 4})
    assert status == 200
    assert isinstance(body["choices"][0]["message"]["content"], str)
    for choice in ("required", {"type": "function", "function": {"name": "weather"}}):
        status, _, body = post({"model": api, "messages": ASK, "tools": TOOLS, "tool_choice": choice})
        assert status == 400
        assert body["error"]["param"] == "tool_choice"
        assert "no tool support" in body["error"]["message"]


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "array", "uniqueItems": True}}}]}, "tools.0.function.parameters"),
])
def test_tool_requests_that_cannot_be_served_are_400s(tooled, body: dict, param: str) -> None:
    status, _, answer = post({"model": tooled, "messages": ASK, "tools": TOOLS, **body})
    assert status == 400
    assert answer["error"]["param"] == param


def test_tool_formats_are_read_from_templates() -> None:
    assert tool_format(HERMES_TEMPLATE) == HERMES
    assert tool_format("{{ messages }}") is None
    assert tool_format("{% if tools %}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{% endif %}") == DEEPSEEK
    assert tool_format('{% if tools %}{"name": x, "parameters": y}<|python_tag|>{% endif %}') == LLAMA3


@pytest.mark.parametrize("fmt,text,content,calls", [
    (HERMES, 'Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
     "Let me look.", [("weather", {"city": "Oslo"})]),
    (HERMES, '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', None, []),
    (HERMES, "plain answer", "plain answer", []),
    (LLAMA3, '{"name": "clock", "parameters": {"zone": "UTC"}}', "", [("clock", {"zone": "UTC"})]),
    (LLAMA3, '{"not": "a call"}', '{"not": "a call"}', []),
    (DEEPSEEK, 'Sure<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>weather\n```json\n'
               '{"city": "Oslo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "Sure", [("weather", {"city": "Oslo"})]),
])
def test_calls_are_parsed_in_each_family_format(fmt, text, content, calls) -> None:
    got_content, got = parse_calls(text, fmt, {"weather", "clock"})
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert got_content == (text if content is None else content)


def test_a_streamed_auto_answer_holds_back_text_from_where_a_call_may_start() -> None:
    from appliance.api.schemas import ChatCompletionRequest
    from appliance.api.views import ToolUse

    body = ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, "tools": TOOLS})
    use = ToolUse(body, HERMES)
    assert use.hold_from("plain words") is None
    assert use.hold_from("Let me look <tool") == len("Let me look ")  # a marker split across chunks
    assert use.hold_from("ok <tool_call>{") == len("ok ")
    assert ToolUse(body, LLAMA3).hold_from("  {\"na") == 2
    assert ToolUse(body, LLAMA3).hold_from("Sure, {x}") is None
    content, calls = use.split('Looking.\n<tool_call>\n{"name": "clock", "arguments": {"zone": "CET"}}\n</tool_call>')
    assert content == "Looking." and [c.name for c in calls] == ["clock"]
