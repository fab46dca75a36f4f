"""Admission and step plans, and the results router, without a model."""

from __future__ import annotations

import pytest

from inference.engine.config import EngineConfig
from inference.engine.outputs import OutputRouter
from inference.engine.prefix_cache import Block, PrefixCache, extend_hashes
from inference.engine.scheduler import SCHEDULERS, FifoScheduler, StepPlan
from inference.engine.request import Chunk, EngineBusy, EngineClosed, RequestState, SamplingParams

PER_TOKEN = 10  # bytes of KV cache per token, to keep the arithmetic readable
BLOCK = 16  # tokens per prefix-cache block and reservation step


def request(prompt: int, max_tokens: int, got: list | None = None, *, token: int = 5,
            scope: str | None = None) -> RequestState:
    sink = got if got is not None else []
    return RequestState([token] * prompt, SamplingParams(max_tokens=max_tokens), sink.append, cache_scope=scope)


def scheduler(budget_tokens: int = 1000, **kwargs) -> FifoScheduler:
    settings = dict(queue_limit=4, kv_budget_bytes=budget_tokens * PER_TOKEN, kv_bytes_per_token=PER_TOKEN,
                    max_batch_size=8, max_prefill_tokens=100, kv_headroom=0.0)
    # One prompt budget whether or not others decode, unless a test sets the one while decoding.
    return FifoScheduler(**{**settings, **kwargs})


def run_step(plan: StepPlan, sampled: int = 7) -> None:
    """Do what the worker does after a forward: count the fed tokens as computed, and give each request
    whose known tokens are all computed its next token (the model's part is all this scheduler sees)."""
    for state, n in plan.scheduled:
        assert state.num_computed + n <= state.kv_tokens, "a step never writes past the reservation"
        state.num_computed += n
        if state.pending_tokens == 0:
            state.output_ids.append(sampled)


# ---- exact mode: whole prompts, worst-case reservations ---------------------------------------------


def test_exact_mode_admits_in_order_while_the_worst_case_fits() -> None:
    fifo = scheduler(budget_tokens=100, exact=True)
    first, second, third = request(20, 30), request(20, 20), request(10, 5)  # 50, 40 and 15 tokens
    for state in (first, second, third):
        fifo.add(state)
    plan = fifo.schedule()
    assert plan.prefill == [first, second] and plan.scheduled == [(first, 20), (second, 20)]
    assert fifo.kv_reserved_bytes == 90 * PER_TOKEN
    run_step(plan)
    plan = fifo.schedule()  # the third waits: 90 + 15 > 100
    assert plan.decode == [first, second] and plan.prefill == []
    fifo.finish(first)
    plan = fifo.schedule()
    assert plan.decode == [second] and plan.prefill == [third]
    assert fifo.kv_reserved_bytes == 55 * PER_TOKEN and first.kv_reserved == 0


def test_exact_mode_head_that_does_not_fit_is_not_overtaken() -> None:
    fifo = scheduler(budget_tokens=100, exact=True)
    big, huge, small = request(40, 40), request(50, 40), request(1, 1)
    for state in (big, huge, small):
        fifo.add(state)
    assert fifo.schedule().prefill == [big]
    assert fifo.schedule().prefill == []  # huge waits for memory; small waits behind it
    fifo.finish(big)
    assert fifo.schedule().prefill == [huge, small]


def test_exact_mode_prefills_whole_prompts_and_one_long_prompt_still_runs() -> None:
    fifo = scheduler(exact=True)
    long_one, a, b = request(150, 1), request(60, 1), request(60, 1)
    for state in (long_one, a, b):
        fifo.add(state)
    assert fifo.schedule().scheduled == [(long_one, 150)]
    assert fifo.schedule().scheduled[-1] == (a, 60)
    assert fifo.schedule().scheduled[-1] == (b, 60)


# ---- plain mode: token budget, chunked prefill ------------------------------------------------------


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode() -> None:
    fifo = scheduler(queue_limit=16, max_batch_size=16, max_prefill_tokens=64, decoding_prefill_tokens=48)
    decoders = [request(4, 100) for _ in range(15)]
    for state in decoders:
        fifo.add(state)
    run_step(fifo.schedule())  # 15 × 4 prompt tokens fit the budget of 64
    assert all(state.output_ids for state in decoders)
    long_one = request(500, 10)
    fifo.add(long_one)
    chunks = []
    while not long_one.output_ids:
        plan = fifo.schedule()
        assert [s for s, n in plan.scheduled if n == 1] == decoders  # every decode is in every step, first
        assert plan.tokens <= 15 + 48
        chunks.append(dict(plan.scheduled)[long_one])
        run_step(plan)
    assert chunks == [48] * 10 + [20]  # the prompt budget while others decode, then the rest
    assert long_one.output_ids == [7]  # sampled once, after the last chunk
    assert all(len(state.output_ids) == 1 + len(chunks) for state in decoders)


