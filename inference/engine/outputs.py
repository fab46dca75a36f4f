"""How results get from the worker thread back to each request's asyncio consumer.

The worker emits chunks during a step and flushes once per step: one `call_soon_threadsafe` per event
loop carries every chunk of that loop, and chunks of one request are merged first. With a stream interval,
flushes of ordinary text wait until the interval has passed (first tokens and final chunks never wait), so
a busy server writes a few larger events per stream instead of one per token; on this box the web process
is bound by one interpreter lock shared by the engine and the HTTP side, so fewer events mean more steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from inference.engine.request import Chunk, RequestState


def merge(first: Chunk, second: Chunk) -> Chunk:
    """Return one chunk carrying the text of both and the state of the later one."""
    logprobs = None if first.logprobs is None and second.logprobs is None else (
        (first.logprobs or []) + (second.logprobs or []))
    return Chunk(first.text + second.text, second.finish_reason, second.prompt_tokens, second.completion_tokens,
                 second.error, second.cached_tokens, logprobs)


def deliver_now(state: RequestState, chunk: Chunk) -> None:
    """Hand one chunk to its consumer from any thread (requests that never ran)."""
    try:
        if state.loop is None:
            state.deliver(chunk)
        else:
            state.loop.call_soon_threadsafe(state.deliver, chunk)
    except RuntimeError:  # the consumer's loop is closed
        pass


def _deliver_all(items: list[tuple[RequestState, Chunk]]) -> None:
    for state, chunk in items:
        state.deliver(chunk)


class OutputRouter:
    """Collect a step's chunks per event loop and hand them over in one thread hop per loop."""

    def __init__(self, stream_interval_s: float = 0.0) -> None:
        self.stream_interval_s = stream_interval_s
        self._outbox: dict[object, dict[RequestState, Chunk]] = {}
        self._streaming: set[RequestState] = set()  # requests whose first text has been sent
        self._urgent = False
        self._last_flush = 0.0

    def emit(self, state: RequestState, chunk: Chunk) -> None:
        """Queue a chunk (worker thread); a request's queued chunks merge into one."""
        pending = self._outbox.setdefault(state.loop, {})
        previous = pending.get(state)
        pending[state] = chunk if previous is None else merge(previous, chunk)
        if chunk.finish_reason is not None:  # the end of an answer is sent at once
            self._urgent = True
            self._streaming.discard(state)
        elif state not in self._streaming:  # so is its first text: TTFT never waits for the interval
            self._streaming.add(state)
            self._urgent = True

    def flush(self, force: bool = False) -> None:
        """Send queued chunks, unless the stream interval has not passed and nothing is urgent."""
        if not self._outbox:
            return
        now = time.monotonic()
        if not (force or self._urgent or now - self._last_flush >= self.stream_interval_s):
            return
        outbox, self._outbox, self._urgent, self._last_flush = self._outbox, {}, False, now
        for loop, pending in outbox.items():
            items = list(pending.items())
            if loop is None:
                _deliver_all(items)
                continue
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # the consumer's event loop is closed: nobody will read these answers
                for state, _ in items:
                    state.cancel_requested.set()


class RequestHandle:
    """A submitted request: `async for` yields its Chunks; stopping early cancels the request."""

    def __init__(self, state: RequestState, chunks: asyncio.Queue[Chunk], engine) -> None:
        self.state = state
        self._chunks = chunks
        self._engine = engine
        self._iterated = False

    @property
    def request_id(self) -> str:
        return self.state.request_id

    async def accepted(self) -> None:
        """Return at once: Engine.submit raised whatever refused the request (an engine process's handle waits)."""

    def cancel(self) -> None:
        """Ask the engine to drop this request; a final "cancelled" chunk follows unless it already finished."""
        self._engine.cancel(self.state)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        if self._iterated:
            raise RuntimeError("a request's chunks can be iterated only once")
        self._iterated = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        async for chunk in chunks_until_final(self._chunks, self.cancel):
            yield chunk


async def chunks_until_final(chunks: asyncio.Queue[Chunk], cancel) -> AsyncIterator[Chunk]:
    """Yield a request's chunks until the final one; on early exit (break, task cancelled) call cancel()."""
    finished = False
    try:
        while not finished:
            chunk = await chunks.get()
            # A consumer slower than the engine gets the waiting chunks merged into one, so a busy server
            # writes fewer, larger events instead of falling further behind.
            while chunk.finish_reason is None and not chunks.empty():
                chunk = merge(chunk, chunks.get_nowait())
            finished = chunk.finish_reason is not None
            yield chunk
    finally:
        if not finished:
            cancel()
