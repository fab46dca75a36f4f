"""How the web process reaches its engines: one child process per deployment, and the registry of them by name.

`start_engine` forks `python -m appliance.engine_process` with one end of a socketpair and waits until the
model is loaded. The EngineClient it returns is what the API, the console and /metrics use: it tokenizes
locally (counting and refusing before a request crosses), submits requests and streams their chunks back onto
the caller's event loop, and keeps the engine's latest figures. One reader thread per engine takes the
engine's frames and hands each step's chunks to each event loop in one hop.

When the engine process dies (an exception, an OOM kill, SIGKILL), every request in flight ends with an error
chunk (the API answers 500, or an error event in a stream), submissions are refused as EngineClosed (503),
and the reconciler sees `alive` turn false, records it and starts a new process.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import uuid
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

import httpx
from django.conf import settings

from appliance.names import is_valid_name
from inference.engine import wire
from inference.engine.config import EngineConfig
from inference.engine.outputs import chunks_until_final
from inference.engine.prompt import encode_chat, load_tokenizer
from inference.engine.request import Chunk, EngineClosed, PromptTooLong, SamplingParams

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 600  # loading a large model from a slow disk takes minutes; a hung load is killed after this
CLOSE_TIMEOUT_S = 30

_lock = threading.Lock()
_engines: dict[str, "EngineClient"] = {}


def register(name: str, engine: "EngineClient") -> None:
    with _lock:
        _engines[name] = engine


def unregister(name: str) -> "EngineClient | None":
    """Remove and return the engine serving name, or None."""
    with _lock:
        return _engines.pop(name, None)


def get(name: str) -> "EngineClient | None":
    with _lock:
        return _engines.get(name)


def names() -> list[str]:
    with _lock:
        return sorted(_engines)


class EngineStartFailed(RuntimeError):
    """The engine process exited or failed before its model was loaded; the message carries its reason."""


def start_engine(name: str, model_dir: str | Path, config: EngineConfig) -> "EngineClient":
    """Start the engine process of one deployment and return its client once the model is loaded."""
    if not is_valid_name(name):  # it names the log file; a row written behind the registry's back must not
        raise EngineStartFailed(f"{name!r} is not a valid variant name")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log_path = Path(settings.APPLIANCE_HOME) / "logs" / f"engine-{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "appliance.engine_process", "--fd", str(theirs.fileno()), "--name", name,
               "--model-dir", str(model_dir), "--config", json.dumps(dataclasses.asdict(config))]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
    theirs.close()
    try:
        return EngineClient(name, Path(model_dir), ours, process, _await_ready(ours, process, log_path))
    except BaseException:
        ours.close()
        _stop(process)
        raise


def _await_ready(sock: socket.socket, process: subprocess.Popen, log_path: Path) -> dict:
    sock.settimeout(READY_TIMEOUT_S)
    try:
        reply = _read_message(sock)
    except (TimeoutError, OSError, wire.WireError) as exc:
        reply = None
        if isinstance(exc, TimeoutError):
            raise EngineStartFailed(f"the engine process did not load the model within {READY_TIMEOUT_S} s") from exc
    finally:
        sock.settimeout(None)
    if reply is not None and reply[0] == "ready":
        return reply[1]
    if reply is not None and reply[0] == "failed":
        raise EngineStartFailed(reply[1])
    code = process.wait(timeout=CLOSE_TIMEOUT_S)
    raise EngineStartFailed(f"the engine process {exit_description(code)} while loading; "
                            f"last lines of {log_path}: {log_tail(log_path)}")


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise EOFError("the engine process closed its end")
        data += part
    return bytes(data)


def _read_message(sock: socket.socket) -> list | None:
    """Return the next message, or None when the engine process has gone."""
    try:
        header = _read_exactly(sock, wire.HEADER.size)
        return wire.message(_read_exactly(sock, wire.body_length(header)))
    except EOFError:
        return None


def exit_description(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


class ClientBasics:
    """What every engine's client (this builtin one, appliance.vllm_engine's) answers the same way."""

    tokenizer = None
    exit_reason: str | None = None
    _max_request_tokens = 0

    @property
    def alive(self) -> bool:
        return self.exit_reason is None

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Return the chat's prompt ids, encoded here in the web process (the engine process takes ids)."""
        return encode_chat(self.tokenizer, messages, tools)

    def max_request_tokens(self) -> int:
        """Return the most tokens (prompt + max_tokens) one request may use: context and KV budget."""
        return self._max_request_tokens


# How long an idle connection to an engine's or a node's server is kept for the next request. Below the servers'
# own keep-alive (uvicorn's --timeout-keep-alive: http_limits.SERVER_KEEPALIVE_S for our web process, 5 s for vLLM's): with both at
# 5 s, a request sent just as the server closed the connection failed with a ReadError (a forwarded request
# answered 503 "cannot be reached" in CI, 5 s after the connection's last use).
CLIENT_KEEPALIVE_S = 2.0


