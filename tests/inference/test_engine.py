"""The engine against the real demo models on CPU: greedy parity with generate(), streaming, stops, cancel, limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from inference.demo_models import DEMO_SPECS
from inference.engine import (
    Chunk,
    Engine,
    EngineBusy,
    EngineClosed,
    PromptTooLong,
    RequestState,
    SamplingParams,
)
from inference.engine.request import RequestStatus
from inference.engine.runner import resolve_device
from tests.inference.conftest import run

CHAT = [{"role": "user", "content": "How many experts are active for each token?"}]
GREEDY = SamplingParams(max_tokens=48, temperature=0)
# Long enough that it cannot finish during a test; with EOS switched off it runs until cancelled.
ENDLESS = SamplingParams(max_tokens=1900, temperature=0)


async def _collect(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> tuple[list[Chunk], RequestState]:
    handle = engine.submit(prompt_ids, params)
    return [chunk async for chunk in handle], handle.state


def collect(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> tuple[list[Chunk], RequestState]:
    """Run one request to the end and return its chunks and final state."""
    return run(_collect(engine, prompt_ids, params))


def text_of(chunks: list[Chunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


async def wait_until_finished(state: RequestState, timeout: float = 60.0) -> None:
    """Poll until the worker has finished `state` (the worker thread sets it, not the event loop)."""
    for _ in range(int(timeout / 0.01)):
        if state.finished:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"request still {state.status} after {timeout}s")


@pytest.fixture
def endless(demo_dir: Path) -> Iterator[Engine]:
    """Return a private dense-model engine that never sees EOS, with room for one waiting request."""
    engine = Engine(demo_dir / "demo-dense", device="cpu", queue_limit=1)
    engine.eos_token_ids = set()  # so only max_tokens, a stop string or a cancel can end a request
    yield engine
    engine.close()


@pytest.mark.parametrize("name", tuple(DEMO_SPECS))
def test_greedy_matches_generate(engines: dict[str, Engine], demo_dir: Path, name: str) -> None:
    engine = engines[name]
    prompt = engine.encode_chat(CHAT)
    chunks, state = collect(engine, prompt, GREEDY)

    model = AutoModelForCausalLM.from_pretrained(demo_dir / name, local_files_only=True)
    with torch.inference_mode():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False)
    expected = generated[0, len(prompt) :].tolist()

    assert state.output_ids == expected
    visible = [t for t in expected if t not in engine.eos_token_ids]
    assert text_of(chunks) == engine.tokenizer.decode(visible, skip_special_tokens=True)


def test_stream_ends_with_one_final_chunk_carrying_the_counts(dense: Engine) -> None:
    prompt = dense.encode_chat(CHAT)

    async def go() -> list[Chunk]:
        return [chunk async for chunk in dense.stream(prompt, SamplingParams(max_tokens=16, temperature=0))]

    chunks = run(go())
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length"
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (len(prompt), 16)
    assert chunks[-1].error is None


def test_stop_string_is_not_returned(dense: Engine) -> None:
    prompt = dense.encode_chat(CHAT)
    full = text_of(collect(dense, prompt, GREEDY)[0])
    middle = len(full) // 2
    stop = full[middle : middle + 4]
    assert stop.strip(), "the greedy answer should have text to stop on"

    chunks, state = collect(dense, prompt, SamplingParams(max_tokens=48, temperature=0, stop=(stop,)))
    assert text_of(chunks) == full[: full.index(stop)]
    assert state.finish_reason == "stop"


def test_eos_ends_the_answer_with_stop(endless: Engine) -> None:
    prompt = endless.encode_chat(CHAT)
    _, free = collect(endless, prompt, SamplingParams(max_tokens=12, temperature=0))
    eos = free.output_ids[-1]
    cut = free.output_ids.index(eos)
    endless.eos_token_ids = {eos}  # pretend the model's last greedy token is its end-of-answer token

    chunks, state = collect(endless, prompt, SamplingParams(max_tokens=12, temperature=0))
    assert state.finish_reason == "stop"
    assert state.output_ids == free.output_ids[: cut + 1]
    assert chunks[-1].completion_tokens == cut + 1
    assert text_of(chunks) == endless.tokenizer.decode(free.output_ids[:cut], skip_special_tokens=True)


def test_seed_makes_sampling_reproducible(dense: Engine) -> None:
    prompt = dense.encode_chat(CHAT)
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
    _, first = collect(dense, prompt, params)
    _, again = collect(dense, prompt, params)
    _, other = collect(dense, prompt, SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=4321))
    assert first.output_ids == again.output_ids
    assert first.output_ids != other.output_ids


def test_cancelled_request_frees_the_engine(endless: Engine) -> None:
    prompt = endless.encode_chat(CHAT)

    async def scenario() -> tuple[RequestState, list[Chunk]]:
        handle = endless.submit(prompt, ENDLESS)
        first_chunk = asyncio.Event()

        async def consume() -> None:
            async for _ in handle:
                first_chunk.set()

        task = asyncio.create_task(consume())
        await first_chunk.wait()
        task.cancel()  # as when the HTTP client disconnects
        with contextlib.suppress(asyncio.CancelledError):
            await task
        nxt = [chunk async for chunk in endless.stream(prompt, SamplingParams(max_tokens=4, temperature=0))]
        return handle.state, nxt

    cancelled, nxt = run(scenario())
    assert cancelled.finish_reason == "cancelled"
    assert cancelled.status is RequestStatus.FINISHED
    assert len(cancelled.output_ids) < ENDLESS.max_tokens
    assert nxt[-1].finish_reason == "length"


def test_breaking_out_of_a_stream_cancels_the_request(endless: Engine) -> None:
    prompt = endless.encode_chat(CHAT)

    async def scenario() -> RequestState:
        handle = endless.submit(prompt, ENDLESS)
        async for _ in handle:
            break
        # asyncio closes the abandoned async generator, which cancels the request.
        await wait_until_finished(handle.state)
        return handle.state

    state = run(scenario())
    assert state.finish_reason == "cancelled"
    assert len(state.output_ids) < ENDLESS.max_tokens


def test_queue_full_raises_engine_busy(endless: Engine) -> None:
    prompt = endless.encode_chat(CHAT)

    async def scenario() -> None:
        running = endless.submit(prompt, ENDLESS)
        chunks = aiter(running)
        await anext(chunks)  # the worker has taken it, so the queue is empty again
        waiting = endless.submit(prompt, ENDLESS)  # fills the single queue slot
        with pytest.raises(EngineBusy, match="queue is full"):
            endless.submit(prompt, ENDLESS)
        waiting.cancel()  # frees the slot at once: it never started
        assert [c.finish_reason async for c in waiting] == ["cancelled"]
        endless.submit(prompt, SamplingParams(max_tokens=1)).cancel()
        await chunks.aclose()
        await wait_until_finished(running.state)

    run(scenario())


def test_prompt_too_long_names_the_limit(dense: Engine) -> None:
    async def scenario() -> None:
        dense.submit([5] * 2000, SamplingParams(max_tokens=100))

    with pytest.raises(PromptTooLong, match="context length of 2048 tokens"):
        run(scenario())
    assert issubclass(PromptTooLong, ValueError)


def test_prompt_that_fits_exactly_is_accepted(dense: Engine) -> None:
    _, state = collect(dense, [5] * 2046, SamplingParams(max_tokens=2, temperature=0))
    assert state.finish_reason in ("length", "stop")


def test_token_outside_the_vocabulary_is_rejected(dense: Engine) -> None:
    async def scenario() -> None:
        dense.submit([dense.vocab_size], SamplingParams())

    with pytest.raises(ValueError, match="outside the vocabulary"):
        run(scenario())


@pytest.mark.parametrize(
    "bad",
    [{"max_tokens": 0}, {"temperature": -0.5}, {"top_p": 0.0}, {"top_p": 1.5}, {"seed": -1}, {"top_k": -1},
     {"presence_penalty": 2.5}, {"frequency_penalty": -3}],
)
def test_invalid_sampling_params_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


POISON = 7


def poison_engine(engine: Engine) -> None:
    """Make the model fail, as a device fault would, on any forward whose input contains POISON."""

    def fault(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and bool((input_ids == POISON).any()):
            raise RuntimeError("simulated device fault")

    engine.model.get_input_embeddings().register_forward_pre_hook(fault, with_kwargs=True)


def test_error_in_one_request_does_not_stop_the_engine(demo_dir: Path) -> None:
    with Engine(demo_dir / "demo-moe", device="cpu") as engine:
        poison_engine(engine)
        prompt = engine.encode_chat(CHAT)
        assert POISON not in prompt

        async def scenario() -> tuple[list[Chunk], list[Chunk]]:
            failing = engine.submit([POISON, *prompt], SamplingParams(max_tokens=8))
            healthy = engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0))  # same step or the next
            return [c async for c in failing], [c async for c in healthy]

        failed, served = run(scenario())
    assert failed[-1].finish_reason == "error"
    assert failed[-1].error == "RuntimeError: simulated device fault"
    assert served[-1].finish_reason == "length"


def test_close_fails_queued_requests_and_refuses_new_ones(demo_dir: Path) -> None:
    engine = Engine(demo_dir / "demo-distilled", device="cpu", queue_limit=4)
    engine.eos_token_ids = set()
    prompt = engine.encode_chat(CHAT)

    async def scenario() -> tuple[list[Chunk], list[Chunk]]:
        running = engine.submit(prompt, ENDLESS)
        chunks = aiter(running)
        await anext(chunks)
        queued = engine.submit(prompt, ENDLESS)
        engine.close()
        with pytest.raises(EngineClosed):
            engine.submit(prompt, ENDLESS)
        return [c async for c in chunks], [c async for c in queued]

    running_rest, queued = run(scenario())
    assert running_rest[-1].finish_reason == "error" and "closed" in running_rest[-1].error
    assert queued == [Chunk("", "error", len(prompt), 0, "the engine was closed before the request started")]
    assert engine.model is None
    engine.close()  # closing twice is harmless


def test_encode_chat_ends_with_the_assistant_prompt(dense: Engine) -> None:
    ids = dense.encode_chat([{"role": "system", "content": "Be brief."}, *CHAT])
    assert dense.tokenizer.decode(ids) == (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "How many experts are active for each token?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids.count(dense.tokenizer.bos_token_id) == 1


def test_request_state_records_its_timeline(dense: Engine) -> None:
    _, state = collect(dense, dense.encode_chat(CHAT), SamplingParams(max_tokens=4, temperature=0))
    assert state.status is RequestStatus.FINISHED
    assert state.started_at <= state.finished_at
    assert state.cache is None  # the KV cache is released with the request
    assert state.kv_reserved == 0 and dense.scheduler.kv_reserved_bytes == 0


def test_engine_describes_its_model(engines: dict[str, Engine]) -> None:
    for engine in engines.values():
        assert engine.device == "cpu"
        assert engine.context_length == 2048
        assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in engine.eos_token_ids


def test_auto_device_picks_cuda_only_when_torch_sees_a_gpu() -> None:
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_serves_in_bfloat16(demo_dir: Path) -> None:
    with Engine(demo_dir / "demo-moe", device="cuda") as engine:
        assert engine.model.dtype == torch.bfloat16
        chunks, state = collect(engine, engine.encode_chat(CHAT), SamplingParams(max_tokens=16, seed=1))
    assert state.finish_reason in ("length", "stop")
    assert chunks[-1].completion_tokens == len(state.output_ids)
