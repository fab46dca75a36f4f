"""Clients against a live box: the official openai client (tool calls, logprobs, reasoning, model card, health
and ready) and LangChain's ChatOpenAI, unchanged (bound tools, structured output)."""
import json

import httpx
import jsonschema_rs
import openai
import pydantic
import pytest
from langchain_openai import ChatOpenAI

from tests.api.test_tool_calls import ASK, SCHEMAS, TOOLS, WEATHER
from tests.api.tool_variant import write_reasoning_variant, write_tool_variant

# What the API or the importer makes of a request, not what the database or broker can change: CI runs it once.
pytestmark = [pytest.mark.e2e, pytest.mark.backend_neutral]


@pytest.fixture(scope="module")
def key(box):
    return box.new_key("features")


@pytest.fixture(scope="module")
def tools_model(box, tmp_path_factory):
    path = write_tool_variant(box.demo_dir, tmp_path_factory.mktemp("tools") / "demo-tools")
    box.manage("import_model", str(path), "--name", "demo-tools", "--kind", "dense", "--wait")
    box.manage("deploy", "demo-tools", "--wait")
    return "demo-tools"


@pytest.fixture(scope="module")
def think_model(box, tmp_path_factory):
    path = write_reasoning_variant(box.demo_dir, tmp_path_factory.mktemp("think") / "demo-think")
    box.manage("import_model", str(path), "--name", "demo-think", "--kind", "distilled", "--wait")
    box.manage("deploy", "demo-think", "--wait")
    return "demo-think"


def client(box, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=120)


NAMED = {"type": "function", "function": {"name": "weather"}}


def test_a_named_call_through_the_sdk_holds_the_parameters(box, key, tools_model):
    reply = client(box, key).chat.completions.create(model=tools_model, messages=ASK, tools=TOOLS,
                                                     tool_choice=NAMED, max_tokens=200, seed=3)
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "weather"
    jsonschema_rs.validate(WEATHER, json.loads(call.function.arguments))


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_the_sdks_stream_helper_assembles_streamed_calls(box, key, tools_model, choice):
    with client(box, key).chat.completions.stream(model=tools_model, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                  max_tokens=300, seed=1) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.tool_calls
    for call in final.choices[0].message.tool_calls:
        jsonschema_rs.validate(SCHEMAS[call.function.name], json.loads(call.function.arguments))


def test_a_full_round_trip_through_the_sdk(box, key, tools_model):
    openai_client = client(box, key)
    # seed 1, as the stream test's: unseeded, a random-weight model may run out of tokens inside its call.
    first = openai_client.chat.completions.create(model=tools_model, messages=ASK, tools=TOOLS,
                                                  tool_choice="required", max_tokens=300, seed=1)
    message = first.choices[0].message
    history = ASK + [message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": call.id, "content": "4 degrees"} for call in message.tool_calls]
    second = openai_client.chat.completions.create(model=tools_model, messages=history, tools=TOOLS, max_tokens=8)
    assert second.choices[0].message.content is not None


def test_logprobs_through_the_sdk(box, key, tools_model):
    reply = client(box, key).chat.completions.create(model=tools_model, messages=ASK, max_tokens=6, temperature=0,
                                                     logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    assert all(entry.top_logprobs[0].logprob == pytest.approx(entry.logprob) for entry in entries)


def test_reasoning_content_through_the_sdk(box, key, think_model):
    reply = client(box, key).chat.completions.create(model=think_model, messages=ASK, max_tokens=10)
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"] is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == reply.usage.completion_tokens


def test_the_model_card_and_a_missing_one(box, key, tools_model):
    assert client(box, key).models.retrieve(tools_model).id == tools_model
    with pytest.raises(openai.NotFoundError):
        client(box, key).models.retrieve("no-such-variant")


def test_health_and_ready(box, tools_model):
    assert httpx.get(f"{box.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{box.url}/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and ready.json()["deployed"] == ready.json()["loaded"] >= 1


class Weather(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=12)
    rain: bool


def chat_model(box, key, model) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=120,
                      max_tokens=300, temperature=1.0, seed=2)


def test_langchain_bind_tools_with_a_forced_choice_returns_valid_calls(box, key, tools_model):
    for choice in ("weather", "any"):  # LangChain's names for a named function and for `required`
        reply = chat_model(box, key, tools_model).bind_tools(TOOLS, tool_choice=choice).invoke(ASK)
        assert reply.tool_calls
        for call in reply.tool_calls:
            jsonschema_rs.validate(SCHEMAS[call["name"]], call["args"])


def test_langchain_with_structured_output_parses_into_the_model(box, key, tools_model):
    structured = chat_model(box, key, tools_model).with_structured_output(Weather, method="json_schema", strict=True)
    assert isinstance(structured.invoke("Weather in Oslo?"), Weather)
