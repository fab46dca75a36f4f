"""/v1/completions: OpenAI's legacy text completion (a prompt string or a list of them, echo, logprobs).

Behind the same keys, admission, usage and ledger as chat: one request is one admission and one ledger event
(its digests cover every prompt and every answer), however many prompts it carries. Each prompt has `n`
choices (choices.py: its prompt computed once), generated in the engine's shared steps; choice i of prompt p
is choice p * n + i. A stream carries one prompt (and its n choices).
"""
from __future__ import annotations

import asyncio
import json
import time

from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from audit import ledger
from inference.engine.request import EngineBusy, EngineClosed, FieldNotHonoured, PromptTooLong, SamplingParams

from appliance import metrics
from inference.engine.prompt import encode_text

from .choices import MAX_CHOICES, merged, submit_prompts_choices
from .errors import GenerationFailed, error, error_payload
from .fields import ACCEPTED, HONOURED, REFUSED, FieldRule
from .schemas import (ChatCompletionRequest, StreamOptions, StrictBool, StrictFloat, StrictInt, Text, read_body,
                      validated)
from .settlement import InFlight, record, record_soon
from .views import api_view, loaded_engine, serve, sse, submission_error

MAX_PROMPTS = 16
MAX_LEGACY_LOGPROBS = 5  # OpenAI's limit for /v1/completions

COMPLETION_FIELDS: dict[str, FieldRule] = {
    "model": FieldRule(HONOURED, "a deployed variant the key's team may use"),
    "prompt": FieldRule(HONOURED, f"a string or a list of up to {MAX_PROMPTS} strings (one choice each); "
                                  "token-id arrays are refused"),
    "max_tokens": FieldRule(HONOURED, "cap on generated tokens (default 16)"),
    "temperature": FieldRule(HONOURED, "0 to 2; 0 is greedy"),
    "top_p": FieldRule(HONOURED, "nucleus sampling"),
    "stop": FieldRule(HONOURED, "up to 4 stop strings"),
    "seed": FieldRule(HONOURED, "as for chat"),
    "presence_penalty": FieldRule(HONOURED, "OpenAI's definition"),
    "frequency_penalty": FieldRule(HONOURED, "OpenAI's definition"),
    "stream": FieldRule(HONOURED, "one prompt per streamed request"),
    "stream_options": FieldRule(HONOURED, "include_usage"),
    "echo": FieldRule(HONOURED, "the prompt before the answer (not with logprobs)"),
    "logprobs": FieldRule(HONOURED, f"0 to {MAX_LEGACY_LOGPROBS} alternatives per generated token"),
    "n": FieldRule(HONOURED, f"1 to {MAX_CHOICES} choices per prompt, as for chat"),
    "best_of": FieldRule(REFUSED, "no best-of search", harmless=lambda v: v == 1),
    "suffix": FieldRule(REFUSED, "no fill-in-the-middle"),
    "logit_bias": FieldRule(REFUSED, "a non-empty bias is refused"),
    "user": FieldRule(ACCEPTED, "meaningless: usage is counted per team key"),
    "top_k": FieldRule(HONOURED, "extension: keep the k most likely tokens"),
}


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text = Field(min_length=1)
    prompt: Text | list[Text]
    max_tokens: StrictInt = Field(default=16, ge=1)
    temperature: StrictFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: StrictFloat = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat = Field(default=0.0, ge=-2.0, le=2.0)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LEGACY_LOGPROBS)
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES, description=(
        "Choices per prompt; each prompt is computed once. With a seed, choice i samples with seed + i."))
    top_k: StrictInt | None = Field(default=None, ge=-1)

    @field_validator("prompt")
    @classmethod
    def prompts_are_few_and_not_empty(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(f"send 1 to {MAX_PROMPTS} prompts")
        if any(p == "" for p in prompts):
            raise ValueError("a prompt must not be empty")
        return value

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, value):
        return ChatCompletionRequest.at_most_four_stops(value)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(0, self.top_k or 0), stop=tuple(self.stop or ()), seed=self.seed,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logprobs=self.logprobs)


