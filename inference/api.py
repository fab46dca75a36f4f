"""The OpenAI-compatible team chat API: /v1/models and /v1/chat/completions.

Views validate and answer errors; the engine generates; the ledger records
digests of what went in and out, never the text itself.
"""
import asyncio
import functools
import json
import logging
import queue
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from pydantic import ValidationError

from audit import ledger, transcripts

from . import serving
from .request_state import EngineBusy, EngineClosed, PromptTooLong, SamplingParams
from .errors import error, error_payload
from .gatekeeper import Admission, Caller, UsageReport, gatekeeper
from .schemas import ChatCompletionRequest, describe_validation_error

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 256
RETRY_AFTER_S = 1  # a full queue drains within about a second of decode steps on the demo models
# Ledger writes go through one thread, so a cancelled stream can still record
# its event without blocking the event loop, and events keep their order.
_ledger_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")
# Authentication and admission run on a thread of their own too, rather than on the thread Django makes for
# each request, so its database connection is opened once, not per request. One admission takes a few ms.
_gate = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gatekeeper")
DATABASE_THREADS = (_ledger_writer, _gate)


async def on_gate(fn, *args):
    """Run a gatekeeper call (database reads, the quota charge) on the gatekeeper thread and await it."""
    return await asyncio.wrap_future(_gate.submit(_with_kept_connection, fn, *args))


class Batched:
    """Items queued from any thread and handed to `call_many` in one call on an executor's one thread.

    Whatever queued up while that thread was busy goes in the next call: in a burst, N requests cost one
    read of their key and one insert of N usage rows, instead of N of each in a row. `call_many` returns one
    result per item (an exception for an item that failed alone), or None; an item whose waiter gave up before
    the call is left out.
    """

    def __init__(self, executor: ThreadPoolExecutor, call_many) -> None:
        self._executor = executor
        self._call_many = call_many
        self._waiting: queue.SimpleQueue = queue.SimpleQueue()

    def queued(self) -> int:
        """Return how many items wait for the next call."""
        return self._waiting.qsize()

    def submit(self, item) -> Future:
        answer: Future = Future()
        self._waiting.put((item, answer))
        self._executor.submit(self._run_waiting)
        return answer

    def _run_waiting(self) -> None:
        waiting = []
        while True:
            try:
                item, answer = self._waiting.get_nowait()
            except queue.Empty:
                break
            if answer.set_running_or_notify_cancel():
                waiting.append((item, answer))
        if not waiting:
            return  # an earlier call took them
        try:
            results = _with_kept_connection(self._call_many, [item for item, _ in waiting])
        except Exception as exc:
            log.exception("%s failed for %d items", self._call_many.__name__, len(waiting))
            for _, answer in waiting:
                answer.set_exception(exc)
            return
        for (_, answer), result in zip(waiting, results or [None] * len(waiting)):
            if isinstance(result, Exception):  # that item alone failed
                answer.set_exception(result)
            else:
                answer.set_result(result)


def _authenticate_and_admit(requests: list[tuple[str, str]]) -> list:
    return gatekeeper().authenticate_and_admit(requests)


def _settle_many(reports: list[tuple]) -> None:
    gatekeeper().settle_many(reports)


def _append_events(events: list[dict]) -> list:
    """Append events in one transaction; when one is refused (a malformed field), each alone, so only it fails."""
    try:
        return ledger.append_many(events)
    except DatabaseError:
        raise  # nothing was written: the kept-connection wrapper reconnects and retries the whole burst
    except Exception:
        if len(events) == 1:
            raise
    return [_append_alone(event) for event in events]


def _append_alone(event: dict):
    try:
        return ledger.append(**event)
    except Exception as exc:
        return exc


# Admission on the gatekeeper thread (a request whose client left while waiting is neither checked nor counted);
# ledger events, usage and transcripts on the writer thread, events in the order they were recorded.
_admissions = Batched(_gate, _authenticate_and_admit)
_events = Batched(_ledger_writer, _append_events)
_settlements = Batched(_ledger_writer, _settle_many)
_transcripts = Batched(_ledger_writer, transcripts.store_many)


async def admit_on_gate(token: str, model: str) -> tuple[Caller | None, Admission | None]:
    """Authenticate a chat request and admit it to model, together with whatever else is waiting."""
    return await asyncio.wrap_future(_admissions.submit((token, model)))


def _with_kept_connection(fn, *args, **kwargs):
    # These threads keep one connection for their life: opening one per job (what close_old_connections does with
    # CONN_MAX_AGE=0) cost more than the queries themselves. A connection that failed is replaced.
    if connection.errors_occurred:
        connection.close_if_unusable_or_obsolete()
    try:
        return fn(*args, **kwargs)
    except DatabaseError:
        if _connection_works():
            raise
        # The kept connection died under us (a database restart): nothing was written; once more, on a new one.
        connection.close()
        return fn(*args, **kwargs)


