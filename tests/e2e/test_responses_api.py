"""The official openai client's Responses API against a live box: plain, streamed (typed events in order),
structured output, previous_response_id under a keeping policy, team scoping, refused fields."""
import json

import jsonschema_rs
import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "resp-dense"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
ORDER = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
         "response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def model(box):
    box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", MODEL, "--kind", "dense", "--wait")
    box.manage("deploy", MODEL, "--wait")
    return MODEL


def keeping_team(box, team: str) -> None:
    box.manage("shell", "-c", f"from audit.transcripts import set_policy; "
                              f"set_policy({team!r}, keep=True, actor='admin:e2e')")


@pytest.fixture(scope="module")
def keeper(box, model):
    """A key of a team whose policy keeps transcripts, so its responses are stored."""
    keeping_team(box, "resp-keepers")
    return box.new_key("resp-keepers")


@pytest.fixture(scope="module")
def forgetter(box, model):
    """A key of a team that keeps nothing."""
    return box.new_key("resp-forgetters")


def client(box, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_a_plain_response_through_the_sdk(box, forgetter, model):
    reply = client(box, forgetter).responses.create(model=model, input="Describe the audit ledger.",
                                                    instructions="Answer briefly.", max_output_tokens=8,
                                                    temperature=0)
    assert reply.object == "response" and reply.status in ("completed", "incomplete")
    assert reply.output_text == reply.output[0].content[0].text
    assert 0 < reply.usage.output_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    assert reply.store is False


def test_the_streamed_events_come_in_order(box, forgetter, model):
    stream = client(box, forgetter).responses.create(model=model, input="Describe the audit ledger.",
                                                     max_output_tokens=12, temperature=0, stream=True)
    events = list(stream)
    names = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas and names[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
    assert [n for n in names if n != "response.output_text.delta"] == ORDER + [names[-1]]
    assert names[-1] in ("response.completed", "response.incomplete")
    done = next(event for event in events if event.type == "response.output_text.done")
    assert "".join(deltas) == done.text == events[-1].response.output_text


def test_the_sdks_stream_helper_assembles_a_structured_response(box, forgetter, model):
    # A schema makes the answer end when its JSON closes: the stream ends in response.completed, the one event
    # the helper takes as the end (one cut by max_output_tokens ends in response.incomplete, as on OpenAI).
    fmt = {"format": {"type": "json_schema", "name": "trip", "schema": SCHEMA, "strict": True}}
    with client(box, forgetter).responses.stream(model=model, input="Plan a trip as JSON.", max_output_tokens=120,
                                                 temperature=0, text=fmt) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    whole = client(box, forgetter).responses.create(model=model, input="Plan a trip as JSON.",
                                                    max_output_tokens=120, temperature=0, text=fmt)
    assert final.status == "completed" and final.output_text == whole.output_text
    jsonschema_rs.validate(SCHEMA, json.loads(final.output_text))


def test_a_json_schema_format_holds(box, forgetter, model):
    for _ in range(3):
        reply = client(box, forgetter).responses.create(
            model=model, input="Plan a trip as JSON.", max_output_tokens=120,
            text={"format": {"type": "json_schema", "name": "trip", "schema": SCHEMA, "strict": True}})
        assert reply.status == "completed"
        jsonschema_rs.validate(SCHEMA, json.loads(reply.output_text))


def test_previous_response_id_continues_a_stored_response(box, keeper, model):
    sdk = client(box, keeper)
    first = sdk.responses.create(model=model, input="Remember the word ledger.", max_output_tokens=6,
                                 temperature=0)
    assert first.store is True
    second = sdk.responses.create(model=model, input="Which word?", previous_response_id=first.id,
                                  max_output_tokens=6, temperature=0)
    assert second.previous_response_id == first.id
    # The second prompt holds the first's input and answer before its own.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    third = sdk.responses.create(model=model, input="Which word?", previous_response_id=second.id,
                                 max_output_tokens=6, temperature=0)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens


def test_another_teams_response_id_is_not_found(box, keeper, model):
    keeping_team(box, "resp-others")
    theirs = client(box, box.new_key("resp-others")).responses.create(model=model, input="A secret.",
                                                                      max_output_tokens=4)
    with pytest.raises(openai.NotFoundError) as caught:
        client(box, keeper).responses.create(model=model, input="Go on.", previous_response_id=theirs.id,
                                             max_output_tokens=4)
    assert caught.value.param == "previous_response_id"


@pytest.mark.parametrize("field,value", [("store", True), ("previous_response_id", "resp_anything")])
def test_a_team_that_keeps_nothing_is_refused_storage(box, forgetter, model, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client(box, forgetter).responses.create(model=model, input="hi", max_output_tokens=4, **{field: value})
    assert caught.value.param == field


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]),
    ("reasoning", {"effort": "high"}), ("background", True), ("include", ["message.output_text.logprobs"]),
])
def test_a_refused_field_is_a_400_naming_it(box, forgetter, model, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client(box, forgetter).responses.create(model=model, input="hi", max_output_tokens=4, **{field: value})
    assert caught.value.param == field
    assert "not supported by this server" in caught.value.message
