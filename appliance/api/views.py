"""The OpenAI-compatible team chat API: /v1/models and /v1/chat/completions (n choices per request).

Views validate and answer errors; the engine generates; the ledger records
digests of what went in and out, never the text itself.
"""
import asyncio
import functools
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import jinja2
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from appliance import engine_client, placement, routing
from audit import ledger
from inference.engine.prompt import ControlTokenSpelling, chat_template_source
from inference.engine.request import EngineBusy, EngineClosed, FieldNotHonoured, PromptTooLong, SamplingParams

from appliance import metrics
from .choices import merged, submit_choices
from .errors import GenerationFailed, error, error_payload
from .gatekeeper import Admission, Caller, gatekeeper
from .schemas import parse_chat_request
from .settlement import InFlight, _transcripts, admit_on_gate, new_request_id, on_gate, record, record_soon
from .reasoning import CLOSE, OPEN, ReasoningStream, split_reasoning, template_reasons
from .toolcalls import ToolCall, call_start, forced_calls, parse_calls, tool_format

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 256
RETRY_AFTER_S = 1  # a full queue drains within about a second of decode steps on the demo models
# A key that authenticated recently may send a body before the gatekeeper is asked again (admission still checks
# it, so a revoked key is refused from its next request on; this only decides whether its body is read at all).
KNOWN_KEY_TTL_S = 60
_KNOWN_KEYS_MAX = 4096
_known_keys: dict[bytes, float] = {}
# The scope flag the ASGI handler sets on a request whose body it did not read, because its key is unknown.
KEY_REFUSED = "appliance.key_refused"


def key_refused(request: HttpRequest) -> bool:
    """Return whether the ASGI handler refused the request's key and left its body unread."""
    return bool(getattr(request, "scope", {}).get(KEY_REFUSED))


def bearer_token(header: str) -> str:
    """Return the token of an `Authorization: Bearer <token>` header, or ""."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def key_may_send_body(token: str) -> bool:
    """Return whether token is a valid key (recently seen, or asked of the gatekeeper), so its body may be read."""
    if not token:
        return False
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
    now = time.monotonic()
    if _known_keys.get(digest, 0) > now:
        return True
    if await on_gate(gatekeeper().authenticate, token) is None:
        return False
    if len(_known_keys) >= _KNOWN_KEYS_MAX:
        _known_keys.clear()
    _known_keys[digest] = now + KNOWN_KEY_TTL_S
    return True


async def authenticate(request: HttpRequest, admit_to: str | None = None,
                       request_id: str = "") -> tuple[Caller | None, Admission | None]:
    """Return who is calling and, with `admit_to`, whether they may use that model (counting the request).

    Both happen in one trip to the gatekeeper thread, shared with every request that arrived meanwhile: a burst
    of 16 requests with one key costs about one check, not 16 checks in a row before the last one may start.
    """
    token = bearer_token(request.headers.get("Authorization", ""))
    caller = admission = None
    if token and not key_refused(request):
        if admit_to is None:
            caller = await on_gate(gatekeeper().authenticate, token)
        else:
            caller, admission = await admit_on_gate(token, admit_to, request_id)
    if caller is None:
        await record(action="auth.failed", actor="anonymous", target=request.path, outcome="denied",
                     details={"reason": "missing key" if not token else "unknown or revoked key", "key": token[:13]})
    return caller, admission


def api_view(view):
    """Make an async view CSRF-exempt and turn any unexpected exception into an OpenAI-shaped 500."""

    @csrf_exempt
    @functools.wraps(view)
    async def wrapper(request, *args, **kwargs):
        try:
            response = await view(request, *args, **kwargs)
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            flight: InFlight | None = getattr(request, "in_flight", None)
            if flight is None:  # nobody to charge it to: the ledger event is what the dashboard and /metrics count
                return server_error(request.path, type(exc).__name__)
            flight.settle("failed")  # admitted: its usage row counts the error
            response = error(SERVER_ERROR, 500)
        if response.status_code >= 500:
            metrics.count_server_error(response.status_code)
        return response

    return wrapper


SERVER_ERROR = "The server had an error while processing your request."


def server_error(path: str, cause: str) -> JsonResponse:
    """Return the 500 of a request that no admission counts, recorded as an api.error event and in /metrics."""
    record_soon(action="api.error", actor="anonymous", target=path, outcome="error",
                details={"status": 500, "in_usage": False, "error": cause})
    metrics.count_server_error(500)
    return error(SERVER_ERROR, 500)


def unauthorized():
    return error("Invalid or missing API key. Send 'Authorization: Bearer <team key>'.", 401,
                 code="invalid_api_key")


@api_view
async def list_models(request: HttpRequest):
    if request.method != "GET":
        return error(f"Method {request.method} not allowed; use GET", 405)
    caller, _ = await authenticate(request)
    if caller is None:
        return unauthorized()
    cards = await on_gate(gatekeeper().models, caller)
    # What the caller can use now: a variant it may use (ready or deployed, never quarantined) that this process
    # has loaded or another up node serves. Administrators see every variant, loaded or not, on the console's
    # Model variants page.
    loaded = set(engine_client.names()) | await on_gate(routing.served_elsewhere)
    return JsonResponse({"object": "list", "data": [card_object(c) for c in cards if c.name in loaded]})


def card_object(card) -> dict:
    return {"id": card.name, "object": "model", "created": card.created, "owned_by": card.owned_by,
            "kind": card.kind, "loaded": True, "random_weights": card.random_weights}


@api_view
async def model_card(request: HttpRequest, name: str):
    """One variant the key may use and this node or another up node serves; any other name is OpenAI's 404."""
    if request.method != "GET":
        return error(f"Method {request.method} not allowed; use GET", 405)
    caller, _ = await authenticate(request)
    if caller is None:
        return unauthorized()
    if name in engine_client.names() or name in await on_gate(routing.served_elsewhere):
        card = next((c for c in await on_gate(gatekeeper().models, caller) if c.name == name), None)
        if card is not None:
            return JsonResponse(card_object(card))
    return error(f"The model '{name[:200]}' does not exist.", 404, param="model", code="model_not_found")


