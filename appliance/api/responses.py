"""/v1/responses: OpenAI's Responses API (input as text or message items, instructions, typed stream events,
stored responses and previous_response_id).

Behind the same keys, admission, usage and ledger as chat. A response is stored only for a team whose
transcript policy keeps transcripts, encrypted with the team's transcript key and kept as long as its
transcripts (audit/stored_responses.py); for a team that keeps nothing, `store: true` and
`previous_response_id` are refused by name rather than answered as if something were kept.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Literal

from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from audit import ledger, stored_responses
from inference.engine.grammar import ANY_OBJECT, GrammarError, json_schema_grammar
from inference.engine.request import EngineBusy, EngineClosed, FieldNotHonoured, PromptTooLong, SamplingParams

from appliance import metrics

from .errors import GenerationFailed, error
from .fields import RESPONSE_FIELDS
from .schemas import StrictBool, StrictFloat, StrictInt, Text, UnsupportedSchema, read_body, validated
from .settlement import InFlight, _ledger_writer, _transcripts, _with_kept_connection, on_gate, record, record_soon
from .views import DEFAULT_MAX_TOKENS, Untokenizable, api_view, encode, loaded_engine, serve, submission_error

log = logging.getLogger(__name__)


class InputPart(BaseModel):
    # input_text in what the caller says; output_text in an assistant turn replayed from an earlier response.
    type: Literal["input_text", "output_text"]
    text: Text


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: list[InputPart]

    # A string is one text part. Taken as a list from here on, so an error inside a list names its place
    # (input.0.content.1.type) rather than the whole field that was not a string either.
    @field_validator("content", mode="before", json_schema_input_type=str | list[InputPart])
    @classmethod
    def text_is_one_part(cls, value):
        return [{"type": "input_text", "text": value}] if isinstance(value, str) else value

    def for_template(self) -> dict:
        return {"role": self.role, "content": "".join(part.text for part in self.content)}


class TextFormat(BaseModel):
    """The Responses API's `text.format`: free text, any JSON object, or JSON that holds a schema."""

    model_config = ConfigDict(populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: Text | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Text | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # `schema` shadows a BaseModel method
    strict: StrictBool | None = None
    _grammar: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def compile_the_schema(self):
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs a name and a schema")
        if self.type == "text":
            return self
        try:
            self._grammar = json_schema_grammar(ANY_OBJECT if self.type == "json_object" else self.schema_)
        except GrammarError as exc:
            raise UnsupportedSchema(str(exc), param="text.format.schema") from None
        return self

    def echo(self) -> dict:
        """Return the format as the response object repeats it."""
        shown = {"type": self.type}
        if self.type == "json_schema":
            shown.update(name=self.name, schema=self.schema_, strict=self.strict,
                         **({"description": self.description} if self.description else {}))
        return shown


class TextConfig(BaseModel):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the variants have no verbosity setting: only the default


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text = Field(min_length=1)
    input: list[InputMessage]
    instructions: Text | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(default=1.0, gt=0.0, le=1.0)
    text: TextConfig | None = None
    stream: StrictBool = False
    # None: stored when the team's policy keeps transcripts (OpenAI stores by default), else not.
    store: StrictBool | None = None
    previous_response_id: Text | None = Field(default=None, min_length=1, max_length=64)

    # A string is one user message (as for content above: errors inside a list name their place).
    @field_validator("input", mode="before", json_schema_input_type=str | list[InputMessage])
    @classmethod
    def text_is_one_user_message(cls, value):
        if value == "" or value == []:
            raise ValueError("input must not be empty")
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    def input_messages(self) -> list[dict]:
        return [item.for_template() for item in self.input]

    @property
    def format(self) -> TextFormat | None:
        return self.text.format if self.text else None

    @property
    def grammar(self) -> str | None:
        return self.format._grammar if self.format else None


def parse_response_request(raw: bytes):
    """Return the validated request, or the 400 that names what is wrong with it."""
    payload, invalid = read_body(raw, RESPONSE_FIELDS)
    return (None, invalid) if invalid is not None else validated(ResponseRequest, payload)


@api_view
async def responses(request: HttpRequest):
    return await serve(request, parse_response_request, run)


async def run(request: HttpRequest, body: ResponseRequest, flight: InFlight):
    engine, missing = await loaded_engine(body.model, flight)
    if missing is not None:
        return missing
    team = flight.caller.team
    keeps = False
    if body.store is not False or body.previous_response_id:
        keeps = await on_gate(stored_responses.team_keeps, team)
    for param, asked in (("store", body.store is True), ("previous_response_id", bool(body.previous_response_id))):
        if asked and not keeps:
            flight.settle("refused")
            return error(f"'{param}' is not supported for team '{team}': its policy keeps no transcripts, so this "
                         f"server keeps no responses for it.", 400, param=param, code="unsupported_parameter")
    history: list[dict] = []
    if body.previous_response_id:
        try:
            previous = await on_gate(stored_responses.load, team, body.previous_response_id)
        except stored_responses.NotStored:
            flight.settle("refused")
            return error(f"Previous response with id '{body.previous_response_id}' not found.", 404,
                         param="previous_response_id", code="previous_response_not_found")
        history = previous["input"] + [{"role": "assistant", "content": previous["output"]}]
    conversation = history + body.input_messages()  # what a continuation of this response starts from
    # Instructions apply to this response only, as on OpenAI: they are not stored with the conversation.
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + conversation
    try:
        prompt_ids = encode(engine, messages)
        room = engine.max_request_tokens() - len(prompt_ids)
        params = SamplingParams(max_tokens=body.max_output_tokens or min(DEFAULT_MAX_TOKENS, max(1, room)),
                                temperature=body.temperature, top_p=body.top_p, grammar=body.grammar)
        handle = engine.submit(prompt_ids, params, cache_scope=team)
        await handle.accepted()
    except Untokenizable as exc:
        flight.settle("refused")
        # The tokenizer's message counts the instructions and a continuation's history: name the whole input.
        cause = exc.__cause__ or exc
        return error(f"Invalid value for 'input': the model's tokenizer or chat template cannot take it "
                     f"({type(cause).__name__}: {str(cause)[:200]})", 400, param="input")
    except (PromptTooLong, EngineBusy, EngineClosed, FieldNotHonoured) as exc:
        return submission_error(exc, flight, body.model, "input")
    answer = ResponseAnswer(body, flight, messages, conversation, store=keeps and body.store is not False)
    if body.stream:
        response = StreamingHttpResponse(answer.events(handle), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
    return await answer.complete(handle)


class ResponseAnswer:
    """One response in flight: the response object and its events, one settlement, one ledger event."""

    def __init__(self, body: ResponseRequest, flight: InFlight, messages: list[dict], conversation: list[dict],
                 store: bool):
        self.body, self.flight, self.messages, self.conversation, self.store = (
            body, flight, messages, conversation, store)
        suffix = flight.request_id.removeprefix("chatcmpl-")  # the ids share the request id the ledger records
        self.id, self.item_id = f"resp_{suffix}", f"msg_{suffix}"
        self.created = int(time.time())
        self.started = time.monotonic()
        self.first_text_at: float | None = None
        self.text: list[str] = []
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self.finish: str | None = None
        self.finished = False
        self.sequence = 0

    def absorb(self, chunk) -> None:
        if chunk.text and self.first_text_at is None:
            self.first_text_at = time.monotonic()
        self.text.append(chunk.text)
        self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        self.cached_tokens = chunk.cached_tokens
        self.finish = chunk.finish_reason or self.finish
        if chunk.finish_reason == "error":
            raise GenerationFailed(chunk)

    def usage(self) -> dict:
        return {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    @property
    def status(self) -> str:
        return "incomplete" if self.finish == "length" else "completed"

    def part(self) -> dict:
        return {"type": "output_text", "text": "".join(self.text), "annotations": [], "logprobs": []}

    def item(self, status: str, content: list[dict]) -> dict:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    def response_object(self, status: str, output: list[dict], error_object: dict | None = None) -> dict:
        body = self.body
        done = status in ("completed", "incomplete")
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": error_object,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": body.model, "instructions": body.instructions, "output": output,
            "max_output_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "previous_response_id": body.previous_response_id, "store": self.store,
            "text": {"format": body.format.echo() if body.format else {"type": "text"}},
            "tools": [], "tool_choice": "none", "parallel_tool_calls": False, "truncation": "disabled",
            "metadata": {}, "usage": self.usage() if done else None,
        }

    def event(self, outcome: str, error_message: str | None = None) -> dict:
        details = {"key": self.flight.caller.key_prefix, "request_id": self.flight.request_id,
                   "endpoint": "responses", "response_id": self.id, "model": self.body.model,
                   "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                   "prompt_digest": ledger.digest(json.dumps(self.messages, sort_keys=True)),
                   "completion_digest": ledger.digest("".join(self.text)), "finish_reason": self.finish,
                   "stored": self.store and outcome == "ok",
                   "previous_response_id": self.body.previous_response_id,
                   "duration_ms": int((time.monotonic() - self.started) * 1000)}
        if error_message:
            details["error"] = error_message[:500]
        return dict(action="chat.completion", actor=f"team:{self.flight.caller.team}", target=self.body.model,
                    outcome=outcome, details=self.flight.noted(details))

    def settle(self, outcome: str) -> None:
        self.finished = True
        ttft = None if self.first_text_at is None else int((self.first_text_at - self.started) * 1000)
        self.flight.settle(outcome, self.prompt_tokens, self.completion_tokens, ttft)

    async def keep(self) -> None:
        """Keep the transcript (as chat does) and, when stored, the response: written before the client hears
        of it, so a `previous_response_id` sent right after finds it."""
        text = "".join(self.text)
        _transcripts.submit((self.flight.caller.team, self.body.model, self.messages, text))
        if self.store:
            await asyncio.wrap_future(_ledger_writer.submit(
                _with_kept_connection, stored_responses.store, self.flight.caller.team, self.id, self.body.model,
                {"input": self.conversation, "output": text}))

    async def complete(self, handle):
        try:
            async for chunk in handle:
                self.absorb(chunk)
        except GenerationFailed as exc:
            self.settle("failed")
            await record(**self.event("failed", str(exc)))
            return exc.response()
        try:
            await self.keep()
        except Exception as exc:  # asked to store and could not: the caller must not believe it was kept
            log.exception("storing response %s failed", self.id)
            self.settle("failed")
            await record(**self.event("failed", f"storing the response failed: {type(exc).__name__}"))
            return error("The server could not store the response.", 500)
        self.settle("ok")
        await record(**self.event("ok"))
        output = [self.item(self.status, [self.part()])]
        return JsonResponse(self.response_object(self.status, output))

    def sse(self, kind: str, **fields) -> str:
        """Return one typed event, numbered in the order it is sent."""
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    async def events(self, handle):
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        try:
            yield self.sse("response.created", response=self.response_object("in_progress", []))
            yield self.sse("response.in_progress", response=self.response_object("in_progress", []))
            yield self.sse("response.output_item.added", output_index=0, item=self.item("in_progress", []))
            yield self.sse("response.content_part.added", **where,
                           part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            try:
                async for chunk in handle:
                    self.absorb(chunk)
                    if chunk.text:
                        yield self.sse("response.output_text.delta", **where, delta=chunk.text, logprobs=[])
            except GenerationFailed as exc:
                self.settle("failed")
                record_soon(**self.event("failed", str(exc)))
                metrics.count_server_error(exc.status)
                failure = {"code": exc.code, "message": f"Generation failed: {exc}"}
                yield self.sse("response.failed", response=self.response_object("failed", [], failure))
                return
            part = self.part()
            yield self.sse("response.output_text.done", **where, text=part["text"], logprobs=[])
            yield self.sse("response.content_part.done", **where, part=part)
            item = self.item(self.status, [part])
            yield self.sse("response.output_item.done", output_index=0, item=item)
            # Kept and settled before the last event: a client that stops reading there has had everything. A
            # failure to keep ends the stream in response.failed (below), never in a completed one.
            await self.keep()
            self.settle("ok")
            record_soon(**self.event("ok"))
            yield self.sse(f"response.{self.status}", response=self.response_object(self.status, [item]))
        except (asyncio.CancelledError, GeneratorExit):
            if not self.finished:
                self.settle("cancelled")
                record_soon(**self.event("cancelled"))
            raise
        except Exception as exc:  # headers went out with 200: the stream ends with a failed response instead
            log.exception("response stream %s failed", self.id)
            if not self.finished:
                self.settle("failed")
                record_soon(**self.event("failed", f"{type(exc).__name__}: {exc}"))
                metrics.count_server_error(500)
                failure = {"code": "server_error", "message": "The server had an error while processing your request."}
                yield self.sse("response.failed", response=self.response_object("failed", [], failure))