def loop_client(clients: weakref.WeakKeyDictionary, **options) -> httpx.AsyncClient:
    """Return the running event loop's AsyncClient in `clients` (event loop -> client), made with `options` on
    first use: a client's connections belong to the loop that opened them. No proxy variable is read
    (trust_env=False), so an engine's or a node's traffic goes only where it is sent."""
    loop = asyncio.get_running_loop()
    client = clients.get(loop)
    if client is None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=CLIENT_KEEPALIVE_S)
        client = clients[loop] = httpx.AsyncClient(trust_env=False, limits=limits, **options)
    return client


class TaskHandle:
    """A request to an engine reached over HTTP (vLLM's server, another node): a task on the caller's event loop
    sends it, answers `accepted()` and queues its Chunks; `cancel()` ends the task, which closes the connection."""

    def __init__(self, run: Callable[[], Awaitable[None]]) -> None:
        """run() is the coroutine that sends the request, settles `answer` and queues the chunks."""
        loop = asyncio.get_running_loop()
        self.answer: asyncio.Future = loop.create_future()  # the engine took the request, or its refusal
        self.chunks: asyncio.Queue[Chunk] = asyncio.Queue()
        self._task = loop.create_task(run())

    async def accepted(self) -> None:
        """Wait for the engine to take the request; raise its refusal (PromptTooLong, EngineBusy, EngineClosed, ...)."""
        try:
            await self.answer
        except asyncio.CancelledError:
            self.cancel()
            raise

    def cancel(self) -> None:
        self._task.cancel()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return chunks_until_final(self.chunks, self.cancel)

    def _settle(self, error: Exception | None) -> None:
        if self.answer.done():
            return
        if error is None:
            self.answer.set_result(None)
        else:
            self.answer.set_exception(error)