# Bodies up to this size are parsed on the event loop (a few hundred microseconds at most, less than the hop to a
# thread); larger ones on a thread of their own, so a megabyte of JSON never holds up other clients.
INLINE_PARSE_BYTES = 16 * 1024
_parser = ThreadPoolExecutor(max_workers=2, thread_name_prefix="body-parser")


async def parse_body(raw: bytes, parse=parse_chat_request):
    """Return parse(raw), computed off the event loop when the body is large."""
    if len(raw) <= INLINE_PARSE_BYTES:
        return parse(raw)
    return await asyncio.wrap_future(_parser.submit(parse, raw))


@api_view
async def chat_completions(request: HttpRequest):
    return await serve(request, parse_chat_request, answer)


async def serve(request: HttpRequest, parse, run):
    """Read, check and admit a generation request (chat or text), then `run(request, body, flight)` it."""
    if request.method != "POST":
        return error(f"Method {request.method} not allowed; use POST", 405)
    if key_refused(request):  # the handler left the body unread: no valid key
        await authenticate(request)
        return unauthorized()
    body, invalid = await parse_body(request.body, parse)
    if invalid is not None:  # a caller without a valid key learns only that
        caller, _ = await authenticate(request)
        return invalid if caller is not None else unauthorized()
    # Access and limits are checked (and the request counted) before the engine is looked up, so a caller
    # without access learns nothing about what is loaded.
    request_id = new_request_id()
    caller, admission = await authenticate(request, admit_to=body.model, request_id=request_id)
    if caller is None:
        return unauthorized()
    limits = admission.headers
    if not admission.allowed:
        await record(action="chat.refused", actor=f"team:{caller.team}", target=body.model, outcome="denied",
                     details={"key": caller.key_prefix, "status": admission.status, "code": admission.code,
                              "reason": admission.message})
        headers = {"Retry-After": str(admission.retry_after_s)} if admission.retry_after_s else {}
        return error(admission.message, admission.status, code=admission.code, headers={**limits, **headers})
    flight = request.in_flight = InFlight(caller, admission, body.model, request_id)
    response = await run(request, body, flight)
    for name, value in limits.items():
        response[name] = value
    return response


