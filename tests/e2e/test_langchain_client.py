"""LangChain's ChatOpenAI, unchanged, against a live box: bound tools and structured output."""
import json

import jsonschema_rs
import pydantic
import pytest
from langchain_openai import ChatOpenAI

from tests.api.test_tool_calls import ASK, SCHEMAS, TOOLS
from tests.e2e.test_team_api_features import key, tools_model  # noqa: F401  (fixtures)

pytestmark = pytest.mark.e2e


class Weather(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=12)
    rain: bool


def chat_model(box, key, model) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=120,
                      max_tokens=300, temperature=1.0, seed=2)


def test_bind_tools_with_a_forced_choice_returns_valid_calls(box, key, tools_model):
    for choice in ("weather", "any"):  # LangChain's names for a named function and for `required`
        reply = chat_model(box, key, tools_model).bind_tools(TOOLS, tool_choice=choice).invoke(ASK)
        assert reply.tool_calls
        for call in reply.tool_calls:
            jsonschema_rs.validate(SCHEMAS[call["name"]], call["args"])


def test_with_structured_output_parses_into_the_model(box, key, tools_model):
    structured = chat_model(box, key, tools_model).with_structured_output(Weather, method="json_schema", strict=True)
    answer = structured.invoke("Weather in Oslo?")
    assert isinstance(answer, Weather)
    jsonschema_rs.validate(Weather.model_json_schema(), json.loads(answer.model_dump_json()))
