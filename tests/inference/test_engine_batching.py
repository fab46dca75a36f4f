"""Continuous batching against the demo models on CPU: exact greedy parity under load, seeds, admission, cancel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from inference.demo_models import DEMO_SPECS
from inference.engine import Chunk, Engine, PromptTooLong, RequestState, SamplingParams
from tests.inference.conftest import run
from tests.inference.test_engine import CHAT, POISON, poison_engine

QUESTIONS = [
    "hi",
    "How many experts are active for each token?",
    "Describe the audit ledger, its hash chain and the signed checkpoints, in detail please.",
    "What",
    "Which variant should a box with one GPU serve, the full mixture of experts, the distilled one or the dense?",
    "ok?",
    "Tell me about the egress guard.",
    "Why is the reconciler in the web process and not in the worker?",
]


def prompts_of(engine: Engine) -> list[list[int]]:
    """Return chat prompts of mixed lengths (a few to a few dozen tokens)."""
    return [engine.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


async def run_staggered(engine: Engine, prompts: list[list[int]], params: list[SamplingParams],
                        together: bool = False) -> list[tuple[list[Chunk], RequestState]]:
    """Submit each prompt once the one before it has its first token, so it joins a batch that is already
    decoding (whatever the machine's load: no wall-clock gap); `together` submits them all at once."""
    decoding = [asyncio.Event() for _ in prompts]

    async def one(i: int) -> tuple[list[Chunk], RequestState]:
        if i and not together:
            await decoding[i - 1].wait()
        handle = engine.submit(prompts[i], params[i])
        chunks = []
        async for chunk in handle:
            chunks.append(chunk)
            decoding[i].set()
        decoding[i].set()
        return chunks, handle.state

    return await asyncio.gather(*(one(i) for i in range(len(prompts))))


def generate_alone(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Return the tokens of an unbatched greedy `generate` of one prompt."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def assert_overlapped(states: list[RequestState]) -> None:
    """Fail unless some requests really ran at the same time."""
    spans = sorted((s.started_at, s.finished_at) for s in states)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "no two requests overlapped"


@pytest.mark.parametrize("name", tuple(DEMO_SPECS))
def test_batched_greedy_matches_unbatched_generate(engines: dict[str, Engine], demo_dir: Path, name: str) -> None:
    engine = engines[name]
    # Chat prompts of 13-38 tokens and raw prompts of 1-11, the row counts where BLAS kernels differ most.
    prompts = prompts_of(engine) + [[(17 * i + 5 * n) % 1000 + 4 for i in range(n)] for n in (1, 2, 5, 11)]
    assert len({len(p) for p in prompts}) >= 10
    limits = [40, 24, 48, 33, 40, 17, 48, 29, 36, 48, 20, 44]  # requests also leave at different steps
    params = [SamplingParams(max_tokens=n, temperature=0) for n in limits]

    results = run(run_staggered(engine, prompts, params))

    model = AutoModelForCausalLM.from_pretrained(demo_dir / name, local_files_only=True)
    for prompt, limit, (chunks, state) in zip(prompts, limits, results):
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=limit, do_sample=False)
        assert state.output_ids == out[0, len(prompt):].tolist()
    assert_overlapped([state for _, state in results])


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engines: dict[str, Engine]) -> None:
    engine = engines["demo-moe"]
    prompts = prompts_of(engine)
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=42)
    params = [seeded if i == 2 else SamplingParams(max_tokens=30, temperature=1.0) for i in range(len(prompts))]

    alone = run(run_staggered(engine, [prompts[2]], [seeded]))[0][1]
    together = run(run_staggered(engine, prompts, params))[2][1]
    assert together.output_ids == alone.output_ids
    assert len(alone.output_ids) == 24 or alone.finish_reason == "stop"