async def answer(request: HttpRequest, body, flight: InFlight):
    """Run an admitted request on its engine: the answer, its stream, or the error that stopped it."""
    engine, missing = await loaded_engine(body.model, flight)
    if missing is not None:
        return missing

    messages = [m.for_template() for m in body.messages]
    template = chat_template_source(engine.tokenizer)
    fmt = tool_format(template)
    if body.forced_tools and fmt is None:
        flight.settle("refused")
        return error(f"The model '{body.model}' has no tool support in its chat template, so it cannot be made "
                     f"to call a tool (tool_choice '{body.tool_mode}'); tool_choice 'auto' answers in text.", 400,
                     param="tool_choice", code="unsupported_value")
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tool_mode != "none" else None
    prompt_ids: list[int] = []
    try:
        prompt_ids = encode(engine, messages, tools)
        room = engine.max_request_tokens() - len(prompt_ids)
        params = SamplingParams(
            max_tokens=body.token_limit or max(min(DEFAULT_MAX_TOKENS, max(1, room)), body.min_tokens),
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k_cut, stop=body.stop_sequences,
            seed=body.seed, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            grammar=body.grammar, logprobs=body.logprob_alternatives, logit_bias=body.token_bias,
            min_tokens=body.min_tokens, ignore_eos=body.ignore_eos, stop_token_ids=tuple(body.stop_token_ids or ()))
        outside = token_ids_outside(engine, params)
        if outside is not None:
            flight.settle("refused")
            return error(outside[0], 400, param=outside[1])
        # The team is the prefix cache's scope: a team reuses its own prompts' KV, never another team's (and
        # a request's later choices reuse what its first one computed).
        handles = await submit_choices(engine, prompt_ids, params, body.n, flight.caller.team)
    except (Untokenizable, FieldNotHonoured) as exc:
        flight.settle("refused")
        return error(str(exc), 400, param=exc.param)
    except PromptTooLong as exc:
        flight.settle("refused")
        # Name the prompt when it alone is too long, else the token limit that pushed it over.
        param = "messages" if len(prompt_ids) >= engine.max_request_tokens() or not body.token_limit else (
            "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        return error(str(exc), 400, param=param, code="context_length_exceeded")
    except EngineBusy as exc:
        flight.settle("refused")
        return error(str(exc), 429, code="engine_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
    except EngineClosed as exc:
        flight.settle("failed")
        return unavailable(body.model, exc)

    exchange = Exchange(caller=flight.caller, model=body.model, messages=messages, flight=flight,
                        tools=ToolUse(body, fmt) if body.tool_mode != "none" else None,
                        reasoning=opens_reasoning(engine, template, prompt_ids),
                        count_tokens=lambda text: len(engine.tokenizer(text, add_special_tokens=False)["input_ids"]),
                        n=body.n)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        response = StreamingHttpResponse(exchange.sse(handles, include_usage), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
    return await exchange.complete(handles)


def opens_reasoning(engine, template: str, prompt_ids: list[int]) -> bool | None:
    """Return None for a variant without a reasoning section, else whether its prompt already opened one."""
    if not template_reasons(template):
        return None
    return engine.tokenizer.decode(prompt_ids[-8:]).rstrip().endswith(OPEN)


class Untokenizable(ValueError):
    """A message the model's tokenizer cannot take; `param` names it (messages.N.content)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# What tokenizers and chat templates raise on input they refuse: the Rust tokenizer's TypeError for text that is
# not valid Unicode, a template's own raise_exception ("roles must alternate") as a jinja2 TemplateError.
TOKENIZER_ERRORS = (TypeError, ValueError, UnicodeError, OverflowError, jinja2.TemplateError)


def encode(engine, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Return the chat's prompt ids, or raise Untokenizable naming the first message the tokenizer refuses."""
    try:
        return engine.encode_chat(messages, tools)
    except ControlTokenSpelling as exc:
        raise Untokenizable(str(exc), exc.param) from exc
    except TOKENIZER_ERRORS as whole:
        for i, message in enumerate(messages):  # which one? each alone, in the same template
            try:
                engine.encode_chat([message])
            except TOKENIZER_ERRORS as exc:
                raise Untokenizable(f"Invalid value for 'messages.{i}.content': the model's tokenizer cannot "
                                    f"take this text ({type(exc).__name__}: {str(exc)[:200]})",
                                    f"messages.{i}.content") from exc
        raise Untokenizable(f"The model's chat template cannot take these messages ({type(whole).__name__}: "
                            f"{str(whole)[:200]})", "messages") from whole


def token_ids_outside(engine, params: SamplingParams) -> tuple[str, str] | None:
    """Return (message, param) for a logit_bias or stop_token_ids id outside the model's vocabulary, or None."""
    for param, ids in (("logit_bias", params.logit_bias or ()), ("stop_token_ids", params.stop_token_ids)):
        outside = next((t for t in ids if t >= engine.vocab_size), None)
        if outside is not None:
            return (f"Invalid value for '{param}': token id {outside} is outside this model's vocabulary "
                    f"(0 to {engine.vocab_size - 1})", param)
    return None


async def loaded_engine(model: str, flight: InFlight):
    """Return (engine, None) for a loaded variant, else (None, the 503 or 404 that says why), settled."""
    engine = engine_client.get(model)
    if engine is None:
        engine = await routing.engine_for(model, on_gate)
        flight.served_by = engine.node if engine is not None else ""
    if engine is not None:
        return engine, None
    if await on_gate(gatekeeper().exists, flight.caller, model):
        flight.settle("failed")  # a 503: the box could not serve what the caller may use
        elsewhere = await on_gate(placement.placed_elsewhere, model)
        if elsewhere is not None:
            return None, error(f"Model '{model}' is placed on node {elsewhere.name} ({elsewhere.address}), which "
                               f"cannot serve it now (its state: {elsewhere.state()}; it may still be loading it, "
                               "or not answer this node).", 503, code="model_not_loaded")
        return None, error(f"Model '{model}' is not loaded; deploy it first.", 503, code="model_not_loaded")
    flight.settle("refused")
    return None, error(f"The model '{model}' does not exist.", 404, param="model", code="model_not_found")


def submission_error(exc: Exception, flight: InFlight, model: str, param: str):
    """Return the answer to an engine's refusal at submit (busy, closed, too long, a field it cannot honour), settled."""
    if isinstance(exc, FieldNotHonoured):
        flight.settle("refused")
        return error(str(exc), 400, param=exc.param)
    if isinstance(exc, PromptTooLong):
        flight.settle("refused")
        return error(str(exc), 400, param=param, code="context_length_exceeded")
    if isinstance(exc, EngineBusy):
        flight.settle("refused")
        return error(str(exc), 429, code="engine_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
    flight.settle("failed")
    return unavailable(model, exc)


def unavailable(model: str, exc: Exception):
    """Return the 503 of a request its engine could not take: being unloaded, its process gone, its node gone."""
    return error(f"Model '{model}' cannot take requests now: {exc}.", 503, code="model_not_loaded")


class ToolUse:
    """How one request's tools shape its answer: forced calls (named, required) or calls parsed out (auto)."""

    def __init__(self, body, fmt: str | None):
        self.body, self.mode, self.format = body, body.tool_mode, fmt
        self.names = {tool.function.name for tool in body.tools}

    def split(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Return (content, calls) of a whole answer."""
        if self.mode in ("named", "required"):
            calls = forced_calls(text, self.body)
            return (None if calls else text), calls
        content, calls = parse_calls(text, self.format, self.names)
        calls = calls if self.body.parallel_tool_calls else calls[:1]
        return (content or None if calls else content), calls

    def hold_from(self, text: str) -> int | None:
        """Return where a streamed auto answer may start a call (held back from there), or None."""
        start = call_start(self.format)
        if start is None:
            return None
        if start == "{":  # Llama 3: the whole answer is the call, so only an answer that opens with one
            stripped = text.lstrip()
            return len(text) - len(stripped) if stripped[:1] in ("{", "<") or not stripped else None
        at = text.find(start)
        if at >= 0:
            return at
        for keep in range(min(len(start) - 1, len(text)), 0, -1):  # a marker may be split across chunks
            if start.startswith(text[-keep:]):
                return len(text) - keep
        return None


@dataclass
class Choice:
    """What one of a request's choices has generated so far."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[dict] | None = None  # OpenAI's logprobs.content entries, when asked for
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, tokens this choice took from the prefix cache
    finish_reason: str | None = None
    calls_made: bool = False

    @property
    def answer(self) -> str:
        return "".join(self.text)


class Exchange:
    """One chat request in flight: turns engine chunks into OpenAI objects and records the outcome.

    A request with n > 1 has n choices; usage counts the prompt once and every choice's completion tokens, and
    the request is settled and recorded once, with a digest of every choice.
    """

    def __init__(self, *, caller: Caller, model: str, messages: list[dict], flight: InFlight | None = None,
                 tools: ToolUse | None = None, reasoning: bool | None = None, count_tokens=None, n: int = 1):
        self.tools = tools
        # None: no reasoning section; else whether the answer starts inside one (reasoning.py).
        self.reasoning = reasoning
        self.count_tokens = count_tokens
        self.caller = caller
        self.model = model
        self.messages = messages
        self.prompt_text = json.dumps(messages, sort_keys=True)
        self.flight = flight
        self.first_text_at: float | None = None
        self.id = flight.request_id if flight is not None else new_request_id()
        self.created = int(time.time())
        self.started = time.monotonic()
        self.choices = [Choice(i) for i in range(n)]
        self.prompt_tokens = 0
        self._frames: dict[int, tuple[str, str]] = {}

    @property
    def completion_tokens(self) -> int:
        return sum(choice.completion_tokens for choice in self.choices)

    @property
    def cached_tokens(self) -> int:
        # The prompt is counted once, as the first choice computed it; the others reuse what it left.
        return self.choices[0].cached_tokens

    def usage(self) -> dict:
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                 "total_tokens": self.prompt_tokens + self.completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}
        if self.reasoning is not None:
            usage["completion_tokens_details"] = {
                "reasoning_tokens": sum(choice.reasoning_tokens for choice in self.choices)}
        return usage

    def count_reasoning(self, choice: Choice, reasoning: str | None) -> None:
        """Count the reasoning's tokens: all of an answer cut inside it, else its text re-tokenized."""
        if reasoning is None:
            choice.reasoning_tokens = 0
        elif CLOSE not in choice.answer:
            choice.reasoning_tokens = choice.completion_tokens
        else:
            choice.reasoning_tokens = min(choice.completion_tokens, self.count_tokens(reasoning) + 1)  # + </think>

    def event(self, outcome: str, finish_reason: str | None, error_message: str | None = None) -> dict:
        details = {
            "model": self.model, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "prompt_digest": ledger.digest(self.prompt_text),
            "completion_digest": ledger.digest(self.choices[0].answer),
            "finish_reason": finish_reason, "duration_ms": int((time.monotonic() - self.started) * 1000),
        }
        if len(self.choices) > 1:  # every choice's digest, finish reason and reuse of the first one's prompt
            details.update(
                completion_digest=ledger.digest(json.dumps([choice.answer for choice in self.choices])),
                choice_digests=[ledger.digest(choice.answer) for choice in self.choices],
                finish_reasons=[choice.finish_reason for choice in self.choices],
                choice_cached_tokens=[choice.cached_tokens for choice in self.choices])
        if error_message:
            details["error"] = error_message[:500]
        details = {"key": self.caller.key_prefix, "request_id": self.id, **details}
        return dict(action="chat.completion", actor=f"team:{self.caller.team}", target=self.model,
                    outcome=outcome, details=details if self.flight is None else self.flight.noted(details))

    def settle(self, outcome: str) -> None:
        """Report what this request used to the registry (quotas, usage), without waiting for it."""
        if self.flight is not None:
            ttft = None if self.first_text_at is None else int((self.first_text_at - self.started) * 1000)
            self.flight.settle(outcome, self.prompt_tokens, self.completion_tokens, ttft)

    def keep_transcript(self) -> None:
        """Store each choice's exchange encrypted when the team's policy keeps transcripts (a no-op otherwise)."""
        for choice in self.choices:
            _transcripts.submit((self.caller.team, self.model, self.messages, choice.answer))

    def absorb(self, choice: Choice, chunk) -> None:
        if chunk.text and self.first_text_at is None:
            self.first_text_at = time.monotonic()
        choice.text.append(chunk.text)
        if chunk.logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + [logprob_entry(e) for e in chunk.logprobs]
        self.prompt_tokens, choice.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        choice.cached_tokens = chunk.cached_tokens
        choice.finish_reason = chunk.finish_reason or choice.finish_reason

    def request_finish(self) -> str | None:
        """Return the ledger's finish_reason: the first choice's (every choice's is in finish_reasons)."""
        return self.choices[0].finish_reason

    def cancel_unfinished(self, handles) -> None:
        for choice, handle in zip(self.choices, handles):
            if choice.finish_reason is None:
                handle.cancel()

    async def complete(self, handles):
        async def drain(choice: Choice, handle) -> None:
            async for chunk in handle:
                self.absorb(choice, chunk)
                if chunk.finish_reason == "error":
                    raise GenerationFailed(chunk)

        try:
            await asyncio.gather(*(drain(choice, handle) for choice, handle in zip(self.choices, handles)))
        except GenerationFailed as exc:
            self.cancel_unfinished(handles)
            self.settle("failed")
            await record(**self.event("failed", "error", str(exc)))
            return exc.response()
        self.settle("ok")
        self.keep_transcript()
        choices = [self.whole_choice(choice) for choice in self.choices]
        await record(**self.event("ok", self.request_finish()))
        return JsonResponse({"id": self.id, "object": "chat.completion", "created": self.created,
                             "model": self.model, "choices": choices, "usage": self.usage()})

    def whole_choice(self, choice: Choice) -> dict:
        """Return one choice of a whole (not streamed) answer: its message, finish reason and logprobs."""
        finish = choice.finish_reason
        message = {"role": "assistant", "content": choice.answer}
        if self.reasoning is not None:
            reasoning, message["content"] = split_reasoning(message["content"], self.reasoning)
            message["reasoning_content"] = reasoning
            self.count_reasoning(choice, reasoning)
        if self.tools is not None:
            content, calls = self.tools.split(message["content"])
            if calls:
                message = {**message, "content": content, "tool_calls": [call.as_openai() for call in calls]}
                finish = "tool_calls" if finish == "stop" else finish
        choice.finish_reason = finish
        return {"index": choice.index, "message": message, "finish_reason": finish,
                "logprobs": None if choice.logprobs is None else {"content": choice.logprobs, "refusal": None}}

    def chunk_object(self, delta: dict, finish_reason: str | None, index: int = 0) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    def content_event(self, text: str, index: int = 0) -> bytes:
        """Return the SSE event that carries `text`, as sse(chunk_object(...)) would, ready to send."""
        frame = self._frames.get(index)
        if frame is None:
            # A stream's content events differ only in their text: frame them once, encode only the text per event.
            marker = f"\x00{self.id}\x00"
            frame = self._frames[index] = tuple(
                sse(self.chunk_object({"content": marker}, None, index)).split(json.dumps(marker)))
        before, after = frame
        return f"{before}{json.dumps(text)}{after}".encode()

    async def sse(self, handles, include_usage: bool):
        streams = [self.choice_events(choice, handle) for choice, handle in zip(self.choices, handles)]
        events = streams[0] if len(streams) == 1 else merged(streams)
        try:
            # Every choice opens in index order before any sends text: the SDK's stream helper takes a choice it
            # has not seen as the next index.
            for choice in self.choices:
                for event in self.opening_events(choice):
                    yield event
            async for event in events:
                yield event
            if include_usage:
                yield sse({**self.chunk_object({}, None), "choices": [], "usage": self.usage()})
            # Settled before [DONE] goes out: a client that closes the stream as soon as it reads [DONE] (the
            # official SDK does) has had the whole answer, and the request is ok, not cancelled.
            self.finish("ok", self.request_finish())
            yield "data: [DONE]\n\n"
        except GenerationFailed as exc:
            self.cancel_unfinished(handles)
            self.finish("failed", "error", str(exc))
            metrics.count_server_error(exc.status)
            yield sse(exc.payload())
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: the engine stops the unfinished choices. Record without awaiting: we are
            # being torn down.
            self.cancel_unfinished(handles)
            if not self.finished:
                self.finish("cancelled", "cancelled")
            raise
        except Exception as exc:  # headers went out with 200: the stream ends with an error event instead
            log.exception("stream %s failed", self.id)
            self.cancel_unfinished(handles)
            if not self.finished:
                self.finish("failed", "error", f"{type(exc).__name__}: {exc}")
                metrics.count_server_error(500)
                yield sse(error_payload(SERVER_ERROR))
        finally:
            await events.aclose()  # stops the choices' readers that an early exit left waiting

    def opening_events(self, choice: Choice) -> list[str]:
        """Return the events that open a choice's stream: its role, and a named call's name before its arguments."""
        named = self.tools is not None and self.tools.mode == "named"
        events = [sse(self.chunk_object({"role": "assistant", "content": None if named else ""}, None, choice.index))]
        if named:  # the whole answer is this call's arguments: say so first, then stream them
            call = ToolCall(self.tools.body.named, "")
            events.append(sse(self.chunk_object({"tool_calls": [{**call.as_openai(0), "function": {
                "name": call.name, "arguments": ""}}]}, None, choice.index)))
        return events

    async def choice_events(self, choice: Choice, handle):
        """Yield one choice's SSE events after its opening ones, its finishing chunk last; raise GenerationFailed
        on an engine error."""
        tools, index = self.tools, choice.index
        named = tools is not None and tools.mode == "named"
        sent = 0  # how much of the answer's text has gone out as content (or named-call arguments)
        thinking = ReasoningStream(self.reasoning) if self.reasoning is not None and tools is None else None
        plain = tools is None and thinking is None
        async for chunk in handle:
            self.absorb(choice, chunk)
            if chunk.finish_reason == "error":
                raise GenerationFailed(chunk)
            if chunk.logprobs:  # the slow path: this event carries its tokens' log probabilities
                event = self.chunk_object({"content": chunk.text} if plain else {}, None, index)
                event["choices"][0]["logprobs"] = {"content": [logprob_entry(e) for e in chunk.logprobs],
                                                   "refusal": None}
                yield sse(event)
            if chunk.text and plain and chunk.logprobs:
                pass  # sent with its log probabilities just above
            elif chunk.text and thinking is not None:
                for field_name, text in thinking.push(chunk.text):
                    yield sse(self.chunk_object({field_name: text}, None, index))
            elif chunk.text and tools is None:
                yield self.content_event(chunk.text, index)
            elif chunk.text and named:
                yield sse(self.chunk_object({"tool_calls": [{"index": 0, "function": {
                    "arguments": chunk.text}}]}, None, index))
            elif chunk.text and tools.mode == "auto":
                text = choice.answer
                held = tools.hold_from(text[sent:])
                upto = len(text) if held is None else sent + held
                if upto > sent:
                    yield self.content_event(text[sent:upto], index)
                    sent = upto
        finish = choice.finish_reason
        if tools is not None and not named:
            for delta in self.tool_call_deltas(choice, sent):
                yield sse(self.chunk_object(delta, None, index))
            if choice.calls_made and finish == "stop":
                finish = "tool_calls"
        elif named and finish == "stop":
            finish = "tool_calls"
        if thinking is not None:
            for field_name, text in thinking.finish():
                yield sse(self.chunk_object({field_name: text}, None, index))
            self.count_reasoning(choice, split_reasoning(choice.answer, self.reasoning)[0])
        choice.finish_reason = finish
        yield sse(self.chunk_object({}, finish, index))

    def tool_call_deltas(self, choice: Choice, sent: int) -> list[dict]:
        """Return the deltas that end a streamed answer with tools: its calls, and content not yet sent."""
        text = choice.answer
        content, calls = self.tools.split(text)
        if not calls:
            return [{"content": text[sent:]}] if text[sent:] else []
        choice.calls_made = True
        deltas = []
        unsent = (content or "")[sent:] if (content or "").startswith(text[:sent]) else ""
        if unsent.strip():
            deltas.append({"content": unsent})
        return deltas + [{"tool_calls": [call.as_openai(i)]} for i, call in enumerate(calls)]

    finished = False

    def finish(self, outcome: str, finish_reason: str | None, error_message: str | None = None) -> None:
        """Settle the request and queue its ledger event (and its transcripts when ok), without waiting."""
        self.finished = True
        self.settle(outcome)
        if outcome == "ok":
            self.keep_transcript()
        record_soon(**self.event(outcome, finish_reason, error_message))


def logprob_entry(entry: dict) -> dict:
    """Return OpenAI's shape of one token's log probabilities from the engine's plain entry."""
    def token(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**token(entry["token"], entry["logprob"]), "top_logprobs": [token(t, lp) for t, lp in entry["top"]]}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
