"""The official openai client against a live box: refused fields are 400s naming them; schemas hold on every demo."""
import json

import jsonschema_rs
import openai
import pydantic
import pytest

from tests.api.test_fields import ASKING

# What the API or the importer makes of a request, not what the database or broker can change: CI runs it once.
pytestmark = [pytest.mark.e2e, pytest.mark.backend_neutral]

VARIANTS = {"demo-dense": "dense", "demo-distilled": "distilled", "demo-moe": "moe"}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "rain"],
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7},
                         "rain": {"enum": ["none", "some", "lots"]},
                         "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23},
                                   "maxItems": 3}}}


@pytest.fixture(scope="module")
def key(box):
    return box.new_key("fields")


@pytest.fixture(scope="module")
def variants(box):
    """Import and deploy each demo under a name of this module's own (the box is shared with other modules)."""
    names = []
    for demo, kind in VARIANTS.items():
        name = f"fields-{demo}"
        box.manage("import_model", str(box.demo_dir / demo), "--name", name, "--kind", kind, "--wait")
        box.manage("deploy", name, "--wait")
        names.append(name)
    return names


def client(box, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.parametrize("field", sorted(ASKING))
def test_the_official_client_gets_a_400_naming_each_refused_field(box, key, variants, field):
    with pytest.raises(openai.BadRequestError) as caught:
        client(box, key).chat.completions.create(
            model=variants[0], messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            extra_body={field: ASKING[field]})
    assert caught.value.param == field
    assert "not supported by this server" in caught.value.message


@pytest.mark.parametrize("model", list(VARIANTS))
def test_json_schema_output_holds_the_schema_on_every_demo_variant(box, key, variants, model):
    for seed in range(3):
        reply = client(box, key).chat.completions.create(
            model=f"fields-{model}", messages=[{"role": "user", "content": "Weather for Oslo as JSON."}],
            max_tokens=200, temperature=1.0, seed=seed,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema_rs.validate(SCHEMA, json.loads(reply.choices[0].message.content))


def test_the_sdks_parse_helper_reads_a_strict_schema_answer(box, key, variants):
    class Verdict(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        answer: bool
        score: int

    reply = client(box, key).chat.completions.parse(
        model=variants[0], messages=[{"role": "user", "content": "Is the ledger intact?"}],
        max_tokens=100, temperature=0, response_format=Verdict)
    assert isinstance(reply.choices[0].message.parsed, Verdict)


def test_an_unsupported_schema_keyword_is_a_400_through_the_client(box, key, variants):
    with pytest.raises(openai.BadRequestError) as caught:
        client(box, key).chat.completions.create(
            model=variants[0], messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "s", "schema": {"type": "array", "uniqueItems": True}}})
    assert caught.value.param == "response_format.json_schema.schema"
    assert "uniqueItems" in caught.value.message
