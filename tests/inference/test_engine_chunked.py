"""The token budget, chunked prefill, admission by current use and preemption, on the demo models (CPU).

Plain mode (the default) runs them; exact mode keeps whole prefills and worst-case reservations, tested
here too. Which requests ran in which step is read from the engine's own step loop: `record_plans` keeps
a copy of every plan the worker runs (a recorder around the real step, which still does everything).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from inference.demo_models import DEMO_SPECS
from inference.engine import Chunk, Engine, RequestState, SamplingParams
from inference.engine.cache import KVStore
from tests.inference.conftest import run
from tests.inference.test_engine_batching import generate_alone

LONG_TEXT = "The ledger keeps every event in a hash chain, and beat signs a checkpoint every few minutes. "


def long_prompt(engine: Engine, tokens: int) -> list[int]:
    """Return a chat prompt of about `tokens` tokens (at most that many)."""
    ids = engine.encode_chat([{"role": "user", "content": LONG_TEXT * (tokens // 10)}])
    assert len(ids) >= tokens, "the text is too short for the prompt asked for"
    return ids[:tokens]


def record_plans(engine: Engine, also=None) -> list[list[tuple[RequestState, int]]]:
    """Keep a copy of every step plan the worker runs from now on (and call `also()` before each step)."""
    plans: list[list[tuple[RequestState, int]]] = []
    step = engine._step

    def recording(plan):
        plans.append(list(plan.scheduled))
        if also is not None:
            also()
        return step(plan)

    engine._step = recording
    return plans


async def collect(engine: Engine, prompt: list[int], params: SamplingParams, **options):
    handle = engine.submit(prompt, params, **options)
    chunks: list[Chunk] = [c async for c in handle]
    return chunks, handle.state


@pytest.mark.parametrize("name", DEMO_SPECS)
def test_a_chunk_after_cached_tokens_computes_what_the_whole_prompt_does(demo_dir: Path, name: str) -> None:
    # The attention of a chunk must see the history before it and, causally, its own tokens.
    with Engine(demo_dir / name, device="cpu") as engine:
        prompt = long_prompt(engine, 300)
        with torch.inference_mode():
            whole_store, chunked_store = KVStore(400, 400), KVStore(400, 400)
            whole = engine.runner.step([whole_store], [prompt])[0]
            for start in range(0, 300, 37):
                chunked = engine.runner.step([chunked_store], [prompt[start : start + 37]])[0]
            assert chunked_store.length == whole_store.length == 300
            torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
            for layer in whole_store.layers:
                for mine, theirs in zip(chunked_store.view(layer, 300), whole_store.view(layer, 300)):
                    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_a_long_prompt_is_prefilled_in_chunks_while_fifteen_streams_decode(demo_dir: Path) -> None:
    with Engine(demo_dir / "demo-dense", device="cpu", decoding_prefill_tokens=48) as engine:
        engine.eos_token_ids = set()
        short = engine.encode_chat([{"role": "user", "content": "hi"}])
        prompt = long_prompt(engine, 1500)
        plans = record_plans(engine)

        async def scenario():
            decoders = [engine.submit(short, SamplingParams(max_tokens=500, temperature=0)) for _ in range(15)]
            streams = [aiter(d) for d in decoders]
            for stream in streams:
                await anext(stream)  # every decoder has its first token: all fifteen are decoding
            long_state = (await collect(engine, prompt, SamplingParams(max_tokens=4, temperature=0)))[1]
            still_running = [not d.state.finished for d in decoders]
            for stream in streams:
                await stream.aclose()
            return [d.state for d in decoders], long_state, still_running

        decoders, long_state, still_running = run(scenario())
    assert all(still_running)  # all fifteen decoded through the whole prefill
    assert long_state.finish_reason == "length" and len(long_state.output_ids) == 4
    chunk_steps = [plan for plan in plans if dict(plan).get(long_state, 0) > 1]
    assert len(chunk_steps) >= 1500 // 48  # prefilled over many steps, not in one
    for plan in chunk_steps:
        assert dict(plan)[long_state] <= 48  # the step's prompt budget while others decode
        in_step = dict(plan)
        assert all(in_step.get(d) == 1 for d in decoders)  # every decoder took a token in every chunk's step
    assert sum(dict(plan)[long_state] for plan in chunk_steps) == 1500


@pytest.mark.parametrize("name", DEMO_SPECS)
def test_chunked_prefill_answers_as_a_whole_prefill_does(demo_dir: Path, name: str) -> None:
    answers = []
    for budget in (48, 4096):
        with Engine(demo_dir / name, device="cpu", max_prefill_tokens=budget, prefix_cache=False) as engine:
            engine.eos_token_ids = set()
            prompt = long_prompt(engine, 400)
            answers.append(run(collect(engine, prompt, SamplingParams(max_tokens=12, temperature=0)))[1].output_ids)
            steps = engine.describe()["steps"]
        assert steps == (-(-400 // budget) + 11)  # the prefill's chunks, then one step per further token
    assert answers[0] == answers[1]


def test_exact_mode_prefills_a_long_prompt_whole_and_still_equals_generate(demo_dir: Path) -> None:
    with Engine(demo_dir / "demo-dense", device="cpu", exact=True, max_prefill_tokens=32, decoding_prefill_tokens=32) as engine:
        engine.eos_token_ids = set()
        prompt = long_prompt(engine, 300)
        plans = record_plans(engine)
        state = run(collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0), cache_scope="t"))[1]
        described = engine.describe()
    assert plans[0] == [(state, 300)]  # one step, the budget notwithstanding
    assert state.cached_tokens == 0 and not described["prefix_cache"] and not described["chunked_prefill"]
    model = demo_dir / "demo-dense"
    eos_free = generate_alone(model, prompt, 10)
    assert state.output_ids[: len(eos_free)] == eos_free


def test_a_request_with_a_large_max_tokens_does_not_block_fifteen_that_fit(demo_dir: Path) -> None:
    probe = Engine(demo_dir / "demo-dense", device="cpu")
    per_token = probe.kv_bytes_per_token
    probe.close()
    # Room for the large request's worst case (its prompt + 2000), beside which the worst cases of only
    # eight of the others would fit; what all sixteen use at once fits.
    budget = per_token * 3000
    with Engine(demo_dir / "demo-dense", device="cpu", kv_budget_bytes=budget) as engine:
        engine.eos_token_ids = set()
        prompt = engine.encode_chat([{"role": "user", "content": "hi"}])
        assert (3000 - len(prompt) - 2000) // (len(prompt) + 100) < 15
        plans = record_plans(engine)

        async def scenario():
            large = engine.submit(prompt, SamplingParams(max_tokens=2000, temperature=0))
            others = [asyncio.create_task(collect(engine, prompt, SamplingParams(max_tokens=100, temperature=0)))
                      for _ in range(15)]
            results = await asyncio.gather(*others)
            large_tokens = len(large.state.output_ids)
            large.cancel()
            return large.state, [state for _, state in results], large_tokens

        large, others, large_tokens = run(scenario())
        preemptions = engine.describe()["preemptions"]
    assert any(len(plan) == 16 for plan in plans)  # at some step all sixteen ran together
    assert all(state.finish_reason == "length" and len(state.output_ids) == 100 for state in others)
    assert large_tokens < 2000 and preemptions == 0


def test_when_the_kv_budget_runs_out_a_request_is_preempted_and_recomputed(demo_dir: Path) -> None:
    probe = Engine(demo_dir / "demo-distilled", device="cpu")
    per_token = probe.kv_bytes_per_token
    probe.close()
    budget = per_token * 200  # three requests of 20 + 120 tokens fit at first, not at the end
    with Engine(demo_dir / "demo-distilled", device="cpu", kv_budget_bytes=budget, kv_headroom=0.0) as engine:
        engine.eos_token_ids = set()
        prompt = long_prompt(engine, 20)
        reserved: list[int] = []
        plans = record_plans(engine, also=lambda: reserved.append(
            engine.scheduler.kv_reserved_bytes + engine.scheduler.prefix_cache.nbytes))
        params = SamplingParams(max_tokens=120, temperature=0)

        async def scenario():
            return await asyncio.gather(*(collect(engine, prompt, params) for _ in range(3)))

        results = run(scenario())
        described = engine.describe()
    assert described["preemptions"] >= 1 and any(state.preemptions for _, state in results)
    assert max(reserved) <= budget
    tokenizer = engine.tokenizer
    for chunks, state in results:
        assert state.finish_reason == "length" and len(state.output_ids) == 120
        assert chunks[-1].completion_tokens == 120
        # No token lost or repeated across a preemption: the text streamed is the text of the tokens.
        assert "".join(c.text for c in chunks) == tokenizer.decode(state.output_ids, skip_special_tokens=True)
    preempted = next(state for _, state in results if state.preemptions)
    recomputed = [n for plan in plans for s, n in plan if s is preempted and n > 20]
    assert recomputed  # readmitted, it computed its prompt and its earlier tokens again