def parse_completion_request(raw: bytes):
    """Return the validated request, or the 400 that names what is wrong with it."""
    payload, invalid = read_body(raw, COMPLETION_FIELDS)
    if invalid is not None:
        return None, invalid
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(p, str) for p in prompt):
        return None, error("'prompt' as token ids is not supported by this server; send text.", 400,
                           param="prompt", code="unsupported_parameter")
    body, invalid = validated(CompletionRequest, payload)
    if invalid is not None:
        return None, invalid
    if body.echo and body.logprobs is not None:
        return None, error("'echo' with 'logprobs' is not supported by this server (no prompt logprobs).", 400,
                           param="echo", code="unsupported_parameter")
    if len(body.prompts) * body.n > MAX_PROMPTS:
        return None, error(f"Invalid value for 'n': {len(body.prompts)} prompts of {body.n} choices each are more "
                           f"than {MAX_PROMPTS} choices in one request.", 400, param="n")
    if body.stream and len(body.prompts) > 1:
        return None, error("This server streams one prompt per request; send the prompts as separate requests.",
                           400, param="prompt", code="unsupported_value")
    return body, None


@api_view
async def completions(request: HttpRequest):
    return await serve(request, parse_completion_request, run)


async def run(request: HttpRequest, body: CompletionRequest, flight: InFlight):
    engine, missing = await loaded_engine(body.model, flight)
    if missing is not None:
        return missing
    try:
        # Choice i of prompt p is handle p * n + i, as OpenAI orders the choices.
        handles = await submit_prompts_choices(engine, [encode_text(engine.tokenizer, p) for p in body.prompts],
                                               body.sampling(), body.n, flight.caller.team)
    except (PromptTooLong, EngineBusy, EngineClosed, FieldNotHonoured) as exc:
        return submission_error(exc, flight, body.model, "prompt")
    answer = TextAnswer(body, flight)
    if body.stream:
        response = StreamingHttpResponse(answer.sse(handles), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        return response
    return await answer.complete(handles)


class TextAnswer:
    """The choices of one completion request, and its one settlement and ledger event."""

    def __init__(self, body: CompletionRequest, flight: InFlight):
        self.body, self.flight = body, flight
        self.id = f"cmpl-{flight.request_id}"
        self.created = int(time.time())
        self.started = time.monotonic()
        choices = len(body.prompts) * body.n
        self.texts = [""] * choices
        self.logprobs: list[list[dict]] = [[] for _ in range(choices)]
        self.prompt_tokens = [0] * choices
        self.completion_tokens = [0] * choices
        self.finished = False

    def prompt_of(self, i: int) -> str:
        return self.body.prompts[i // self.body.n]

    def absorb(self, i: int, chunk) -> None:
        self.texts[i] += chunk.text
        self.logprobs[i] += chunk.logprobs or []
        self.prompt_tokens[i], self.completion_tokens[i] = chunk.prompt_tokens, chunk.completion_tokens

    def usage(self) -> dict:
        # Each prompt counts once, however many choices it has.
        prompt, completion = sum(self.prompt_tokens[::self.body.n]), sum(self.completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def event(self, outcome: str, finish: list, error_message: str | None = None) -> dict:
        details = {"key": self.flight.caller.key_prefix, "request_id": self.flight.request_id,
                   "endpoint": "completions", "model": self.body.model, **self.usage(),
                   "prompt_digest": ledger.digest(json.dumps(self.body.prompts)),
                   "completion_digest": ledger.digest(json.dumps(self.texts)),
                   "finish_reason": finish, "duration_ms": int((time.monotonic() - self.started) * 1000)}
        if error_message:
            details["error"] = error_message[:500]
        return dict(action="chat.completion", actor=f"team:{self.flight.caller.team}", target=self.body.model,
                    outcome=outcome, details=self.flight.noted(details))

    def settle(self, outcome: str) -> None:
        self.finished = True
        usage = self.usage()
        self.flight.settle(outcome, usage["prompt_tokens"], usage["completion_tokens"], None)

    def legacy_logprobs(self, entries: list[dict], offset: int) -> dict | None:
        """Return /v1/completions' logprobs object (tokens, token_logprobs, top_logprobs, text_offset)."""
        if self.body.logprobs is None:
            return None
        offsets, at = [], offset
        for entry in entries:
            offsets.append(at)
            at += len(entry["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}

    def choice(self, i: int, text: str, finish, entries: list[dict], offset: int) -> dict:
        return {"index": i, "text": text, "finish_reason": finish, "logprobs": self.legacy_logprobs(entries, offset)}

    async def complete(self, handles):
        finish: list = [None] * len(handles)

        async def drain(i, handle):
            async for chunk in handle:
                self.absorb(i, chunk)
                finish[i] = chunk.finish_reason or finish[i]
                if chunk.finish_reason == "error":
                    raise GenerationFailed(chunk)

        try:
            await asyncio.gather(*(drain(i, h) for i, h in enumerate(handles)))
        except GenerationFailed as exc:
            for handle in handles:
                handle.cancel()
            self.settle("failed")
            await record(**self.event("failed", finish, str(exc)))
            return exc.response()
        self.settle("ok")
        await record(**self.event("ok", finish))
        choices = []
        for i in range(len(handles)):
            echo = self.prompt_of(i) if self.body.echo else ""
            choices.append(self.choice(i, echo + self.texts[i], finish[i], self.logprobs[i], len(echo)))
        return JsonResponse({"id": self.id, "object": "text_completion", "created": self.created,
                             "model": self.body.model, "choices": choices, "usage": self.usage()})

    def chunk_object(self, text: str, finish, entries: list[dict], offset: int, index: int = 0) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.body.model,
                "choices": [self.choice(index, text, finish, entries, offset)]}

    async def sse(self, handles):
        """Stream one prompt's choices, each chunk under its choice's index; one settlement and event at the end."""
        finish: list = [None] * len(handles)
        streams = [self.choice_events(i, handle, finish) for i, handle in enumerate(handles)]
        events = streams[0] if len(streams) == 1 else merged(streams)
        try:
            async for event in events:
                yield event
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield sse({**self.chunk_object("", None, [], 0), "choices": [], "usage": self.usage()})
            self.settle("ok")
            record_soon(**self.event("ok", finish))
            yield "data: [DONE]\n\n"
        except GenerationFailed as exc:
            for handle, reason in zip(handles, finish):
                if reason is None:
                    handle.cancel()
            self.settle("failed")
            record_soon(**self.event("failed", finish, str(exc)))
            metrics.count_server_error(exc.status)
            yield sse(exc.payload())
        except (asyncio.CancelledError, GeneratorExit):
            for handle, reason in zip(handles, finish):
                if reason is None:
                    handle.cancel()
            if not self.finished:
                self.settle("cancelled")
                record_soon(**self.event("cancelled", ["cancelled"] * len(handles)))
            raise
        except Exception as exc:  # headers went out with 200: the stream ends with an error event instead
            if not self.finished:
                self.settle("failed")
                record_soon(**self.event("failed", ["error"] * len(handles), f"{type(exc).__name__}: {exc}"))
                metrics.count_server_error(500)
                yield sse(error_payload("The server had an error while processing your request."))
        finally:
            await events.aclose()  # stops the choices' readers that an early exit left waiting

    async def choice_events(self, i: int, handle, finish: list):
        """Yield choice i's events (the echoed prompt first, when asked); raise GenerationFailed on an engine error."""
        sent = 0
        if self.body.echo:
            yield sse(self.chunk_object(self.prompt_of(i), None, [], 0, i))
        async for chunk in handle:
            self.absorb(i, chunk)
            if chunk.finish_reason == "error":
                finish[i] = "error"
                raise GenerationFailed(chunk)
            finish[i] = chunk.finish_reason or finish[i]
            if chunk.text or chunk.logprobs or chunk.finish_reason:
                yield sse(self.chunk_object(chunk.text, chunk.finish_reason, chunk.logprobs or [], sent, i))
                sent += len(chunk.text)