def _connection_works() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except DatabaseError:
        return False


async def record(**event) -> None:
    """Append a ledger event from async code without blocking the event loop."""
    await asyncio.wrap_future(_events.submit(event))


def record_soon(**event) -> None:
    """Queue a ledger event without waiting (for paths that are being cancelled)."""
    _events.submit(event)


def settle_soon(caller: Caller, admission: Admission, report: UsageReport) -> None:
    """Queue the usage report of an admitted request on the writer thread, settled with whatever else ended."""
    _settlements.submit((caller, admission, report))


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


async def authenticate(request: HttpRequest, admit_to: str | None = None) -> tuple[Caller | None, Admission | None]:
    """Return who is calling and, with `admit_to`, whether they may use that model (counting the request).

    Both happen in one trip to the gatekeeper thread, shared with every request that arrived meanwhile: a burst
    of 16 requests with one key costs about one check, not 16 checks in a row before the last one may start.
    """
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    caller = admission = None
    if scheme.lower() == "bearer" and token.strip():
        if admit_to is None:
            caller = await on_gate(gatekeeper().authenticate, token.strip())
        else:
            caller, admission = await admit_on_gate(token.strip(), admit_to)
    if caller is None:
        await record(action="auth.failed", actor="anonymous", target=request.path, outcome="denied",
                     details={"reason": "missing key" if not token.strip() else "unknown or revoked key",
                              "key": token.strip()[:13]})
    return caller, admission


def api_view(view):
    """Make an async view CSRF-exempt and turn any unexpected exception into an OpenAI-shaped 500."""

    @csrf_exempt
    @functools.wraps(view)
    async def wrapper(request, *args, **kwargs):
        try:
            return await view(request, *args, **kwargs)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error("The server had an error while processing your request.", 500)

    return wrapper


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
    loaded = set(serving.names())
    data = [{"id": c.name, "object": "model", "created": c.created, "owned_by": c.owned_by,
             "kind": c.kind, "loaded": c.name in loaded, "random_weights": c.random_weights}
            for c in cards]
    return JsonResponse({"object": "list", "data": data})