def test_while_others_decode_short_prompts_start_whole_and_long_ones_in_chunks() -> None:
    fifo = scheduler(max_prefill_tokens=100, decoding_prefill_tokens=30)
    decoder = request(4, 50)
    fifo.add(decoder)
    run_step(fifo.schedule())
    long_one, short_a, short_b, short_c = request(200, 1), request(20, 1), request(25, 1), request(40, 1)
    for state in (long_one, short_a, short_b, short_c):
        fifo.add(state)
    plan = fifo.schedule()
    # One chunk of the long prompt, two short prompts whole, and the third starts with what is left of 100.
    assert plan.scheduled == [(decoder, 1), (long_one, 30), (short_a, 20), (short_b, 25), (short_c, 25)]


def test_the_budget_is_shared_by_new_prompts_in_arrival_order() -> None:
    fifo = scheduler(max_prefill_tokens=100)
    a, b, c = request(60, 1), request(60, 1), request(60, 1)
    for state in (a, b, c):
        fifo.add(state)
    plan = fifo.schedule()
    assert plan.scheduled == [(a, 60), (b, 40)]  # b starts with what is left of the budget
    run_step(plan)
    plan = fifo.schedule()
    assert plan.scheduled == [(a, 1), (b, 20), (c, 60)]


# ---- plain mode: admission by current use, preemption ------------------------------------------------


def test_a_request_with_a_large_max_tokens_does_not_block_others_that_fit() -> None:
    # 800 tokens of budget: the worst case of the first request (20 + 4096) alone would not even fit it.
    fifo = scheduler(budget_tokens=800, queue_limit=16, max_batch_size=16, max_prefill_tokens=512, kv_headroom=0.05)
    greedy = request(20, 4096)
    others = [request(20, 20) for _ in range(15)]
    for state in (greedy, *others):
        fifo.add(state)
    plan = fifo.schedule()
    assert plan.prefill == [greedy, *others]  # all sixteen start together
    assert fifo.kv_reserved_bytes == 16 * 32 * PER_TOKEN  # 21 tokens each (prompt + first token), in blocks
    for _ in range(19):
        run_step(plan)
        plan = fifo.schedule()
    run_step(plan)
    assert all(len(state.output_ids) == 20 for state in others)
    assert fifo.preemptions == 0 and fifo.kv_reserved_bytes <= 800 * PER_TOKEN


def test_when_the_budget_runs_out_the_newest_request_is_preempted_and_recomputed() -> None:
    fifo = scheduler(budget_tokens=96, max_prefill_tokens=200)
    old, new = request(30, 60), request(30, 60)
    fifo.add(old)
    fifo.add(new)
    plan = fifo.schedule()
    assert plan.prefill == [old, new] and fifo.kv_reserved_bytes == 2 * 32 * PER_TOKEN
    steps = 0
    while new not in fifo._waiting:
        run_step(plan)
        plan = fifo.schedule()
        steps += 1
        assert fifo.kv_reserved_bytes <= 96 * PER_TOKEN
    assert fifo.preemptions == 1 and new.preemptions == 1
    assert new.num_computed == 0 and new.kv_reserved == 0 and new.cache is None
    generated = len(new.output_ids)
    assert generated > 0 and plan.scheduled == [(old, 1)]
    while not len(old.output_ids) == 60:
        run_step(plan)
        plan = fifo.schedule()
    fifo.finish(old)
    plan = fifo.schedule()
    # Readmitted: it recomputes its prompt and every token it had generated, then samples the next one.
    assert plan.scheduled == [(new, 30 + generated)]
    run_step(plan)
    assert len(new.output_ids) == generated + 1


def test_a_preempted_request_cancelled_while_waiting_goes_back_to_the_worker() -> None:
    fifo = scheduler(budget_tokens=64, max_prefill_tokens=200)
    old, new = request(30, 30), request(30, 30)
    fifo.add(old)
    fifo.add(new)
    plan = fifo.schedule()
    while new not in fifo._waiting:
        run_step(plan)
        plan = fifo.schedule()
    new.cancel_requested.set()
    assert not fifo.discard(new)  # it has run: the worker retires it, so its text and its end stay in order
    assert fifo.schedule().cancelled == [new]
    assert new not in fifo._waiting


