"""/v1/responses against a real demo engine: text and items, typed events in order, structured output, stored
responses and previous_response_id under the team's transcript policy, refused fields."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema_rs
import pytest
from django.test import AsyncClient

from appliance.api.fields import REFUSED, RESPONSE_FIELDS
from audit import stored_responses, transcripts
from audit.models import StoredResponse
from tests.api.test_chat_api import AUTH, SETTLED, api  # noqa: F401  (api is a fixture)
from tests.inference.conftest import run
from tests.audit.tamper import write_queued_events

TEAM = "api-tests"  # the stand-in gatekeeper's team
README = Path(__file__).resolve().parents[2] / "README.md"
ORDER = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
         "response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture
def keeping(api):
    transcripts.set_policy(TEAM, keep=True, actor="admin:test")
    return api


def respond(body: dict):
    """POST to /v1/responses; return (status, parsed JSON) or (status, the list of (event name, payload))."""
    async def go():
        response = await AsyncClient().post("/v1/responses", json.dumps(body), content_type="application/json",
                                            **AUTH)
        if response.get("Content-Type", "").startswith("text/event-stream"):
            raw = b"".join([part async for part in response.streaming_content]).decode()
            events = []
            for block in raw.split("\n\n"):
                if block.strip():
                    name = re.search(r"^event: (.+)$", block, re.MULTILINE).group(1)
                    data = json.loads(re.search(r"^data: (.+)$", block, re.MULTILINE).group(1))
                    events.append((name, data))
            return response.status_code, events
        return response.status_code, response.json()

    return run(go())


def output_text(body: dict) -> str:
    return "".join(part["text"] for item in body["output"] for part in item["content"])


def test_a_string_input_is_answered_with_usage(api) -> None:
    SETTLED.clear()
    status, body = respond({"model": api, "input": "Describe the audit ledger.", "max_output_tokens": 6,
                            "temperature": 0})
    assert status == 200, body
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert body["status"] in ("completed", "incomplete")
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    usage = body["usage"]
    assert 0 < usage["output_tokens"] <= 6 and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert body["store"] is False  # the team keeps no transcripts: nothing stored
    write_queued_events()
    (report,) = SETTLED
    assert (report.outcome, report.completion_tokens) == ("ok", usage["output_tokens"])


def test_items_with_instructions_are_the_same_prompt_as_chat(api) -> None:
    items = [{"role": "developer", "content": "Answer briefly."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Describe the box."}]}]
    _, as_items = respond({"model": api, "input": items, "max_output_tokens": 5, "temperature": 0})
    _, as_text = respond({"model": api, "instructions": "Answer briefly.", "input": "Describe the box.",
                          "max_output_tokens": 5, "temperature": 0})
    # instructions are a system message, the developer item a developer one: same user turn, maybe another prompt
    assert as_items["usage"]["input_tokens"] > 0 and as_text["instructions"] == "Answer briefly."
    _, again = respond({"model": api, "input": items, "max_output_tokens": 5, "temperature": 0})
    assert output_text(again) == output_text(as_items)  # greedy


def test_the_stream_sends_the_typed_events_in_order(api) -> None:
    body = {"model": api, "input": "Describe the audit ledger.", "max_output_tokens": 8, "temperature": 0}
    status, events = respond({**body, "stream": True})
    assert status == 200
    names = [name for name, _ in events]
    assert [payload["type"] for _, payload in events] == names
    assert [payload["sequence_number"] for _, payload in events] == list(range(len(events)))
    deltas = [payload["delta"] for name, payload in events if name == "response.output_text.delta"]
    assert deltas
    assert [n for n in names if n != "response.output_text.delta"] == ORDER + [names[-1]]
    assert names[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)  # between part added and done
    assert names[-1] in ("response.completed", "response.incomplete")
    final = events[-1][1]["response"]
    done_text = dict(events)["response.output_text.done"]["text"]
    assert "".join(deltas) == done_text == output_text(final)
    _, whole = respond(body)
    assert output_text(whole) == done_text and final["usage"] == whole["usage"]


def test_a_json_schema_format_holds_on_the_random_weights(api) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    status, body = respond({"model": api, "input": "Plan a trip.", "max_output_tokens": 80,
                            "text": {"format": {"type": "json_schema", "name": "trip", "schema": schema,
                                                "strict": True}}})
    assert status == 200, body
    assert body["status"] == "completed"
    jsonschema_rs.validate(schema, json.loads(output_text(body)))
    assert body["text"]["format"]["name"] == "trip"


def test_a_stored_response_is_encrypted_and_continued(keeping) -> None:
    first_input = "Remember the word ledger."
    status, first = respond({"model": keeping, "input": first_input, "max_output_tokens": 5, "temperature": 0})
    assert status == 200 and first["store"] is True  # stored by default when the team keeps transcripts
    row = StoredResponse.objects.get(response_id=first["id"])
    assert row.team == TEAM and first_input.encode() not in bytes(row.ciphertext)
    status, second = respond({"model": keeping, "input": "Which word?", "previous_response_id": first["id"],
                              "max_output_tokens": 5, "temperature": 0, "instructions": "Be brief."})
    assert status == 200, second
    assert second["previous_response_id"] == first["id"]
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    assert stored_responses.load(TEAM, second["id"]) == {  # instructions are not carried on
        "input": [{"role": "user", "content": first_input}, {"role": "assistant", "content": output_text(first)},
                  {"role": "user", "content": "Which word?"}],
        "output": output_text(second)}


def test_store_false_keeps_no_response(keeping) -> None:
    status, body = respond({"model": keeping, "input": "hello", "max_output_tokens": 2, "store": False})
    assert status == 200 and body["store"] is False
    assert not StoredResponse.objects.filter(response_id=body["id"]).exists()


def test_another_teams_response_is_not_found(keeping) -> None:
    transcripts.set_policy("other-team", keep=True, actor="admin:test")
    theirs = stored_responses.store("other-team", "resp_theirs", keeping, {"input": [], "output": "secret"})
    status, body = respond({"model": keeping, "input": "go on", "previous_response_id": theirs.response_id})
    assert status == 404
    assert body["error"]["param"] == "previous_response_id"
    status, body = respond({"model": keeping, "input": "go on", "previous_response_id": "resp_nothing"})
    assert status == 404


@pytest.mark.parametrize("params", [{"store": True}, {"previous_response_id": "resp_x"}])
def test_a_team_that_keeps_nothing_is_refused_storage_by_name(api, params: dict) -> None:
    (param,) = params
    status, body = respond({"model": api, "input": "hello", **params})
    assert status == 400
    assert body["error"]["param"] == param and "keeps no" in body["error"]["message"]


@pytest.mark.parametrize("params,param", [
    ({"tools": [{"type": "function", "name": "f"}]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
    ({"max_tool_calls": 2}, "max_tool_calls"), ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"truncation": "auto"}, "truncation"), ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"), ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"service_tier": "flex"}, "service_tier"), ({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),
    ({"input": ""}, "input"), ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                               "input.0.content.0.type"),
    ({"input": [{"type": "function_call_output", "role": "user", "content": "x"}]}, "input.0.type"),
    ({"text": {"verbosity": "high"}}, "text.verbosity"),
    ({"text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "array", "uniqueItems": True}}}},
     "text.format.schema"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_what_cannot_be_served_is_a_400_naming_it(api, params: dict, param: str) -> None:
    status, body = respond({"model": api, "input": "hello", **params})
    assert status == 400, body
    assert body["error"]["param"] == param


def test_every_refused_response_field_is_tested() -> None:
    refused = {name for name, rule in RESPONSE_FIELDS.items() if rule.support == REFUSED}
    assert refused == {"tools", "tool_choice", "max_tool_calls", "reasoning", "include", "top_logprobs", "truncation",
                       "background", "conversation", "prompt", "service_tier", "prompt_cache_retention"}


def test_the_readme_lists_the_responses_table() -> None:
    section = README.read_text().split("### The Responses API's fields", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| \*\*(honoured|accepted|refused)\*\* \|", section, re.MULTILINE)
    assert dict(rows) == {name: rule.support for name, rule in RESPONSE_FIELDS.items()}


def test_one_ledger_event_and_a_transcript_per_response(keeping) -> None:
    from audit.models import AuditEvent, Transcript

    status, body = respond({"model": keeping, "input": "Describe the box.", "max_output_tokens": 3})
    assert status == 200
    write_queued_events()
    (event,) = [e for e in AuditEvent.objects.filter(action="chat.completion")
                if e.details.get("response_id") == body["id"]]
    assert event.details["endpoint"] == "responses" and event.details["stored"] is True
    assert event.details["completion_tokens"] == body["usage"]["output_tokens"]
    assert "Describe the box." not in json.dumps(event.details)  # digests, never the text
    assert Transcript.objects.filter(team=TEAM).count() == 1