@api_view
async def chat_completions(request: HttpRequest):
    if request.method != "POST":
        return error(f"Method {request.method} not allowed; use POST", 405)
    body, invalid = parse_chat_request(request.body)
    if invalid is not None:  # a caller without a valid key learns only that
        caller, _ = await authenticate(request)
        return invalid if caller is not None else unauthorized()
    # Access and limits are checked (and the request counted) before the engine is looked up, so a caller
    # without access learns nothing about what is loaded.
    caller, admission = await authenticate(request, admit_to=body.model)
    if caller is None:
        return unauthorized()
    if not admission.allowed:
        await record(action="chat.refused", actor=f"team:{caller.team}", target=body.model, outcome="denied",
                     details={"key": caller.key_prefix, "status": admission.status, "code": admission.code,
                              "reason": admission.message})
        headers = {"Retry-After": str(admission.retry_after_s)} if admission.retry_after_s else None
        return error(admission.message, admission.status, code=admission.code, headers=headers)
    started = time.monotonic()

    def refused() -> None:
        settle_soon(caller, admission, UsageReport(body.model, 0, 0, _ms_since(started), None, "refused"))

    engine = serving.get(body.model)
    if engine is None:
        refused()
        if await on_gate(gatekeeper().exists, caller, body.model):
            return error(f"Model '{body.model}' is not loaded; deploy it first.", 503, code="model_not_loaded")
        return error(f"The model '{body.model}' does not exist.", 404, param="model", code="model_not_found")

    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids: list[int] = []
    try:
        prompt_ids = engine.encode_chat(messages)
        room = engine.max_request_tokens() - len(prompt_ids)
        params = SamplingParams(
            max_tokens=body.token_limit or min(DEFAULT_MAX_TOKENS, max(1, room)),
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k_cut, stop=body.stop_sequences,
            seed=body.seed, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
        handle = engine.submit(prompt_ids, params)
    except PromptTooLong as exc:
        refused()
        # Name the prompt when it alone is too long, else the token limit that pushed it over.
        param = "messages" if len(prompt_ids) >= engine.max_request_tokens() or not body.token_limit else (
            "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        return error(str(exc), 400, param=param, code="context_length_exceeded")
    except EngineBusy as exc:
        refused()
        return error(str(exc), 429, code="engine_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
    except EngineClosed:
        refused()
        return error(f"Model '{body.model}' is being unloaded.", 503, code="model_not_loaded")

    exchange = Exchange(caller=caller, model=body.model, messages=messages, admission=admission)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        response = StreamingHttpResponse(exchange.sse(handle, include_usage), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
    return await exchange.complete(handle)


def parse_chat_request(raw: bytes) -> tuple[ChatCompletionRequest | None, JsonResponse | None]:
    """Return the validated request, or the 400 that names what is wrong with it."""
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, error(f"Request body is not valid JSON: {exc}", 400)
    if not isinstance(payload, dict):
        return None, error("Request body must be a JSON object", 400)
    try:
        return ChatCompletionRequest.model_validate(payload), None
    except ValidationError as exc:
        message, param = describe_validation_error(exc)
        return None, error(message, 400, param=param)


class Exchange:
    """One chat request in flight: turns engine chunks into OpenAI objects and records the outcome."""

    def __init__(self, *, caller: Caller, model: str, messages: list[dict], admission: Admission | None = None):
        self.caller = caller
        self.model = model
        self.messages = messages
        self.prompt_text = json.dumps(messages, sort_keys=True)
        self.admission = admission
        self.first_text_at: float | None = None
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.started = time.monotonic()
        self.text: list[str] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def event(self, outcome: str, finish_reason: str | None, error_message: str | None = None) -> dict:
        details = {
            "model": self.model, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "prompt_digest": ledger.digest(self.prompt_text), "completion_digest": ledger.digest("".join(self.text)),
            "finish_reason": finish_reason, "duration_ms": int((time.monotonic() - self.started) * 1000),
        }
        if error_message:
            details["error"] = error_message[:500]
        return dict(action="chat.completion", actor=f"team:{self.caller.team}", target=self.model,
                    outcome=outcome, details={"key": self.caller.key_prefix, **details})

    def settle(self, outcome: str) -> None:
        """Report what this request used to the registry (quotas, usage), without waiting for it."""
        if self.admission is not None:
            ttft = None if self.first_text_at is None else int((self.first_text_at - self.started) * 1000)
            settle_soon(self.caller, self.admission, UsageReport(
                self.model, self.prompt_tokens, self.completion_tokens, _ms_since(self.started), ttft, outcome))

    def keep_transcript(self) -> None:
        """Store the exchange encrypted when the team's policy keeps transcripts (a no-op otherwise)."""
        _transcripts.submit((self.caller.team, self.model, self.messages, "".join(self.text)))

    def absorb(self, chunk) -> None:
        if chunk.text and self.first_text_at is None:
            self.first_text_at = time.monotonic()
        self.text.append(chunk.text)
        self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens

    async def complete(self, handle):
        finish = None
        async for chunk in handle:
            self.absorb(chunk)
            finish = chunk.finish_reason or finish
            if chunk.finish_reason == "error":
                self.settle("failed")
                await record(**self.event("failed", finish, chunk.error))
                return error(f"Generation failed: {chunk.error}", 500)
        self.settle("ok")
        self.keep_transcript()
        await record(**self.event("ok", finish))
        return JsonResponse({
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.text)},
                         "finish_reason": finish, "logprobs": None}],
            "usage": self.usage(),
        })

    def chunk_object(self, delta: dict, finish_reason: str | None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    @functools.cached_property
    def _content_frame(self) -> tuple[str, str]:
        # A stream's content events differ only in their text: frame them once, encode only the text per event.
        marker = f"\x00{self.id}\x00"
        before, after = sse(self.chunk_object({"content": marker}, None)).split(json.dumps(marker))
        return before, after

    def content_event(self, text: str) -> bytes:
        """Return the SSE event that carries `text`, as sse(chunk_object(...)) would, ready to send."""
        before, after = self._content_frame
        return f"{before}{json.dumps(text)}{after}".encode()

    async def sse(self, handle, include_usage: bool):
        finish = None
        try:
            yield sse(self.chunk_object({"role": "assistant", "content": ""}, None))
            async for chunk in handle:
                self.absorb(chunk)
                if chunk.finish_reason == "error":
                    self.settle("failed")
                    await record(**self.event("failed", "error", chunk.error))
                    yield sse(error_payload(f"Generation failed: {chunk.error}"))
                    return
                if chunk.text:
                    yield self.content_event(chunk.text)
                if chunk.finish_reason:
                    finish = chunk.finish_reason
            yield sse(self.chunk_object({}, finish))
            if include_usage:
                yield sse({**self.chunk_object({}, None), "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
            self.settle("ok")
            self.keep_transcript()
            await record(**self.event("ok", finish))
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away; the engine stops this request when its
            # iterator is closed. Record without awaiting: we are being torn down.
            self.settle("cancelled")
            record_soon(**self.event("cancelled", "cancelled"))
            raise


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