# ---- prefix cache ----------------------------------------------------------------------------------


def cached_scheduler(budget_tokens: int = 1000, **kwargs) -> FifoScheduler:
    return scheduler(budget_tokens, prefix_cache=PrefixCache(BLOCK), **kwargs)


def serve(fifo: FifoScheduler, state: RequestState) -> None:
    """Run one request to the end and leave its blocks in the cache, as the worker does."""
    fifo.add(state)
    plan = fifo.schedule()
    while state.pending_tokens or len(state.output_ids) < state.params.max_tokens:
        run_step(plan)
        if len(state.output_ids) == state.params.max_tokens:
            break
        plan = fifo.schedule()
    fifo.finish(state)
    fifo.store_prefix(state, lambda start, end: ("kv", start, end))


def test_a_prompt_reuses_the_blocks_of_its_scope_and_computes_the_rest() -> None:
    fifo = cached_scheduler(max_prefill_tokens=1000)
    serve(fifo, request(100, 4, scope="team-a"))  # 103 tokens computed: 6 full blocks
    assert len(fifo.prefix_cache) == 6
    again = request(100, 4, scope="team-a")
    fifo.add(again)
    plan = fifo.schedule()
    assert again.cached_tokens == 96 and again.num_computed == 96
    assert plan.scheduled == [(again, 4)]
    assert [b.payload for b in again.prefix_blocks] == [("kv", i * BLOCK, (i + 1) * BLOCK) for i in range(6)]


def test_a_team_never_reuses_another_teams_blocks() -> None:
    fifo = cached_scheduler(max_prefill_tokens=1000)
    serve(fifo, request(100, 4, scope="team-a"))
    for other in (request(100, 4, scope="team-b"), request(100, 4, scope=None)):
        fifo.add(other)
        plan = fifo.schedule()
        assert other.cached_tokens == 0 and dict(plan.scheduled)[other] == 100
        fifo.finish(other)


def test_the_last_token_is_always_computed_even_when_the_whole_prompt_is_cached() -> None:
    fifo = cached_scheduler(max_prefill_tokens=1000)
    serve(fifo, request(64, 4, scope="t"))
    again = request(64, 4, scope="t")
    fifo.add(again)
    assert fifo.schedule().scheduled == [(again, 16)] and again.cached_tokens == 48


def test_a_different_prefix_shares_only_the_blocks_before_it_differs() -> None:
    fifo = cached_scheduler(max_prefill_tokens=1000)
    first = request(64, 2, scope="t")
    serve(fifo, first)
    second = RequestState([5] * 40 + [6] * 24, SamplingParams(max_tokens=2), [].append, cache_scope="t")
    fifo.add(second)
    fifo.schedule()
    assert second.cached_tokens == 32  # blocks 0 and 1; block 2 holds tokens 32..47, and 40..47 differ


def test_cached_blocks_live_in_the_kv_budget_and_are_evicted_before_anyone_waits() -> None:
    fifo = cached_scheduler(budget_tokens=250, max_prefill_tokens=1000)
    serve(fifo, request(100, 4, scope="a"))  # 96 tokens of blocks stay in the budget
    assert fifo.prefix_cache.nbytes == 96 * PER_TOKEN
    serve(fifo, request(100, 4, token=9, scope="a"))  # 96 more: the cache now holds 192 of 250
    assert fifo.prefix_cache.nbytes == 192 * PER_TOKEN
    assert fifo.kv_free_bytes == 58 * PER_TOKEN
    # A new request needing 112 tokens (its prompt and first token, in blocks) evicts four blocks, the
    # least recently used: the tail of the first chain, whose head stays usable.
    big = request(110, 2, token=3, scope="b")
    fifo.add(big)
    assert fifo.schedule().prefill == [big]
    assert fifo.prefix_cache.evicted_blocks == 4
    assert fifo.kv_reserved_bytes + fifo.prefix_cache.nbytes <= 250 * PER_TOKEN
    fifo.finish(big)
    again = request(100, 4, scope="a")
    fifo.add(again)
    fifo.schedule()
    assert again.cached_tokens == 2 * BLOCK


