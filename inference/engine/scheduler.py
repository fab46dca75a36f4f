"""Which requests run in the next step: a token budget per step, KV admission, preemption, the prefix cache.

Every step has a token budget: each running decode feeds its one token, and prompts take at most
`max_prefill_tokens` more, in arrival order; while anyone decodes, one prompt takes at most
`decoding_prefill_tokens` of them per step, so a long prompt is prefilled in chunks over several steps
while the others keep decoding, and short prompts still start whole. A request is admitted for the KV it uses now (its cached prefix and its first chunk) plus
a headroom share of the budget kept free; its reservation grows as it runs, and when the budget runs out
the most recently admitted request is preempted: its KV is dropped and it waits at the head of the queue
to be recomputed. Prefix-cache blocks live in the same budget and are evicted before anyone is preempted.

In exact mode none of that applies: prompts are prefilled whole and a request reserves its worst case
(prompt + max_tokens) at admission, as unbatched generate's numbers require (see EngineConfig.exact).

The scheduler knows request state and cache capacity, never torch modules. The asyncio side adds and
discards waiting requests; the worker thread asks for the next step and reports finished requests.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inference.engine.prefix_cache import Block, PrefixCache, extend_hashes
from inference.engine.request import EngineBusy, EngineClosed, RequestState, RequestStatus

# A running request's reservation grows by what it needs now plus this margin while the budget has room,
# so its store is not regrown at every block; when room is short it grows by what it needs. Small, because
# what one request holds beyond its need is room another may lack.
GROWTH_MARGIN_TOKENS = 32
@dataclass
class StepPlan:
    """The work of one step: each scheduled request with the number of its tokens fed to the model."""

    scheduled: list[tuple[RequestState, int]] = field(default_factory=list)
    prefill: list[RequestState] = field(default_factory=list)  # admitted in this step: they need a KV store
    cancelled: list[RequestState] = field(default_factory=list)  # preempted, then cancelled while waiting

    def __bool__(self) -> bool:
        return bool(self.scheduled or self.cancelled)

    @property
    def requests(self) -> list[RequestState]:
        """Return the step's requests in batch order: decodes first, then prompt chunks."""
        return [state for state, _ in self.scheduled]

    @property
    def decode(self) -> list[RequestState]:
        """Return the requests that feed their last sampled token."""
        return [state for state, n in self.scheduled if n == 1 and state.output_ids]

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class FifoScheduler:
    """Admit in arrival order within the KV budget; every step decodes every running request."""

    def __init__(
        self, *, queue_limit: int, kv_budget_bytes: int, kv_bytes_per_token: int, max_batch_size: int,
        max_prefill_tokens: int, decoding_prefill_tokens: int | None = None, exact: bool = False, kv_headroom: float = 0.05,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be at least 1, got {queue_limit}")
        self.queue_limit = queue_limit
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_bytes_per_token = max(1, kv_bytes_per_token)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.decoding_prefill_tokens = decoding_prefill_tokens or max_prefill_tokens
        self.exact = exact
        self.kv_headroom_bytes = int(kv_budget_bytes * kv_headroom)
        self.prefix_cache = None if exact else prefix_cache
        # The unit in which reservations grow: the prefix cache's block, so cached prefixes fill them exactly.
        self.block_tokens = prefix_cache.block_tokens if prefix_cache is not None else 16
        self.kv_reserved_bytes = 0  # held by running requests (the prefix cache's bytes are apart)
        self.preemptions = 0
        self.running: list[RequestState] = []  # in admission order: the last one is preempted first
        self._waiting: collections.deque[RequestState] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    # ---- asyncio side ---------------------------------------------------------------------------

    def max_tokens_per_request(self) -> int:
        """Return the most tokens (prompt + max_tokens) one request may hold: the whole budget."""
        return self.kv_budget_bytes // self.kv_bytes_per_token

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
        """Remove a request that never started; return False when it was admitted (it may wait again,
        preempted: the worker then retires it, so its earlier text and its end stay in order)."""
        with self._cond:
            if state.started_at is not None:
                self._cond.notify()
                return False
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
            plan = StepPlan()
            decoding = [s for s in self.running if s.pending_tokens == 1]
            prefilling = [s for s in self.running if s.pending_tokens > 1]
            budget = self.max_prefill_tokens
            chunk = self.decoding_prefill_tokens if decoding else self.max_prefill_tokens
            for state in decoding + prefilling:
                if state not in self.running:
                    continue  # preempted for an older request earlier in this loop
                n = state.pending_tokens if self.exact or state.pending_tokens == 1 else min(state.pending_tokens, budget,
                                                                                             chunk)
                if n < 1:
                    continue  # the budget is spent: this prompt's next chunk waits for the next step
                if self._grow(state, state.num_computed + n):
                    plan.scheduled.append((state, n))
                    if n > 1 or not state.output_ids:  # a prompt's tokens; decodes are outside the budget
                        budget -= n
            # A request preempted for an older one may already have been placed in this step.
            plan.scheduled = [(s, n) for s, n in plan.scheduled if s.status is RequestStatus.RUNNING]
            self._admit_waiting(plan, budget, chunk)
            return plan

    def _admit_waiting(self, plan: StepPlan, budget: int, chunk: int) -> None:
        """Move waiting requests into the batch, in order, while the step budget and the KV budget allow."""
        prefill_tokens = 0
        for state in [s for s in self._waiting if s.started_at is not None and s.cancel_requested.is_set()]:
            self._waiting.remove(state)  # preempted, then cancelled: the worker retires it
            plan.cancelled.append(state)
        while self._waiting:
            state = self._waiting[0]
            if len(self.running) >= self.max_batch_size:
                break
            if self.exact:
                # A whole prompt per request; the first of a step runs even when it alone exceeds the budget.
                n = state.pending_tokens
                if plan.prefill and prefill_tokens + n > self.max_prefill_tokens:
                    break
                cached, need = 0, state.max_total_tokens
            else:
                if budget < 1:
                    break
                cached = self._match_prefix(state)
                n = min(state.num_tokens - cached, budget, chunk)
                need = cached + n
            target = self._admission_target(state, need)
            if not self._fits_at_admission(target):
                state.prefix_blocks = []
                break  # FIFO: the head waits for memory rather than being overtaken
            self._waiting.popleft()
            self._hold(state, target)
            if state.started_at is None:  # the first admission reports what the cache saved
                state.cached_tokens = cached
                if self.prefix_cache is not None and state.cache_scope is not None:
                    self.prefix_cache.record_lookup(len(state.prompt_ids), cached)
            state.num_computed = cached
            state.start()
            self.running.append(state)
            plan.prefill.append(state)
            plan.scheduled.append((state, n))
            prefill_tokens += n
            budget -= n

    # ---- KV budget ------------------------------------------------------------------------------

    @property
    def kv_free_bytes(self) -> int:
        """Return the budget that neither running requests nor the prefix cache hold."""
        cached = self.prefix_cache.nbytes if self.prefix_cache is not None else 0
        return self.kv_budget_bytes - self.kv_reserved_bytes - cached

    def _make_room(self, nbytes: int) -> bool:
        """Evict prefix-cache blocks until `nbytes` are free; return whether they are."""
        short = nbytes - self.kv_free_bytes
        if short > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(short)
        return self.kv_free_bytes >= nbytes

    def _fits_at_admission(self, tokens: int) -> bool:
        """Return whether a request needing `tokens` now may start; a request alone always may."""
        need = tokens * self.kv_bytes_per_token
        if self.running and not self.exact:
            need += self.kv_headroom_bytes
        return self._make_room(need)

    def _least(self, state: RequestState, tokens: int) -> int:
        """Return `tokens` rounded up to a whole block, within the request's worst case."""
        return min(state.max_total_tokens, -(-tokens // self.block_tokens) * self.block_tokens)

    def _admission_target(self, state: RequestState, tokens: int) -> int:
        """Return the reservation a request starts with: the worst case in exact mode, else what its first
        step computes plus the slot of its first sampled token."""
        return state.max_total_tokens if self.exact else self._least(state, tokens + 1)

    def _growth_target(self, state: RequestState, tokens: int) -> int:
        """Return the reservation to grow to for `tokens`: with GROWTH_MARGIN_TOKENS more where the free budget
        allows it without evicting anything, else `tokens`; in whole blocks."""
        if self.exact:
            return state.max_total_tokens
        least = self._least(state, tokens)
        generous = self._least(state, tokens + GROWTH_MARGIN_TOKENS)
        room = self.kv_free_bytes // self.kv_bytes_per_token + state.kv_tokens
        return max(least, min(generous, room))

    def _hold(self, state: RequestState, tokens: int) -> None:
        """Set `state`'s reservation to `tokens` (the caller made room)."""
        held = tokens * self.kv_bytes_per_token
        self.kv_reserved_bytes += held - state.kv_reserved
        state.kv_reserved, state.kv_tokens = held, tokens

    def _grow(self, state: RequestState, tokens: int) -> bool:
        """Make `state`'s reservation cover `tokens`, preempting newer requests if need be; return False when
        `state` itself had to be preempted."""
        if tokens <= state.kv_tokens:
            return True
        target = self._growth_target(state, tokens)
        while not self._make_room((target - state.kv_tokens) * self.kv_bytes_per_token):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is state:
                return False
            target = self._growth_target(state, tokens)
        self._hold(state, target)
        return True

    def _preempt(self, state: RequestState) -> None:
        """Take `state`'s KV back; it waits at the head of the queue and recomputes when readmitted."""
        self.running.remove(state)
        self._hold(state, 0)
        state.preempt()
        self.preemptions += 1
        self._waiting.appendleft(state)

    # ---- prefix cache ---------------------------------------------------------------------------

    def _match_prefix(self, state: RequestState) -> int:
        """Find the cached blocks that start `state`'s tokens; return how many tokens they hold.

        At least the last known token is always computed: its logits pick the next token.
        """
        cache = self.prefix_cache
        state.prefix_blocks = []
        if cache is None or state.cache_scope is None:
            return 0
        tokens = state.prompt_ids + state.output_ids
        extend_hashes(state.block_hashes, state.cache_scope, tokens, cache.block_tokens)
        state.prefix_blocks = cache.match(state.block_hashes, len(tokens) - 1)
        return len(state.prefix_blocks) * cache.block_tokens

    def store_prefix(self, state: RequestState, payload_of: Callable[[int, int], Any]) -> int:
        """Put `state`'s computed full blocks into the prefix cache, as far as the free budget allows.

        `payload_of(start, end)` returns the KV of those tokens (the worker copies them out of the request's
        store). Blocks already cached are only touched. Return the blocks added.
        """
        cache = self.prefix_cache
        if cache is None or state.cache_scope is None:
            return 0
        with self._cond:
            tokens = (state.prompt_ids + state.output_ids)[: state.num_computed]
            extend_hashes(state.block_hashes, state.cache_scope, tokens, cache.block_tokens)
            block_bytes = cache.block_tokens * self.kv_bytes_per_token
            chain = state.block_hashes[: len(tokens) // cache.block_tokens]
            keep = frozenset(chain)
            added = 0
            for i, key in enumerate(chain):
                if key in cache:
                    continue
                short = block_bytes - self.kv_free_bytes
                # Older blocks make room for newer ones, but never this chain's own: a chain's tail is worth
                # nothing without its head.
                if short > 0 and cache.evict(short, keep=keep) < short:
                    break
                start = i * cache.block_tokens
                cache.insert(Block(key, payload_of(start, start + cache.block_tokens), block_bytes))
                added += 1
            for key in reversed(chain):  # the chain's head most recently used: its tail is evicted first
                if key in cache:
                    cache.touch(key)
            return added

    def finish(self, state: RequestState) -> None:
        """Drop a finished request from the batch and give its KV reservation back."""
        with self._cond:
            if state in self.running:
                self.running.remove(state)
            self._hold(state, 0)

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