class EngineClient(ClientBasics):
    """One deployment's engine process, as the web process sees it."""

    engine = "builtin"  # which engine this client drives (appliance.engines); the vLLM client says "vllm"

    def __init__(self, name: str, model_dir: Path, sock: socket.socket, process: subprocess.Popen, info: dict):
        self.name, self.model_dir, self.process = name, model_dir, process
        self.pid = process.pid
        self.device: str = info["device"]
        self.exact: bool = info["exact"]
        self.context_length: int = info["context_length"]
        self.vocab_size: int = info["vocab_size"]
        self.measured: dict = info["measured"]
        self.process_report: dict = info["process"]  # pid and egress guard state, as the engine process saw them
        self._max_request_tokens: int = info["max_request_tokens"]
        self.tokenizer = load_tokenizer(model_dir)
        self._sock = sock
        self._send_lock = threading.Lock()
        self._requests: dict[str, ClientHandle] = {}
        self._pending: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._state_lock = threading.Lock()
        self._figures: dict = info["figures"]
        self._telemetry: dict = info["telemetry"]
        self.exit_reason: str | None = None
        self._closing = False
        self._reader = threading.Thread(target=self._read_forever, name=f"engine-client:{name}", daemon=True)
        self._reader.start()

    # ---- what the API asks -----------------------------------------------------------------------

    def submit(self, prompt_ids: Iterable[int], params: SamplingParams = SamplingParams(),
               **options) -> "ClientHandle":
        """Send a request to the engine from inside a running event loop; `await handle.accepted()` before reading.

        What can be checked here is refused at once (PromptTooLong); the engine's own refusals (EngineBusy, ...)
        are raised by accepted(), as Engine.submit would raise them.
        """
        prompt_ids = [int(t) for t in prompt_ids]
        total = len(prompt_ids) + params.max_tokens
        if prompt_ids and total > self._max_request_tokens:  # refused here, without a trip to the engine
            raise PromptTooLong(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                                f"exceeds this deployment's limit of {self._max_request_tokens} tokens")
        loop = asyncio.get_running_loop()
        handle = ClientHandle(self, uuid.uuid4().hex, loop)
        with self._state_lock:
            if not self.alive:
                raise EngineClosed(f"the engine process {self.exit_reason}")
            self._pending[handle.request_id] = (loop, handle.answer)
            self._requests[handle.request_id] = handle
        try:
            self._send(["submit", handle.request_id, prompt_ids, wire.params_fields(params), options])
        except OSError:
            pass  # the engine process is gone: its reader answers this submission with EngineClosed
        return handle

    def forget(self, request_id: str) -> None:
        """Drop a request the engine refused, or whose caller left before the engine answered."""
        with self._state_lock:
            self._requests.pop(request_id, None)

    def describe(self) -> dict:
        """Return the engine's latest figures (batch, queue, KV budget, counters), at most half a second old."""
        return dict(self._figures)

    def telemetry(self) -> dict:
        """Return the engine's latest MoE routing telemetry (inference.engine.telemetry.snapshot)."""
        return dict(self._telemetry)

    def close(self) -> None:
        """Ask the engine process to finish; kill it if it does not within CLOSE_TIMEOUT_S."""
        self._closing = True
        try:
            self._send(["close"])
        except OSError:
            pass
        try:
            self.process.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("engine %s did not close within %d s; killing it", self.name, CLOSE_TIMEOUT_S)
        _stop(self.process)
        self._reader.join(timeout=CLOSE_TIMEOUT_S)
        self._sock.close()

    # ---- the wire ----------------------------------------------------------------------------------

    def _send(self, message: list) -> None:
        data = wire.frame(message)
        with self._send_lock:
            self._sock.sendall(data)

    def cancel(self, request_id: str) -> None:
        if self.alive:
            try:
                self._send(["cancel", request_id])
            except OSError:
                pass  # the engine is gone; the reader fails the request

    def _read_forever(self) -> None:
        try:
            while (message := _read_message(self._sock)) is not None:
                self._dispatch(message)
        except Exception as exc:  # a broken frame: the engine cannot be trusted to continue
            log.exception("engine %s sent a broken frame", self.name)
            self.process.kill()
            self._gone(f"sent a broken frame ({exc})")
            return
        try:
            code = self.process.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._gone("closed" if self._closing and code == 0 else exit_description(code))

    def _dispatch(self, message: list) -> None:
        kind = message[0]
        if kind == "chunks":
            by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
            with self._state_lock:
                for fields in message[1]:
                    request_id, chunk = wire.chunk_from(fields)
                    handle = self._requests.get(request_id)
                    if handle is None:
                        continue  # its consumer left; the cancel is on its way
                    if chunk.finish_reason is not None:
                        del self._requests[request_id]
                    by_loop[handle.loop].append((handle, chunk))
            for loop, items in by_loop.items():
                _call_soon(loop, _deliver_all, items)
        elif kind in ("accepted", "refused"):
            with self._state_lock:
                waiting = self._pending.pop(message[1], None)
            if waiting is None:
                return
            loop, future = waiting
            error = None if kind == "accepted" else wire.REFUSALS.get(message[2], ValueError)(message[3])
            _call_soon(loop, _settle, future, error)
        elif kind == "stats":
            self._figures, self._telemetry = message[1], message[2]
        else:
            raise wire.WireError(f"unknown message {kind!r}")

    def _gone(self, reason: str) -> None:
        """Fail every request in flight and every submission waiting for its answer: the engine is gone."""
        with self._state_lock:
            self.exit_reason = reason
            requests, self._requests = self._requests, {}
            pending, self._pending = self._pending, {}
        if not self._closing:
            log.error("engine process of %s (pid %d) %s", self.name, self.pid, reason)
        failure = f"the engine process {reason}"
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for handle in requests.values():
            by_loop[handle.loop].append((handle, Chunk("", "error", 0, 0, failure)))
        for loop, items in by_loop.items():
            _call_soon(loop, _deliver_all, items)
        for loop, future in pending.values():
            _call_soon(loop, _settle, future, EngineClosed(failure))
        notify_gone(self)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the caller's event loop is closed: nobody is waiting for these any more
        pass


def _deliver_all(items: list) -> None:
    for handle, chunk in items:
        handle.chunks.put_nowait(chunk)


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


# Called (from the engine's reader thread) when an engine process ends; the reconciler sets it to wake at once.
_on_gone = []


def on_engine_gone(callback) -> None:
    _on_gone.append(callback)


def notify_gone(client: EngineClient) -> None:
    for callback in _on_gone:
        try:
            callback(client)
        except Exception:
            log.exception("engine-gone callback failed")


class ClientHandle:
    """A submitted request: `await accepted()`, then `async for` yields its Chunks; leaving early cancels it."""

    def __init__(self, client: EngineClient, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.request_id, self.loop = client, request_id, loop
        self.answer: asyncio.Future = loop.create_future()  # the engine's accepted / refused
        self.chunks: asyncio.Queue[Chunk] = asyncio.Queue()
        self._iterated = False

    async def accepted(self) -> None:
        """Wait for the engine to take the request; raise its refusal (EngineBusy, PromptTooLong, EngineClosed)."""
        try:
            await self.answer
        except BaseException as exc:
            self.client.forget(self.request_id)
            if isinstance(exc, asyncio.CancelledError):  # the caller left before the engine answered
                self.cancel()
            raise

    def cancel(self) -> None:
        self.client.cancel(self.request_id)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        if self._iterated:
            raise RuntimeError("a request's chunks can be iterated only once")
        self._iterated = True
        return chunks_until_final(self.chunks, self.cancel)
