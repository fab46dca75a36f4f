"""The OpenAPI 3.1 schema of the chat API, served at /v1/openapi.json.

Responses are written here; the request body schema is taken from the
pydantic model the API validates with, so it follows the code.
"""
import copy

from django.http import JsonResponse

from appliance.api.completions import CompletionRequest
from appliance.api.responses import ResponseRequest
from appliance.api.schemas import ChatCompletionRequest

from ..models import ModelVariant, VariantStatus

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
USAGE = {
    "type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        **{k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
        # Prompt tokens whose KV came from the team's prefix cache instead of being computed.
        "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer", "minimum": 0}}},
    },
}
CHAT_COMPLETION = {
    "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["index", "message", "finish_reason"],
            "properties": {
                "index": {"type": "integer"},
                "message": {"type": "object", "required": ["role", "content"],
                            "properties": {"role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                                           "reasoning_content": {"type": ["string", "null"]},
                                           "tool_calls": {"type": "array", "items": {"$ref": "#/components/schemas/ToolCallOut"}}}},
                "finish_reason": {"enum": ["stop", "length", "tool_calls", "cancelled", "error", None]},
                "logprobs": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/ChoiceLogprobs"}]}}}},
        "usage": {"$ref": "#/components/schemas/Usage"},
    },
}
TOOL_CALL_OUT = {
    "type": "object", "required": ["id", "type", "function"],
    "properties": {"id": {"type": "string"}, "type": {"const": "function"},
                   "function": {"type": "object", "required": ["name", "arguments"],
                                "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}},
}
_TOKEN_LOGPROB = {"token": {"type": "string"}, "logprob": {"type": "number"},
                  "bytes": {"type": "array", "items": {"type": "integer"}}}
CHOICE_LOGPROBS = {
    "type": "object", "required": ["content"],
    "properties": {"refusal": {"type": "null"}, "content": {"type": "array", "items": {
        "type": "object", "required": ["token", "logprob", "bytes", "top_logprobs"],
        "properties": {**_TOKEN_LOGPROB, "top_logprobs": {"type": "array", "items": {
            "type": "object", "required": ["token", "logprob", "bytes"], "properties": _TOKEN_LOGPROB}}}}}},
}
TEXT_COMPLETION = {
    "type": "object", "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "usage": {"$ref": "#/components/schemas/Usage"},
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["index", "text", "finish_reason"],
            "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                           "finish_reason": {"enum": ["stop", "length", "cancelled", "error", None]},
                           "logprobs": {"type": ["object", "null"]}}}},
    },
}
# One event of a streamed answer: `data` holds a chat.completion.chunk as JSON, an error, or "[DONE]".
SSE_EVENT = {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}},
}
OUTPUT_TEXT = {
    "type": "object", "required": ["type", "text", "annotations"],
    "properties": {"type": {"const": "output_text"}, "text": {"type": "string"},
                   "annotations": {"type": "array"}, "logprobs": {"type": "array"}},
}
RESPONSE_USAGE = {
    "type": "object", "required": ["input_tokens", "output_tokens", "total_tokens"],
    "properties": {
        **{k: {"type": "integer", "minimum": 0} for k in ("input_tokens", "output_tokens", "total_tokens")},
        "input_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer", "minimum": 0}}},
        "output_tokens_details": {"type": "object",
                                  "properties": {"reasoning_tokens": {"type": "integer", "minimum": 0}}},
    },
}
RESPONSE = {
    "type": "object", "required": ["id", "object", "created_at", "status", "model", "output"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "response"}, "created_at": {"type": "integer"},
        "status": {"enum": ["completed", "incomplete", "in_progress", "failed"]},
        "error": {"type": ["object", "null"]}, "incomplete_details": {"type": ["object", "null"]},
        "model": {"type": "string"}, "instructions": {"type": ["string", "null"]},
        "output": {"type": "array", "items": {
            "type": "object", "required": ["type", "id", "status", "role", "content"],
            "properties": {"type": {"const": "message"}, "id": {"type": "string"},
                           "status": {"enum": ["completed", "incomplete", "in_progress"]},
                           "role": {"const": "assistant"},
                           "content": {"type": "array", "items": {"$ref": "#/components/schemas/OutputText"}}}}},
        "previous_response_id": {"type": ["string", "null"]}, "store": {"type": "boolean"},
        "usage": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/ResponseUsage"}]},
    },
}
MODEL = {
    "type": "object", "required": ["id", "object", "created", "owned_by"],
    "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                   "owned_by": {"type": "string"}, "kind": {"type": "string"}, "loaded": {"type": "boolean"},
                   "random_weights": {"type": "boolean"}},
}
MODEL_LIST = {
    "type": "object", "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}},
}


