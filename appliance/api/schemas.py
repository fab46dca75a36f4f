"""Request bodies of the chat API, validated by pydantic, and how their errors read."""
import json
from typing import Annotated, Literal

from django.http import JsonResponse

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, Strict, ValidationError,
                      field_validator, model_validator)

from inference.engine.grammar import ANY_OBJECT, GrammarError, json_schema_grammar

from .choices import MAX_CHOICES
from .errors import error
from .fields import FIELDS, refused_field, refusal_message

# The deepest JSON a request body may nest (the schema itself needs 4: body, messages, a message, its parts).
# Deeper bodies are refused by name, before Python's own recursion limit turns them into a RecursionError.
MAX_JSON_DEPTH = 32

# OpenAI's coercion: a string where a number or a boolean belongs is refused ("1" for max_tokens), an integer
# is a fine float (1 for temperature), a decimal is not an integer (1.0 for max_tokens). Pydantic's strict
# types say exactly that; its lax default would take "1" and "true".
StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict()]
StrictBool = Annotated[bool, Strict()]


def encodable(text: str) -> str:
    """Return text if it is valid Unicode text (no lone surrogate, which JSON's \\ud800 escapes can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone surrogate (U+{ord(exc.object[exc.start]):04X}) at position "
                         f"{exc.start}; send valid UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(encodable)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: Text = Field(min_length=1, max_length=64)
    arguments: Text  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    id: Text = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Only an assistant message that calls tools may leave its content out (null).
    content: str | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls, in an agent's history
    tool_call_id: Text | None = None  # which call a tool message answers

    @field_validator("content")
    @classmethod
    def content_is_encodable(cls, value):
        # The tokenizer (Rust) refuses text that is not valid Unicode with a TypeError; say so as a 400 here.
        for text in [] if value is None else [value] if isinstance(value, str) else [part.text for part in value]:
            encodable(text)
        return value

    @model_validator(mode="after")
    def roles_carry_their_fields(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict:
        """Return the message as chat templates read it (tool-call arguments as objects, as HF templates expect)."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": arguments_object(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.name:
            message["name"] = self.name
        return message


def arguments_object(arguments: str):
    """Return tool-call arguments parsed from JSON, or the text itself when it is not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class JsonSchemaFormat(BaseModel):
    name: Text = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Text | None = None
    # OpenAI's `schema` field; named schema_ here because pydantic's BaseModel has a `schema` method.
    schema_: dict | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(BaseModel):
    """How the answer must be shaped: free text, any JSON object, or JSON that holds a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    _grammar: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def compile_the_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        if self.type == "text":
            return self
        schema = ANY_OBJECT if self.type == "json_object" else (self.json_schema.schema_ or ANY_OBJECT)
        try:
            self._grammar = json_schema_grammar(schema)
        except GrammarError as exc:
            raise UnsupportedSchema(str(exc)) from None
        return self

    @property
    def grammar(self) -> str | None:
        """Return the grammar text the engine enforces, or None for free text."""
        return self._grammar


class FieldError(ValueError):
    """A problem found across fields (a validator of the whole request); `param` names the field to blame."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class UnsupportedSchema(FieldError):
    """A schema this server cannot enforce; the message says which part."""

    def __init__(self, message: str, param: str = "response_format.json_schema.schema"):
        super().__init__(f"this server cannot enforce this schema: {message}", param)


class FunctionDefinition(BaseModel):
    name: Text = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Text | None = None
    parameters: dict | None = None  # a JSON schema of the arguments; none means any object
    strict: StrictBool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: Text = Field(min_length=1)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    # Clients send fields we do not use (user, logit_bias=None, ...); ignore those
    # rather than refuse, as OpenAI does for unknown-but-harmless fields.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES, description=(
        "Choices to generate; the prompt is computed once. With a seed, choice i samples with seed + i."))
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: StrictFloat = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat = Field(default=0.0, ge=-2.0, le=2.0)
    # An extension (as in vLLM): keep only the k most likely tokens; 0 or -1 turns it off.
    top_k: StrictInt | None = Field(default=None, ge=-1)
    response_format: ResponseFormat | None = None
    logprobs: StrictBool | None = None
    logit_bias: dict[str, StrictFloat] | None = Field(default=None, max_length=1024)
    # Extensions, as in vLLM.
    min_tokens: StrictInt = Field(default=0, ge=0)
    ignore_eos: StrictBool = False
    stop_token_ids: list[Annotated[int, Strict(), Field(ge=0)]] | None = Field(default=None, max_length=16)

    @field_validator("logit_bias")
    @classmethod
    def bias_keys_are_token_ids(cls, value):
        for key, bias in (value or {}).items():
            if not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys must be token ids (digits), got {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
        return value

    @property
    def token_bias(self) -> dict[int, float] | None:
        return {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    _tool_grammar: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def tools_fit_the_choice(self):
        if self.token_limit is not None and self.min_tokens > self.token_limit:
            raise FieldError(f"min_tokens ({self.min_tokens}) is more than the token limit ({self.token_limit})",
                             "min_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs needs logprobs: true", "top_logprobs")
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise FieldError("every function needs a name of its own", "tools")
        forcing = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forcing and not names:
            raise FieldError("a forced tool call needs `tools`", "tool_choice")
        if self.forced_tools:
            if self.named is not None and self.named not in names:
                raise FieldError(f"no function named '{self.named}' in `tools`", "tool_choice")
            if self.response_format is not None and self.response_format.type != "text":
                raise FieldError("a forced tool call cannot be combined with a JSON response_format", "tool_choice")
            from .toolcalls import forced_grammar  # here: toolcalls imports nothing of the schemas

            for i, tool in enumerate(self.tools):
                if self.named in (None, tool.function.name):
                    try:
                        json_schema_grammar(tool.function.parameters or ANY_OBJECT)
                    except GrammarError as exc:
                        raise UnsupportedSchema(str(exc), f"tools.{i}.function.parameters") from None
            self._tool_grammar = forced_grammar(self.tools, self, self.parallel_tool_calls)
        return self

    @property
    def logprob_alternatives(self) -> int | None:
        """Return SamplingParams.logprobs: None when not asked, else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def tool_mode(self) -> str:
        """Return "none", "auto", "required" or "named": how this request uses its tools."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def named(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    @property
    def forced_tools(self) -> bool:
        return self.tool_mode in ("required", "named")

    @property
    def grammar(self) -> str | None:
        """Return the grammar the engine enforces: a forced tool call's, or response_format's, or None."""
        if self._tool_grammar is not None:
            return self._tool_grammar
        return self.response_format.grammar if self.response_format else None

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        for stop in stops:
            encodable(stop)
        return stops

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_k_cut(self) -> int:
        """Return top_k as the sampler takes it: 0 when off."""
        return max(0, self.top_k or 0)


UNION_TAGS = {"str", "int", "float", "bool"}


def describe_validation_error(exc: ValidationError) -> tuple[str, str | None]:
    """Return (message, parameter name) for the first problem pydantic found."""
    first = exc.errors(include_url=False)[0]
    # Leave out the union members pydantic names in a location ("str", "list[TextPart]"): a client knows its
    # fields, not our types.
    loc = [str(part) for part in first.get("loc", ()) if str(part) not in UNION_TAGS and "[" not in str(part)]
    where = ".".join(loc) or "body"
    param = where if loc else None
    message = first.get("msg", "invalid value")
    blamed = (first.get("ctx") or {}).get("error")
    if isinstance(blamed, FieldError):  # raised for the whole request (or deep inside it): it names its field
        return f"Invalid value for '{blamed.param}': {blamed}", blamed.param
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return f"Invalid value for '{where}': {message}", param


def read_body(raw: bytes, fields: dict) -> tuple[dict | None, JsonResponse | None]:
    """Return a request body as a JSON object, or the 400 that names what is wrong with it.

    Every endpoint reads its body here: valid JSON, nested at most MAX_JSON_DEPTH deep, an object, and no field
    that its table (appliance.api.fields) refuses.
    """
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, error(f"Request body is not valid JSON: {exc}", 400)
    except RecursionError:  # nested past the interpreter's limit: certainly past ours
        return None, too_deep()
    if json_depth(payload) > MAX_JSON_DEPTH:
        return None, too_deep()
    if not isinstance(payload, dict):
        return None, error("Request body must be a JSON object", 400)
    refused = refused_field(payload, fields)
    if refused is not None:
        name, rule = refused
        return None, error(refusal_message(name, rule), 400, param=name, code="unsupported_parameter")
    return payload, None


def validated(model: type[BaseModel], payload: dict):
    """Return (the validated request, None), or (None, the 400 naming the first invalid field)."""
    try:
        return model.model_validate(payload), None
    except ValidationError as exc:
        message, param = describe_validation_error(exc)
        return None, error(message, 400, param=param)


def parse_chat_request(raw: bytes) -> tuple[ChatCompletionRequest | None, JsonResponse | None]:
    """Return the validated request, or the 400 that names what is wrong with it."""
    payload, invalid = read_body(raw, FIELDS)
    return (None, invalid) if invalid is not None else validated(ChatCompletionRequest, payload)


def too_deep() -> JsonResponse:
    return error(f"Request body nests JSON arrays and objects deeper than {MAX_JSON_DEPTH} levels", 400)


def json_depth(value) -> int:
    """Return how deeply arrays and objects nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:  # deeper than that is refused anyway: no need to walk further
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest
