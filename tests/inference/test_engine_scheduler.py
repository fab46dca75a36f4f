"""Admission and step plans, and the results router, without a model."""

from __future__ import annotations

import pytest

from inference.engine.config import EngineConfig
from inference.engine.outputs import OutputRouter
from inference.engine.scheduler import SCHEDULERS, FifoScheduler
from inference.engine.request import Chunk, EngineBusy, EngineClosed, RequestState, SamplingParams

PER_TOKEN = 10  # bytes of KV cache per token, to keep the arithmetic readable


def request(prompt: int, max_tokens: int, got: list | None = None) -> RequestState:
    sink = got if got is not None else []
    return RequestState([5] * prompt, SamplingParams(max_tokens=max_tokens), sink.append)


def scheduler(budget_tokens: int = 1000, **kwargs) -> FifoScheduler:
    settings = dict(queue_limit=4, kv_budget_bytes=budget_tokens * PER_TOKEN, kv_bytes_per_token=PER_TOKEN,
                    max_batch_size=8, max_prefill_tokens=100)
    return FifoScheduler(**{**settings, **kwargs})


def test_requests_are_admitted_in_order_while_their_worst_case_fits() -> None:
    fifo = scheduler(budget_tokens=100)
    first, second, third = request(20, 30), request(20, 20), request(10, 5)  # 50, 40 and 15 tokens
    for state in (first, second, third):
        fifo.add(state)
    plan = fifo.schedule()
    assert plan.prefill == [first, second] and plan.decode == []
    assert fifo.kv_reserved_bytes == 90 * PER_TOKEN
    plan = fifo.schedule()  # the third waits: 90 + 15 > 100
    assert plan.decode == [first, second] and plan.prefill == []
    fifo.finish(first)
    plan = fifo.schedule()
    assert plan.decode == [second] and plan.prefill == [third]
    assert fifo.kv_reserved_bytes == 55 * PER_TOKEN and first.kv_reserved == 0


def test_a_head_that_does_not_fit_is_not_overtaken() -> None:
    fifo = scheduler(budget_tokens=100)
    big, huge, small = request(40, 40), request(50, 40), request(1, 1)
    for state in (big, huge, small):
        fifo.add(state)
    assert fifo.schedule().prefill == [big]
    assert fifo.schedule().prefill == []  # huge waits for memory; small waits behind it
    fifo.finish(big)
    assert fifo.schedule().prefill == [huge, small]


def test_prefill_tokens_per_step_are_capped_but_one_long_prompt_still_runs() -> None:
    fifo = scheduler(max_prefill_tokens=100)
    long_one, a, b = request(150, 1), request(60, 1), request(60, 1)
    for state in (long_one, a, b):
        fifo.add(state)
    assert fifo.schedule().prefill == [long_one]
    assert fifo.schedule().prefill == [a]
    assert fifo.schedule().prefill == [b]


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
                                 {"device": "tpu"}, {"stream_interval_s": -1}, {"threads": 0}])
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