def test_in_exact_mode_requests_wait_for_their_worst_case_kv_instead_of_failing(demo_dir: Path) -> None:
    # Exact mode reserves prompt + max_tokens at admission (a preempted request's recompute would change its
    # numbers); plain mode's admission by current use and preemption are tested in test_engine_chunked.
    probe = Engine(demo_dir / "demo-distilled", device="cpu")
    per_token = probe.kv_bytes_per_token
    probe.close()
    prompt_tokens = len(prompts_of(probe)[1])
    # Room for two requests of this prompt and 32 new tokens at a time, not three.
    budget = per_token * (2 * (prompt_tokens + 32) + 10)
    with Engine(demo_dir / "demo-distilled", device="cpu", kv_budget_bytes=budget, exact=True) as engine:
        engine.eos_token_ids = set()
        prompt = prompts_of(engine)[1]
        params = SamplingParams(max_tokens=32, temperature=0)
        seen_running: list[int] = []

        async def scenario() -> list[tuple[list[Chunk], RequestState]]:
            task = asyncio.gather(*(asyncio.create_task(_collect(engine, prompt, params)) for _ in range(5)))
            while not task.done():
                seen_running.append(len(engine.scheduler.running))
                assert engine.scheduler.kv_reserved_bytes <= budget
                await asyncio.sleep(0.002)
            return await task

        results = run(scenario())
    assert [state.finish_reason for _, state in results] == ["length"] * 5
    assert max(seen_running) == 2
    assert len({tuple(state.output_ids) for _, state in results}) == 1  # same prompt, same greedy answer


async def _collect(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[Chunk], RequestState]:
    handle = engine.submit(prompt, params)
    return [c async for c in handle], handle.state


def test_a_request_larger_than_the_kv_budget_is_refused_naming_it(demo_dir: Path) -> None:
    # float32 weights and KV: 2,048 bytes per token of the dense demo (bfloat16 would halve it).
    with Engine(demo_dir / "demo-dense", device="cpu", precision="float32", kv_budget_bytes=2048 * 100) as engine:
        assert engine.max_request_tokens() == 100

        async def scenario() -> None:
            engine.submit([5] * 60, SamplingParams(max_tokens=41))

        with pytest.raises(PromptTooLong, match="KV-cache budget of 100 tokens"):
            run(scenario())


def test_cancelling_a_running_request_frees_its_slot_within_one_step(demo_dir: Path) -> None:
    with Engine(demo_dir / "demo-dense", device="cpu") as engine:
        engine.eos_token_ids = set()
        prompt = engine.encode_chat(CHAT)

        async def scenario() -> tuple[RequestState, list[int]]:
            keeper = engine.submit(prompt, SamplingParams(max_tokens=1500, temperature=0))
            victim = engine.submit(prompt, SamplingParams(max_tokens=1500, temperature=0))
            kept, dropped = aiter(keeper), aiter(victim)
            await anext(kept)
            await anext(dropped)
            # Counted in the victim's own tokens, not in engine steps seen from this loop: a loaded machine may
            # let the engine run many steps (for the keeper) before this loop sees the victim finished.
            tokens_before = len(victim.state.output_ids)
            await dropped.aclose()  # the client went away
            while not victim.state.finished:
                await asyncio.sleep(0.001)
            steps_taken = len(victim.state.output_ids) - tokens_before
            reserved, keeper_reservation = engine.scheduler.kv_reserved_bytes, keeper.state.kv_reserved
            await kept.aclose()
            return victim.state, [steps_taken, reserved, keeper_reservation]

        state, (steps_taken, reserved, keeper_reservation) = run(scenario())
    assert state.finish_reason == "cancelled"
    assert steps_taken <= 2  # the step in flight when it was cancelled, and at most the next one
    assert reserved == keeper_reservation > 0  # only the other request's reservation remains


