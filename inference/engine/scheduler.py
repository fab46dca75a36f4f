"""Which requests run in the next step: admission against the KV budget, and the batch of each step.

The scheduler knows request state and cache capacity, never torch modules. The asyncio side adds and
discards waiting requests; the worker thread asks for the next step and reports finished requests.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

from inference.engine.request import EngineBusy, EngineClosed, RequestState


@dataclass
class StepPlan:
    """The requests of one step: running ones decode a token, admitted ones prefill their prompt."""

    decode: list[RequestState] = field(default_factory=list)
    prefill: list[RequestState] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)

    @property
    def requests(self) -> list[RequestState]:
        """Return the step's requests in batch order: single tokens first, then whole prompts."""
        return self.decode + self.prefill


class FifoScheduler:
    """Admit in arrival order while the batch and the KV budget have room; every running request decodes."""

    def __init__(
        self, *, queue_limit: int, kv_budget_bytes: int, kv_bytes_per_token: int, max_batch_size: int,
        max_prefill_tokens: int,
    ) -> None:
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be at least 1, got {queue_limit}")
        self.queue_limit = queue_limit
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_bytes_per_token = kv_bytes_per_token
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.kv_reserved_bytes = 0
        self.running: list[RequestState] = []
        self._waiting: collections.deque[RequestState] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    # ---- asyncio side ---------------------------------------------------------------------------

    def max_tokens_per_request(self) -> int:
        """Return the most tokens (prompt + max_tokens) one request may reserve: the whole budget."""
        return self.kv_budget_bytes // max(1, self.kv_bytes_per_token)

    def add(self, state: RequestState) -> None:
        """Queue a request, or raise EngineBusy when `queue_limit` requests are already waiting."""
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if len(self._waiting) >= self.queue_limit:
                raise EngineBusy(f"the engine's queue is full ({self.queue_limit} requests waiting); retry later")
            self._waiting.append(state)
            self._cond.notify()

    def discard(self, state: RequestState) -> bool:
        """Remove a still-waiting request; return False when it was already admitted."""
        with self._cond:
            try:
                self._waiting.remove(state)
            except ValueError:
                return False
            return True

    def wake(self) -> None:
        """Wake the worker, e.g. after a running request was cancelled."""
        with self._cond:
            self._cond.notify()

    # ---- worker side ----------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """Block until there is work and return the next step, or None once closed and drained."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self.running or self._waiting)
            if self._closed:
                return None
            plan = StepPlan(decode=list(self.running))
            prefill_tokens = 0
            while self._waiting and len(self.running) < self.max_batch_size:
                state = self._waiting[0]
                need = state.reserved_tokens * self.kv_bytes_per_token
                if self.kv_reserved_bytes + need > self.kv_budget_bytes:
                    break  # FIFO: the head waits for memory rather than being overtaken
                prompt = len(state.prompt_ids)
                if plan.prefill and prefill_tokens + prompt > self.max_prefill_tokens:
                    break
                self._waiting.popleft()
                state.kv_reserved = need
                self.kv_reserved_bytes += need
                self.running.append(state)
                plan.prefill.append(state)
                prefill_tokens += prompt
            return plan

    def finish(self, state: RequestState) -> None:
        """Drop a finished request from the batch and give its KV reservation back."""
        with self._cond:
            if state in self.running:
                self.running.remove(state)
                self.kv_reserved_bytes -= state.kv_reserved
                state.kv_reserved = 0

    def close(self) -> list[RequestState]:
        """Refuse new requests, wake the worker, and return the requests that never started."""
        with self._cond:
            self._closed = True
            drained = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
            return drained

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)


SCHEDULERS = {"fifo": FifoScheduler}