def test_prefix_keys_chain_the_scope_and_every_token_before() -> None:
    a = extend_hashes([], "team-a", [1] * 32, BLOCK)
    assert len(a) == 2 and a != extend_hashes([], "team-b", [1] * 32, BLOCK)
    assert extend_hashes([], "team-a", [2] + [1] * 31, BLOCK)[1] != a[1]  # same block, other prefix
    assert extend_hashes(a[:1], "team-a", [1] * 40, BLOCK) == a  # extending adds only full blocks


def test_the_batch_size_is_capped() -> None:
    fifo = scheduler(max_batch_size=2)
    states = [request(1, 1) for _ in range(3)]
    for state in states:
        fifo.add(state)
    assert fifo.schedule().prefill == states[:2]
    assert fifo.schedule().prefill == []


def test_a_full_queue_refuses_and_a_closed_one_too() -> None:
    fifo = scheduler(queue_limit=1)
    fifo.add(request(1, 1))
    with pytest.raises(EngineBusy, match="queue is full"):
        fifo.add(request(1, 1))
    assert len(fifo.close()) == 1
    with pytest.raises(EngineClosed):
        fifo.add(request(1, 1))
    assert fifo.schedule() is None


def test_discard_takes_back_only_waiting_requests() -> None:
    fifo = scheduler()
    running, waiting = request(1, 1), request(1, 1)
    fifo.add(running)
    fifo.schedule()
    fifo.add(waiting)
    assert fifo.discard(waiting) and not fifo.discard(running)
    assert fifo.max_tokens_per_request() == 1000
    assert set(SCHEDULERS) == {"fifo"}


@pytest.mark.parametrize("bad", [{"queue_limit": 0}, {"max_batch_size": 0}, {"kv_budget_bytes": 0},
                                 {"device": "tpu"}, {"stream_interval_s": -1}, {"threads": 0},
                                 {"max_prefill_tokens": 0}, {"decoding_prefill_tokens": 0}, {"kv_block_tokens": 0}, {"kv_headroom": 1.0}])
def test_invalid_engine_settings_name_the_field(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineConfig(**bad)


def test_unknown_engine_settings_are_refused() -> None:
    with pytest.raises(TypeError, match="kv_budget"):
        EngineConfig.from_kwargs(kv_budget=5)


def chunk(text: str, tokens: int, finish: str | None = None) -> Chunk:
    return Chunk(text, finish, 3, tokens)


def test_router_holds_text_for_the_stream_interval_but_never_first_text_or_the_end() -> None:
    got: list[Chunk] = []
    state = request(3, 10, got)
    router = OutputRouter(stream_interval_s=3600)
    router.emit(state, chunk("a", 1))
    router.flush()
    assert got == [chunk("a", 1)]  # the first text is not held back
    router.emit(state, chunk("b", 2))
    router.flush()
    router.emit(state, chunk("c", 3))
    router.flush()
    assert got == [chunk("a", 1)]  # held: the interval has not passed
    router.emit(state, chunk("d", 4, "length"))
    router.flush()
    assert got == [chunk("a", 1), chunk("bcd", 4, "length")]  # merged, sent with the end


def test_router_without_interval_sends_every_step() -> None:
    got: list[Chunk] = []
    state = request(3, 10, got)
    router = OutputRouter()
    for i, text in enumerate("xyz", start=1):
        router.emit(state, chunk(text, i))
        router.flush()
    assert [c.text for c in got] == ["x", "y", "z"]


def test_a_steps_input_is_taken_from_the_prompt_and_the_output_as_one_sequence() -> None:
    state = request(5, 10, token=1)
    state.output_ids = [2, 3, 4]
    assert state.token_slice(0, 5) == [1] * 5
    assert state.token_slice(3, 4) == [1, 1, 2, 3]  # a recomputed request's chunk crosses into its output
    assert state.token_slice(7, 1) == [4]  # a decode step feeds the last sampled token
    assert state.pending_tokens == 8 and state.max_total_tokens == 15


def test_eviction_skips_the_blocks_kept_and_takes_the_least_recent_first() -> None:
    cache = PrefixCache(BLOCK)
    for key in (b"a", b"b", b"c"):
        cache.insert(Block(key, None, 10))
    cache.touch(b"a")  # now b is the least recently used, then c, then a
    assert cache.evict(15, keep=frozenset({b"b"})) == 20
    assert b"b" in cache and b"c" not in cache and b"a" not in cache and cache.nbytes == 10
