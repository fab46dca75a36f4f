"""/v1/openapi.json: an OpenAPI 3.1 document whose request schema is the API's own pydantic model."""
import pytest

from appliance.models import VariantStatus
from appliance.api.schemas import ChatCompletionRequest

from tests.appliance.teams import variant

pytestmark = pytest.mark.django_db


def test_the_schema_is_public_and_describes_every_operation(client):
    variant("loaded-one", VariantStatus.DEPLOYED)
    variant("idle-one", VariantStatus.READY)
    doc = client.get("/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/models", "/models/{model}", "/chat/completions", "/completions", "/responses"}
    chat = doc["paths"]["/chat/completions"]["post"]
    assert {"200", "400", "401", "403", "404", "429", "503"} <= set(chat["responses"])
    assert "Retry-After" in chat["responses"]["429"]["headers"]
    assert doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["examples"] == ["loaded-one"]


def test_the_request_schema_follows_the_pydantic_model(client):
    doc = client.get("/v1/openapi.json").json()
    body = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert set(body["properties"]) == set(ChatCompletionRequest.model_fields)
    assert set(body["required"]) == set(ChatCompletionRequest.model_json_schema()["required"])
    for name in ChatCompletionRequest.model_json_schema().get("$defs", {}):
        assert name in doc["components"]["schemas"]
    assert "$defs" not in body


def test_the_responses_schema_follows_its_pydantic_model(client):
    from appliance.api.responses import ResponseRequest

    doc = client.get("/v1/openapi.json").json()
    body = doc["components"]["schemas"]["ResponseRequest"]
    assert set(body["properties"]) == {field.alias or name for name, field in ResponseRequest.model_fields.items()}
    assert doc["components"]["schemas"]["TextFormat"]["properties"].keys() >= {"type", "name", "schema", "strict"}
    assert "200" in doc["paths"]["/responses"]["post"]["responses"]