def test_a_failing_request_in_a_batch_fails_alone(demo_dir: Path) -> None:
    with Engine(demo_dir / "demo-dense", device="cpu", exact=True) as engine:
        poison_engine(engine)
        prompts = prompts_of(engine)
        expected = [generate_alone(demo_dir / "demo-dense", p, 20) for p in prompts[:3]]
        params = [SamplingParams(max_tokens=20, temperature=0)] * 4

        async def scenario():
            return await run_staggered(engine, [*prompts[:2], [POISON, *prompts[3]], prompts[2]], params, together=True)

        results = run(scenario())
    (a, sa), (b, sb), (bad, _), (c, sc) = results
    assert bad[-1].finish_reason == "error" and "simulated device fault" in bad[-1].error
    assert [sa.output_ids, sb.output_ids, sc.output_ids] == expected


def test_top_k_of_one_is_greedy(engines: dict[str, Engine]) -> None:
    engine = engines["demo-distilled"]
    prompt = prompts_of(engine)[1]
    greedy = run(_collect(engine, prompt, SamplingParams(max_tokens=16, temperature=0)))[1]
    top1 = run(_collect(engine, prompt, SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=3)))[1]
    assert top1.output_ids == greedy.output_ids


def test_frequency_penalty_stops_a_greedy_loop(engines: dict[str, Engine]) -> None:
    engine = engines["demo-dense"]
    prompt = prompts_of(engine)[2]
    plain = run(_collect(engine, prompt, SamplingParams(max_tokens=40, temperature=0)))[1]
    penalised = run(_collect(engine, prompt, SamplingParams(max_tokens=40, temperature=0,
                                                                      frequency_penalty=2.0, presence_penalty=2.0)))[1]
    assert penalised.output_ids != plain.output_ids
    # With strong penalties greedy decoding repeats tokens less than without them.
    assert len(set(penalised.output_ids)) >= len(set(plain.output_ids))


def test_moe_telemetry_counts_every_routed_token(engines: dict[str, Engine]) -> None:
    from appliance.console.charts import expert_heatmap
    from inference.engine.telemetry import snapshot

    engine = engines["demo-moe"]
    before = snapshot(engine)
    run(_collect(engine, prompts_of(engine)[1], SamplingParams(max_tokens=5, temperature=0)))
    after = snapshot(engine)

    assert after["moe"] and after["num_experts"] == 16 and after["experts_per_token"] == 4
    assert [layer["layer"] for layer in after["layers"]] == [1, 2]  # layer 0 is dense (first_k_dense_replace)
    routed = sum(after["layers"][0]["expert_tokens"]) - sum(before["layers"][0]["expert_tokens"])
    prompt_tokens = len(prompts_of(engine)[1])
    assert routed == 4 * (prompt_tokens + 4)  # the prompt, then four decode steps (the fifth token ends it)
    for layer in after["layers"]:
        assert 0 <= layer["idle_fraction"] <= 1
        assert layer["tokens_per_active_expert"] >= 1
        assert layer["hottest"][0][1] >= layer["coldest"][0][1]
    svg = expert_heatmap(after)  # the engine gives numbers; the console draws them
    assert svg.startswith("<svg") and "layer 2" in svg and "<script" not in svg


def test_dense_models_report_no_moe_telemetry(engines: dict[str, Engine]) -> None:
    from appliance.console.charts import expert_heatmap
    from inference.engine.telemetry import snapshot

    snap = snapshot(engines["demo-dense"])
    assert snap == {"model": "demo-dense", "moe": False}
    assert "not a mixture-of-experts model" in expert_heatmap(snap)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_batches_every_demo_variant_in_bfloat16(demo_dir: Path) -> None:
    for name in DEMO_SPECS:
        with Engine(demo_dir / name, device="cuda") as engine:
            assert engine.model.dtype == torch.bfloat16 and not engine.exact
            prompts = prompts_of(engine)
            params = [SamplingParams(max_tokens=24, temperature=0)] * len(prompts)
            results = run(run_staggered(engine, prompts, params))
        assert all(state.finish_reason in ("length", "stop") for _, state in results)
        assert all(chunks[-1].completion_tokens == len(state.output_ids) for chunks, state in results)