def _error(description: str, retry_after: bool = False) -> dict:
    response = {"description": description,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if retry_after:
        response["headers"] = {"Retry-After": {"description": "Seconds until the limit resets.",
                                               "schema": {"type": "string"}}}
    return response


ERRORS = {
    "400": _error("The body is not valid JSON or breaks the schema; `param` names the field."),
    "401": _error("Missing, unknown, revoked or expired API key."),
    "403": _error("The key's team (or the key itself) may not use this model."),
    "404": _error("No such model."),
    "408": _error("The body did not arrive within APPLIANCE_BODY_TIMEOUT_S; the connection is closed."),
    "413": _error("The body is larger than APPLIANCE_MAX_BODY_BYTES; it is not read, the connection is closed."),
    "429": _error("A rate limit or token budget is reached, or the engine's queue is full.", retry_after=True),
    "503": _error("The model exists but is not loaded (deploy it), or is being unloaded."),
}


def request_schema(model=ChatCompletionRequest) -> tuple[dict, dict]:
    """Return the request body schema and the definitions it refers to, from the pydantic model."""
    schema = copy.deepcopy(model.model_json_schema(ref_template="#/components/schemas/{model}"))
    definitions = schema.pop("$defs", {})
    return schema, definitions


def build(model_examples: list[str]) -> dict:
    """Return the OpenAPI document; model_examples name the variants that are loaded now."""
    body, definitions = request_schema()
    text_body, text_definitions = request_schema(CompletionRequest)
    response_body, response_definitions = request_schema(ResponseRequest)
    definitions = {**definitions, **text_definitions, **response_definitions}
    example = {"model": model_examples[0] if model_examples else "demo-dense",
               "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    if model_examples:
        body.setdefault("properties", {}).setdefault("model", {})["examples"] = model_examples
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM appliance chat API", "version": "1",
                 "description": "OpenAI-compatible chat API of the appliance. Every request needs a team key."},
        "servers": [{"url": "/v1"}],
        "security": [{"teamKey": []}],
        "paths": {
            "/models": {"get": {
                "operationId": "listModels", "summary": "List the variants this key may use.",
                "responses": {"200": {"description": "The variants the caller may use.",
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}}},
                              "401": ERRORS["401"]}}},
            "/models/{model}": {"get": {
                "operationId": "retrieveModel", "summary": "One variant this key may use, loaded now.",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The variant.",
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}},
                              "401": ERRORS["401"], "404": ERRORS["404"]}}},
            "/completions": {"post": {
                "operationId": "createCompletion", "summary": "Complete a prompt (or a list of prompts), whole or streamed.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/CompletionRequest"},
                    "example": {"model": example["model"], "prompt": "The audit ledger", "max_tokens": 8}}}},
                "responses": {
                    "200": {"description": "The choices; with `stream: true`, server-sent events of chunks.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TextCompletion"}},
                                        "text/event-stream": {"schema": {"$ref": "#/components/schemas/ServerSentEvent"}}}},
                    **ERRORS}}},
            "/responses": {"post": {
                "operationId": "createResponse",
                "summary": "Generate a response (OpenAI's Responses API), whole or as typed events.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ResponseRequest"},
                    "example": {"model": example["model"], "input": "hello", "max_output_tokens": 8}}}},
                "responses": {
                    "200": {"description": "The response; with `stream: true`, server-sent typed events "
                                           "(response.created ... response.completed), each with a sequence_number.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Response"}},
                                        "text/event-stream": {"schema": {"$ref": "#/components/schemas/ServerSentEvent"}}}},
                    **ERRORS,
                    "404": _error("No such model, or no stored response of this team with previous_response_id.")}}},
            "/chat/completions": {"post": {
                "operationId": "createChatCompletion", "summary": "Generate a chat answer, whole or streamed.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}, "example": example}}},
                "responses": {
                    "200": {"description": "The answer; with `stream: true`, server-sent events of chunks.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                                        "text/event-stream": {"schema": {"$ref": "#/components/schemas/ServerSentEvent"}}}},
                    **ERRORS}}},
        },
        "components": {
            "securitySchemes": {"teamKey": {"type": "http", "scheme": "bearer",
                                            "description": "A team's API key, `sk-box-…`."}},
            "schemas": {**definitions, "ChatCompletionRequest": body, "ChatCompletion": CHAT_COMPLETION,
                        "Usage": USAGE, "ModelList": MODEL_LIST, "Model": MODEL,
                        "CompletionRequest": text_body, "TextCompletion": TEXT_COMPLETION, "ToolCallOut": TOOL_CALL_OUT,
                        "ChoiceLogprobs": CHOICE_LOGPROBS,
                        "ResponseRequest": response_body, "Response": RESPONSE, "OutputText": OUTPUT_TEXT,
                        "ResponseUsage": RESPONSE_USAGE, "Error": ERROR, "ServerSentEvent": SSE_EVENT},
        },
    }


def openapi(request):
    """Serve the schema (no key needed: it describes the API, it does not use it)."""
    loaded = list(ModelVariant.objects.filter(status=VariantStatus.DEPLOYED).order_by("name")
                  .values_list("name", flat=True))
    return JsonResponse(build(loaded), json_dumps_params={"indent": 1})
